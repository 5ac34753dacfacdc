"""Collective execution of requests on every rank: batched prefill with right padding, batched decode over
per-sequence caches, PP hand-off of activations, sampling on one rank and a broadcast of the chosen tokens.

Every rank runs the same loop on the same (broadcast) requests, so all ranks agree on shapes and on when to stop
without further messages; only the sampled tokens travel each step. Plain decoding is one loop,
:class:`RunningBatch`, whose requests join and leave at token boundaries (TensorRT-LLM's in-flight batching): a
batch call joins all its requests at once, a serving scheduler (``builder.engine.driver``) joins them as they come.
"""

from __future__ import annotations

import resource
from typing import Any, Callable

import psutil
import torch
import torch.distributed as dist

from builder.engine.bundle import EngineBundle
from builder.engine.distributed import Comm
from builder.engine.kv_cache import KVCache, StepPositions
from builder.engine.model import StageModel
from builder.engine.sampling import (
    Bookkeeping,
    GenerationRequest,
    GenerationResult,
    RequestState,
    choose,
    max_new_tokens,
    new_sequence,
)


def peak_rss_bytes() -> int:
    """This program's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that over from the parent
    across fork + exec, so a worker started from a large process would report its parent's peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Engine:
    """One rank's engine. Every method is collective: call it on all ranks with the same arguments."""

    def __init__(self, bundle: EngineBundle, comm: Comm, *, dtype: torch.dtype = torch.float32,
                 absorb_mla: bool | None = None, tensors: dict[str, torch.Tensor] | None = None):
        self.bundle, self.comm, self.dtype = bundle, comm, dtype
        if tensors is None:
            tensors = bundle.load_rank(comm.rank, dtype=dtype, device=comm.device)
        self.model = StageModel(bundle, comm, tensors, dtype=dtype, absorb_mla=absorb_mla)
        self.cfg = bundle.cfg

    # ----- one forward step -----
    def hidden(self, tokens: torch.Tensor, pos: StepPositions, cache: KVCache, *,
               decode: bool | None = None, sends: list | None = None) -> torch.Tensor | None:
        """Final hidden states before the norm ([B, S, H]) on last-stage ranks, None on the others. ``decode``
        forces the decode attention path (absorbed MLA) for a multi-token step, as speculative verification uses.
        With ``sends``, the hand-off to the next stage is asynchronous and its handle is appended there."""
        comm, model = self.comm, self.model
        B, S = tokens.shape
        if model.attention_dp:
            tokens, pos = self._my_rows(tokens, pos)
        with torch.inference_mode():
            if comm.first_stage:
                h = model.embed(tokens.to(comm.device))
            else:
                h = comm.recv_prev((tokens.shape[0], S, self.cfg.hidden_size), self.dtype)
            h = model.layers_forward(h, cache, model.step_context(pos, decode=decode))
            if not comm.last_stage:
                if sends is None:
                    comm.send_next(h)
                else:
                    sends.append(comm.isend_next(h))
                return None
            if model.attention_dp:
                h = comm.all_gather_tp(h, dim=0)[:B]
            return h

    def _my_rows(self, tokens: torch.Tensor, pos: StepPositions) -> tuple[torch.Tensor, StepPositions]:
        """Attention-DP: this TP rank's contiguous share of the batch (padded with copies of row 0 so every rank
        runs the same shapes; padding rows have their own cache rows and their results are dropped)."""
        B, rows = tokens.shape[0], self.model.rows_per_rank(tokens.shape[0])
        pad = rows * self.comm.tp - B
        starts = pos.starts
        if pad:
            tokens = torch.cat([tokens, tokens[:1].expand(pad, -1)])
            starts = torch.cat([starts, starts[:1].expand(pad)])
        mine = slice(self.comm.tp_rank * rows, (self.comm.tp_rank + 1) * rows)
        return tokens[mine], StepPositions(starts[mine], pos.width)

    def forward(self, tokens: torch.Tensor, pos: StepPositions, cache: KVCache,
                last_index: torch.Tensor | None, *, sends: list | None = None) -> torch.Tensor | None:
        """Logits on last-stage ranks ([B, V] at ``last_index`` per row, or [B, S, V] when it is None)."""
        B = tokens.shape[0]
        h = self.hidden(tokens, pos, cache, sends=sends)
        with torch.inference_mode():
            if h is None:
                return None
            if last_index is not None:
                h = h[torch.arange(B, device=h.device), last_index.to(h.device)]
            return self.model.logits(h)

    def _batch(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        tokens = torch.zeros(len(prompts), int(lens.max()), dtype=torch.long)
        for b, p in enumerate(prompts):
            tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        return tokens, lens

    # ----- collective operations -----
    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor] | None:
        """Logits at every prompt position ([len, V] per prompt, float32), returned on rank 0 (None elsewhere)."""
        tokens, lens = self._batch(prompts)
        B, S = tokens.shape
        cache = self.model.new_cache(batch=B, capacity=S)
        logits = self.forward(tokens, StepPositions(torch.zeros(B, dtype=torch.long, device=self.comm.device), S),
                              cache, None)
        logits = self._to_rank0(logits, (B, S, self.cfg.vocab_size))
        if self.comm.rank != 0:
            return None
        return [logits[b, : int(lens[b])].float().cpu() for b in range(B)]

    def _to_rank0(self, x: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
        src = self.comm.sampler_rank
        if src == 0:
            return x
        if self.comm.rank == src:
            self.comm.send(x, dst=0)
        elif self.comm.rank == 0:
            return self.comm.recv(shape, self.dtype, src=src)
        return x

    def generate(self, requests: list[GenerationRequest], *, on_token: Callable[[int, int], None] | None = None,
                 micro_batches: bool = True) -> list[GenerationResult]:
        """Plain decoding (``builder.engine.speculative`` decodes speculatively on top of this engine).
        ``micro_batches``: with PP, overlap the stages on micro-batches of the requests (False: the whole batch goes
        through the stages one after another, for comparison)."""
        if micro_batches and self.comm.layout.pp > 1 and len(requests) > 1:
            return self._generate_pipelined(requests, on_token)
        batch = RunningBatch(self, on_token=on_token)
        batch.join(list(enumerate(requests)))
        states = list(batch.seqs)
        while True:
            batch.retire()
            if not batch.seqs:
                return [s.result() for s in states]
            batch.step()

    def _generate_pipelined(self, requests: list[GenerationRequest],
                            on_token: Callable[[int, int], None] | None) -> list[GenerationResult]:
        """PP > 1: the batch split into ``pp`` micro-batches that move through the stages one tick apart, so each
        stage works on a different micro-batch at the same time (as TensorRT-LLM's executor overlaps PP
        micro-batches; one batch would leave all stages but one idle). Micro-batch ``g`` enters stage 0 at ticks
        ``t = g (mod pp)``, reaches the last stage ``pp - 1`` ticks later, and its sampled tokens are broadcast at
        the end of that tick, just in time for its next entry. Every rank runs the same schedule; hand-offs
        between stages are asynchronous so that no stage waits for the next one to be free."""
        comm, pp = self.comm, self.comm.layout.pp
        book = Bookkeeping(requests, comm, on_token)
        groups = [_MicroBatch(self, [int(b) for b in rows], requests)
                  for rows in torch.arange(len(requests)).tensor_split(min(pp, len(requests)))]
        entered: dict[int, int] = {}  # tick -> micro-batch that entered stage 0 then
        sends: list = []
        t = 0
        while not all(g.done for g in groups):
            g = t % pp
            if g < len(groups) and not groups[g].done:
                entered[t] = g
            mine = entered.get(t - comm.pp_rank)  # the micro-batch at this rank's stage now
            logits = None
            if mine is not None:
                logits = groups[mine].forward(sends)
            finished = entered.get(t - (pp - 1))  # the micro-batch at the last stage now
            if finished is not None:
                mb = groups[finished]
                mb.advance(book.choose(mb.rows, logits))
                mb.done = all(book.done(b) for b in mb.rows)
            for work in sends:
                work.wait()
            sends.clear()
            t += 1
        return book.results()

    def rank_stats(self) -> list[dict[str, int]] | None:
        """Per rank (on rank 0): peak and current RSS, bytes of loaded weights, tensor bytes of its rank file."""
        weights = sum(t.numel() * t.element_size() for t in self.model.w.t.values())
        rss = psutil.Process().memory_info().rss
        mine = torch.tensor([max(peak_rss_bytes(), rss),  # the kernel's high-water mark can lag the current RSS
                             rss, weights,
                             self.bundle.tensor_bytes(self.comm.rank)], dtype=torch.int64, device=self.comm.device)
        rows = [mine]
        if self.comm.distributed:
            rows = [torch.empty_like(mine) for _ in range(self.bundle.world_size)]
            dist.all_gather(rows, mine)
        if self.comm.rank != 0:
            return None
        keys = ("peak_rss_bytes", "rss_bytes", "loaded_weight_bytes", "shard_bytes")
        return [dict(zip(keys, map(int, r.cpu().tolist()))) for r in rows]


class _MicroBatch:
    """One micro-batch of a pipelined generation: its requests, its own cache on this rank's stage, and the input
    of its next step (the prompts first, then the tokens just chosen)."""

    def __init__(self, engine: Engine, rows: list[int], requests: list[GenerationRequest]):
        self.engine, self.rows, self.done = engine, rows, False
        self.tokens, self.lens = engine._batch([requests[b].prompt_ids for b in rows])
        capacity = int(self.lens.max()) + max_new_tokens([requests[b] for b in rows])
        self.cache = engine.model.new_cache(batch=len(rows), capacity=capacity)
        self.step = -1  # -1: the prompt (prefill) is next

    def forward(self, sends: list) -> torch.Tensor | None:
        """This rank's stage of the micro-batch's next step; [rows, V] logits on the last stage."""
        device = self.engine.comm.device
        if self.step < 0:
            pos = StepPositions(torch.zeros(len(self.rows), dtype=torch.long, device=device), self.tokens.shape[1])
            return self.engine.forward(self.tokens, pos, self.cache, self.lens - 1, sends=sends)
        pos = StepPositions((self.lens + self.step).to(device), 1)
        logits = self.engine.forward(self.tokens, pos, self.cache, None, sends=sends)
        return None if logits is None else logits[:, 0]

    def advance(self, chosen: torch.Tensor) -> None:
        self.tokens = chosen[:, None].cpu()
        self.step += 1


class RunningBatch:
    """Plain decoding of a batch whose requests join and leave at token boundaries, as TensorRT-LLM's in-flight
    batching does. Collective: every rank applies the same joins, steps and leaves in the same order (the serving
    protocol in ``builder.engine.driver`` carries them), so every rank holds the same rows.

    Row ``b`` of the batch is row ``b`` of a pool of KV-cache rows; a request that joins is prefilled into the next
    free rows and its first token sampled; :meth:`step` feeds every row's pending token through the model and
    samples the next; :meth:`retire` drops the finished rows, moving the last rows into their places so the live
    rows stay contiguous (one row copy per layer). Under attention-DP a row's cache lives on the TP rank whose share
    of the batch it is in, and shares shift when the batch changes size, so there finished rows stay in the batch
    (as padding, their tokens ignored) and requests join only an empty batch."""

    def __init__(self, engine: Engine, *, on_token: Callable[[Any, int], None] | None = None):
        self.engine, self.comm, self.on_token = engine, engine.comm, on_token
        self.seqs: list[RequestState] = []
        self.pending = torch.zeros(0, dtype=torch.long)  # [B] each row's next input: its last chosen token
        self.positions = torch.zeros(0, dtype=torch.long)  # [B] the position that token takes
        self.cache: KVCache | None = None
        self.regroups = not engine.model.attention_dp

    @property
    def accepts_joins(self) -> bool:
        return self.regroups or not self.seqs

    def join(self, items: list[tuple[Any, GenerationRequest]]) -> list[RequestState]:
        """Prefill the requests (``(key, request)`` pairs, already validated) into new rows and choose their first
        tokens; returns their states."""
        if not items:
            return []
        if not self.accepts_joins:
            raise RuntimeError("requests can join an attention-DP batch only when it is empty")
        engine, comm = self.engine, self.comm
        requests = [r for _, r in items]
        tokens, lens = engine._batch([r.prompt_ids for r in requests])
        B, n = len(self.seqs), len(items)
        if self.regroups:
            need = -(-max(len(r.prompt_ids) + r.sampling.max_tokens for r in requests) // 64) * 64
            if self.cache is None:
                self.cache = engine.model.new_cache(batch=n, capacity=need)
            else:  # rows double when they run out, so a growing batch copies its cache O(log B) times
                rows = B + n if B + n <= self.cache.rows else max(B + n, 2 * self.cache.rows)
                self.cache = self.cache.grown(rows=rows, capacity=need)
            cache = self.cache.view(B, B + n)
        else:  # finished rows keep stepping until all are done: room for the longest request's whole run
            self.cache = cache = engine.model.new_cache(batch=n, capacity=int(lens.max()) + max_new_tokens(requests))
        zeros = torch.zeros(n, dtype=torch.long, device=comm.device)
        logits = engine.forward(tokens, StepPositions(zeros, tokens.shape[1]), cache, lens - 1)
        states = [new_sequence(key, r, comm) for key, r in items]
        self.seqs += states
        first = choose(comm, states, logits, self.on_token)
        self.pending = torch.cat([self.pending, first.cpu()])
        self.positions = torch.cat([self.positions, lens])
        return states

    def step(self) -> None:
        """One token for every row: its pending token through the model, the next one chosen."""
        comm, B = self.comm, len(self.seqs)
        cache = self.cache.view(0, B) if self.regroups else self.cache
        logits = self.engine.forward(self.pending[:, None], StepPositions(self.positions.to(comm.device), 1), cache,
                                     None)
        if logits is not None:
            logits = logits[:, 0]
        self.pending = choose(comm, self.seqs, logits, self.on_token).cpu()
        self.positions = self.positions + 1

    def end(self, keys, reason: str = "cancelled") -> None:
        """End the running requests named by ``keys`` (the caller's cancellation); :meth:`retire` removes them."""
        wanted = set(keys)
        for s in self.seqs:
            if s.key in wanted and not s.done:
                s.reason = reason

    def retire(self) -> list[RequestState]:
        """Remove the finished rows (under attention-DP only once all are finished); returns them."""
        done = [b for b, s in enumerate(self.seqs) if s.done]
        if not done or (not self.regroups and len(done) < len(self.seqs)):
            return []
        if not self.regroups:
            gone, self.seqs = self.seqs, []
            self.pending, self.positions, self.cache = self.pending[:0], self.positions[:0], None
            return gone
        gone = [self.seqs[b] for b in done]
        # The last live rows move into the holes below them: one row copy per finished row at most.
        n = len(self.seqs) - len(done)
        holes = [b for b in range(n) if self.seqs[b].done]
        movers = [b for b in range(n, len(self.seqs)) if not self.seqs[b].done]
        perm = list(range(n))
        for dst, src in zip(holes, movers):
            self.cache.move_row(src, dst)
            perm[dst] = src
        self.seqs = [self.seqs[b] for b in perm]
        self.pending, self.positions = self.pending[perm], self.positions[perm]
        return gone
