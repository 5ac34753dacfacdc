"""Collective execution of requests on every rank: batched prefill with right padding, batched decode over
per-sequence caches, PP hand-off of activations, sampling on one rank and a broadcast of the chosen tokens.

Every rank runs the same loop on the same (broadcast) requests, so all ranks agree on shapes and on when to stop
without further messages; only the sampled tokens travel each step.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from builder.errors import RequestError
from builder.model.config import ModelConfig
from builder.engine.bundle import EngineBundle
from builder.engine.distributed import Comm
from builder.engine.kv_cache import KVCache, StepPositions
from builder.engine.model import StageModel


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    # TensorRT-LLM's SamplingParams: subtracted from a token's logit once it occurs at all (presence) and per
    # occurrence (frequency), counting the prompt and the generated tokens (prompt_ignore_length 0). See penalize.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens; a stop token ends generation and is not included
    finish_reason: str  # "length" | "stop"
    total_draft_tokens: int = 0
    total_accepted_draft_tokens: int = 0
    target_forwards: int = 0  # forward passes of the target model that served this request (prefill included)

    @property
    def acceptance_rate(self) -> float:
        return self.total_accepted_draft_tokens / self.total_draft_tokens if self.total_draft_tokens else 0.0


def validate_request(req: GenerationRequest, cfg: ModelConfig, index: int = 0) -> None:
    what = f"request {index}"
    if not req.prompt_ids:
        raise RequestError(f"{what} has an empty prompt")
    bad = [t for t in list(req.prompt_ids) + list(req.stop_token_ids) if not 0 <= int(t) < cfg.vocab_size]
    if bad:
        raise RequestError(f"{what} has token id {bad[0]} outside the vocabulary of {cfg.vocab_size}")
    if req.max_tokens < 1:
        raise RequestError(f"{what} asks for max_tokens {req.max_tokens}; it must be at least 1")
    if len(req.prompt_ids) + req.max_tokens > cfg.max_position_embeddings:
        raise RequestError(f"{what} needs {len(req.prompt_ids) + req.max_tokens} positions, more than the model's "
                           f"{cfg.max_position_embeddings}")
    if not req.temperature >= 0:
        raise RequestError(f"{what} has temperature {req.temperature}; it must be >= 0")
    if req.top_k < 0:
        raise RequestError(f"{what} has top_k {req.top_k}; it must be >= 0 (0 = off)")
    if not 0 < req.top_p <= 1:
        raise RequestError(f"{what} has top_p {req.top_p}; it must be in (0, 1]")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RequestError(f"{what} has {name} {value!r}; it must be a finite number")


def penalize(logits: torch.Tensor, history: Sequence[int], *, presence_penalty: float,
             frequency_penalty: float) -> torch.Tensor:
    """A row of logits minus ``frequency_penalty * count[t] + presence_penalty * (count[t] > 0)``, where
    ``count[t]`` is how often token t occurs in ``history`` (the prompt and the tokens generated so far)."""
    if presence_penalty == 0 and frequency_penalty == 0:
        return logits
    counts = torch.bincount(torch.as_tensor(list(history), dtype=torch.long), minlength=logits.shape[-1])
    counts = counts[: logits.shape[-1]].to(logits.dtype)
    return logits - frequency_penalty * counts - presence_penalty * (counts > 0).to(logits.dtype)


def adjusted_logits(logits: torch.Tensor, req: GenerationRequest, history: Sequence[int] = ()) -> torch.Tensor:
    """A row of logits as float32 on the host, divided by the temperature (when sampling) and then penalized:
    TensorRT-LLM's order (cpp/tensorrt_llm/kernels/penaltyKernels.cu, batchApplyPenalty: the logit is multiplied
    by 1/temperature, then the presence and frequency penalties are subtracted). Greedy requests penalize the raw
    logits and take the argmax. ``history``: the request's prompt and generated tokens (unused without
    penalties)."""
    logits = logits.to(torch.float32).cpu()
    if req.temperature > 0:
        logits = logits / req.temperature
    return penalize(logits, history, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty)


def sample(logits: torch.Tensor, req: GenerationRequest, gen: torch.Generator | None,
           history: Sequence[int] = ()) -> int:
    """One token from a row of logits: greedy at temperature 0, else temperature, penalties, top-k, top-p, a seeded
    draw (sampling and its seeded generator on the host)."""
    if req.temperature == 0:
        return int(torch.argmax(adjusted_logits(logits, req, history)))
    return int(torch.multinomial(probabilities(logits, req, history), 1, generator=gen))


def probabilities(logits: torch.Tensor, req: GenerationRequest, history: Sequence[int] = ()) -> torch.Tensor:
    """The sampling distribution of a row of logits (temperature > 0): temperature, penalties, then top-k, then
    top-p. Speculative sampling applies this same function to the target's and the draft's logits (with the same
    history, so that both distributions are the penalized ones)."""
    logits = adjusted_logits(logits, req, history)
    if 0 < req.top_k < logits.numel():
        kth = torch.topk(logits, req.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if req.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = torch.cumsum(probs, dim=-1) - probs > req.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return torch.softmax(logits, dim=-1)


def peak_rss_bytes() -> int:
    """This program's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that over from the parent
    across fork + exec, so a worker started from a large process would report its parent's peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

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

    def generate(self, requests: list[GenerationRequest], *,
                 on_token: Callable[[int, int], None] | None = None,
                 speculative: dict[str, Any] | None = None, micro_batches: bool = True) -> list[GenerationResult]:
        """``micro_batches``: with PP, overlap the stages on micro-batches of the requests (False: the whole batch
        goes through the stages one after another, for comparison)."""
        if speculative and speculative.get("mode", "none") != "none":
            from builder.engine.speculative import SpeculativeDecoder, SpeculativeOptions

            return SpeculativeDecoder(self, SpeculativeOptions.from_dict(speculative)).generate(
                requests, on_token=on_token)
        if micro_batches and self.comm.layout.pp > 1 and len(requests) > 1:
            return self._generate_pipelined(requests, on_token)
        comm = self.comm
        B = len(requests)
        tokens, lens = self._batch([r.prompt_ids for r in requests])
        capacity = int(lens.max()) + max(r.max_tokens for r in requests)
        cache = self.model.new_cache(batch=B, capacity=capacity)
        book = Bookkeeping(requests, comm, on_token)
        zeros = torch.zeros(B, dtype=torch.long, device=comm.device)
        logits = self.forward(tokens, StepPositions(zeros, tokens.shape[1]), cache, lens - 1)
        step = 0
        while True:
            chosen = book.choose(range(B), logits)
            if book.all_done():
                break
            starts = (lens + step).to(comm.device)  # the position of the token just chosen
            logits = self.forward(chosen[:, None].cpu(), StepPositions(starts, 1), cache, None)
            if logits is not None:
                logits = logits[:, 0]
            step += 1
        return book.results()

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
                mb.done = all(book.reasons[b] is not None for b in mb.rows)
            for work in sends:
                work.wait()
            sends.clear()
            t += 1
        return book.results()

    def rank_stats(self) -> list[dict[str, int]] | None:
        """Per rank (on rank 0): peak and current RSS, bytes of loaded weights, tensor bytes of its rank file."""
        import psutil

        weights = sum(t.numel() * t.element_size() for t in self.model.w.t.values())
        rss = psutil.Process().memory_info().rss
        mine = torch.tensor([max(peak_rss_bytes(), rss),  # the kernel's high-water mark can lag the current RSS
                             rss, weights,
                             self.bundle.tensor_bytes(self.comm.rank)], dtype=torch.int64, device=self.comm.device)
        rows = [mine]
        if self.comm.distributed:
            import torch.distributed as dist

            rows = [torch.empty_like(mine) for _ in range(self.bundle.world_size)]
            dist.all_gather(rows, mine)
        if self.comm.rank != 0:
            return None
        keys = ("peak_rss_bytes", "rss_bytes", "loaded_weight_bytes", "shard_bytes")
        return [dict(zip(keys, map(int, r.cpu().tolist()))) for r in rows]

    # ----- the command loop of ranks other than 0 -----
    def run_command(self, cmd: dict[str, Any]) -> Any:
        op = cmd.get("op")
        if op == "stats":
            return self.rank_stats()
        if op == "generate":
            return self.generate([GenerationRequest(**r) for r in cmd["requests"]], speculative=cmd.get("speculative"),
                                 micro_batches=cmd.get("micro_batches", True))
        if op == "logits":
            return self.prompt_logits(cmd["prompts"])
        raise ValueError(f"unknown engine command {op!r}")

    def serve(self) -> None:
        """Ranks 1..N-1: execute rank 0's commands until it broadcasts a stop."""
        while True:
            cmd = self.comm.broadcast_json(src=0)
            if cmd.get("op") == "stop":
                return
            self.run_command(cmd)


class Bookkeeping:
    """Per-request sampling state and results, the same on every rank: the sampler rank draws each request's
    token with the request's own seeded generator, broadcasts the chosen tokens, and every rank records them (stop
    tokens, length limits, streaming). Plain, pipelined and speculative decoding share it."""

    def __init__(self, requests: list[GenerationRequest], comm: Comm, on_token: Callable[[int, int], None] | None):
        self.requests, self.comm, self.on_token = requests, comm, on_token
        self.sampler = comm.rank == comm.sampler_rank
        self.gens = []
        if self.sampler:
            for r in requests:
                g = torch.Generator()
                g.manual_seed(r.seed if r.seed is not None else secrets.randbits(63))
                self.gens.append(g)
        self.out: list[list[int]] = [[] for _ in requests]
        self.reasons: list[str | None] = [None] * len(requests)
        self.stops = [set(r.stop_token_ids) for r in requests]

    def choose(self, rows, logits: torch.Tensor | None) -> torch.Tensor:
        """Sample the next token of requests ``rows`` (row i of ``logits`` belongs to ``rows[i]``) on the sampler
        rank, broadcast them, record them everywhere; returns them (0 for requests already finished)."""
        rows = list(rows)
        chosen = torch.zeros(len(rows), dtype=torch.long, device=self.comm.device)
        if self.sampler:
            chosen = torch.tensor([sample(logits[i], self.requests[b], self.gens[b], self.history(b))
                                   if self.reasons[b] is None else 0 for i, b in enumerate(rows)],
                                  dtype=torch.long, device=self.comm.device)
        self.comm.broadcast(chosen, src=self.comm.sampler_rank)
        for b, t in zip(rows, chosen.cpu().tolist()):
            self.record(b, [t])
        return chosen

    def history(self, b: int) -> list[int]:
        """Request ``b``'s prompt and generated tokens, which its penalties count (empty when it has none)."""
        req = self.requests[b]
        return list(req.prompt_ids) + self.out[b] if req.penalized else []

    def record(self, b: int, tokens: list[int]) -> None:
        """Append request ``b``'s new tokens until a stop token (not kept) or its ``max_tokens`` ends it."""
        for t in tokens:
            if self.reasons[b] is not None:
                return
            if t in self.stops[b]:
                self.reasons[b] = "stop"
                return
            self.out[b].append(t)
            if self.on_token is not None and self.comm.rank == 0:
                self.on_token(b, t)
            if len(self.out[b]) >= self.requests[b].max_tokens:
                self.reasons[b] = "length"

    def all_done(self) -> bool:
        return all(r is not None for r in self.reasons)

    def results(self) -> list[GenerationResult]:
        return [GenerationResult(token_ids=o, finish_reason=r, target_forwards=len(o) + (r == "stop"))
                for o, r in zip(self.out, self.reasons)]


class _MicroBatch:
    """One micro-batch of a pipelined generation: its requests, its own cache on this rank's stage, and the input
    of its next step (the prompts first, then the tokens just chosen)."""

    def __init__(self, engine: Engine, rows: list[int], requests: list[GenerationRequest]):
        self.engine, self.rows, self.done = engine, rows, False
        self.tokens, self.lens = engine._batch([requests[b].prompt_ids for b in rows])
        capacity = int(self.lens.max()) + max(requests[b].max_tokens for b in rows)
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


class Driver:
    """Rank 0's side: broadcast a command, then take part in it."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def generate(self, requests: list[GenerationRequest], *,
                 on_token: Callable[[int, int], None] | None = None,
                 speculative: dict[str, Any] | None = None, micro_batches: bool = True) -> list[GenerationResult]:
        """``speculative``: ``builder.engine.speculative.SpeculativeOptions`` as a dict (None: plain decoding)."""
        for i, r in enumerate(requests):
            validate_request(r, self.engine.cfg, i)
        if speculative and speculative.get("mode", "none") != "none":
            from builder.engine.speculative import SpeculativeOptions, check_options

            speculative = SpeculativeOptions.from_dict(speculative).to_dict()
            check_options(self.engine.bundle, SpeculativeOptions.from_dict(speculative), requests)
        self.engine.comm.broadcast_json({"op": "generate", "requests": [r.to_dict() for r in requests],
                                         "speculative": speculative, "micro_batches": micro_batches}, src=0)
        return self.engine.generate(requests, on_token=on_token, speculative=speculative,
                                    micro_batches=micro_batches)

    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        for i, p in enumerate(prompts):
            validate_request(GenerationRequest(prompt_ids=list(p), max_tokens=1), self.engine.cfg, i)
        self.engine.comm.broadcast_json({"op": "logits", "prompts": [list(map(int, p)) for p in prompts]}, src=0)
        return self.engine.prompt_logits(prompts)

    def rank_stats(self) -> list[dict[str, int]]:
        self.engine.comm.broadcast_json({"op": "stats"}, src=0)
        return self.engine.rank_stats()

    def stop(self) -> None:
        self.engine.comm.broadcast_json({"op": "stop"}, src=0)
