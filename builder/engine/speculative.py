"""Speculative decoding in the reference engine: a drafter proposes N tokens, one multi-token forward of the target
verifies them all, and an acceptance rule keeps a prefix plus one token of the target's own.

Acceptance rules (per request):
- greedy (temperature 0): accept the longest prefix of drafts equal to the target's argmax, then emit the target's
  argmax at the first mismatch (or after the last draft): the output is plain greedy decoding's, token for token.
- sampling: standard speculative rejection sampling (Leviathan et al. 2023, Chen et al. 2023): accept draft x with
  probability min(1, p(x)/q(x)); on rejection draw from norm(max(0, p - q)); after N acceptances draw a bonus token
  from p. p and q are the target's and the drafter's distributions after the same temperature/penalties/top-k/top-p
  (``builder.engine.sampling.probabilities``), so the output follows the target's distribution exactly.

Presence/frequency penalties: the target's logits at verify position k and the drafter's logits for draft k are both
penalized with the same history, the emitted tokens (prompt included) plus drafts[:k], which is exactly what plain
decoding would count at that position; greedy verification compares drafts with the penalized argmax.

Caches need no copying on rejection: column t of every cache holds position t, a query at position p sees only
columns <= p, and the next step overwrites the rejected columns before anything can see them. That holds for the
target's MLA latent and DSA indexer caches, the MTP module's own caches and the draft model's caches.

Every rank runs :meth:`SpeculativeDecoder.generate` on the same broadcast requests; draft tokens and verification
outcomes travel from the sampler rank (TP rank 0 of the last stage) by broadcast.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from builder.engine.bundle import EngineBundle
from builder.engine.draft import DraftProposer, open_draft_bundle
from builder.engine.generate import Engine
from builder.engine.kv_cache import StepPositions
from builder.engine.mtp import MTPProposer, bundle_has_mtp
from builder.engine.proposer import DecodeState, Proposer
from builder.engine.sampling import (
    FAILED,
    Bookkeeping,
    GenerationRequest,
    GenerationResult,
    adjusted_logits,
    max_new_tokens,
    probabilities,
    share_failures,
)
from builder.errors import RequestError

MODES = ("mtp", "draft")
MAX_DRAFT_LEN = 16


@dataclass(frozen=True)
class SpeculativeOptions:
    """How to decode speculatively; made once (CLI, Triton model, torchrun task) and checked when made. Crosses to
    the other ranks as JSON (``to_dict``/``from_dict``) inside the engine's broadcast command."""

    mode: str  # "mtp" | "draft"
    draft_len: int = 3
    draft_engine: str | None = None  # the draft model's engine bundle (mode "draft"), an absolute path

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RequestError(f"speculative mode {self.mode!r} is not one of {', '.join(MODES)}")
        if isinstance(self.draft_len, bool) or not isinstance(self.draft_len, int) or \
                not 1 <= self.draft_len <= MAX_DRAFT_LEN:
            raise RequestError(f"draft length {self.draft_len} is outside 1..{MAX_DRAFT_LEN}")
        if self.mode == "draft" and not self.draft_engine:
            raise RequestError("speculative mode 'draft' needs a draft model's engine bundle (draft_engine)")
        if self.draft_engine:
            object.__setattr__(self, "draft_engine", str(Path(self.draft_engine).resolve()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SpeculativeOptions":
        unknown = set(data) - {"mode", "draft_len", "draft_engine"}
        if unknown:
            raise RequestError(f"unknown speculative option {sorted(unknown)[0]!r}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_options(bundle: EngineBundle, opts: SpeculativeOptions) -> None:
    """Rank 0, before anything is broadcast: the drafter exists and fits the target (a clear error, no hang)."""
    if opts.mode == "mtp":
        bundle_has_mtp(bundle, require=True)
    else:
        open_draft_bundle(opts.draft_engine, target=bundle)


# ---------------------------------------------------------------------------------------------------------------
# Acceptance rules (pure functions of one request's drafts and distributions)

def greedy_verify(drafts: list[int], target_logits: torch.Tensor) -> tuple[int, list[int]]:
    """``target_logits`` [N+1, V] at the pending token and each draft -> (accepted count, tokens to emit)."""
    best = torch.argmax(target_logits.to(torch.float32), dim=-1).tolist()
    a = 0
    while a < len(drafts) and drafts[a] == best[a]:
        a += 1
    return a, list(drafts[:a]) + [best[a]]


def standard_acceptance(p_x: torch.Tensor, q_x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(p_x / q_x, max=1.0)


def rejection_verify(drafts: list[int], q: torch.Tensor, p: torch.Tensor, gen: torch.Generator | None, *,
                     acceptance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = standard_acceptance
                     ) -> tuple[int, list[int]]:
    """Speculative rejection sampling. ``q`` [N, V]: the drafter's distributions the drafts were drawn from;
    ``p`` [N+1, V]: the target's at the pending token and after each draft. Returns (accepted, tokens to emit).
    ``acceptance`` is the acceptance probability (replaceable so that tests can show a wrong rule is caught)."""
    for k, x in enumerate(drafts):
        u = torch.rand((), generator=gen)
        if u < acceptance(p[k, x], q[k, x]):
            continue
        residual = torch.clamp(p[k] - q[k], min=0)
        total = residual.sum()
        # p <= q everywhere only when p == q, where rejection has probability 0; guard against rounding.
        dist = residual / total if total > 0 else p[k]
        return k, list(drafts[:k]) + [int(torch.multinomial(dist, 1, generator=gen))]
    return len(drafts), list(drafts) + [int(torch.multinomial(p[len(drafts)], 1, generator=gen))]


def make_proposer(engine: Engine, opts: SpeculativeOptions) -> Proposer:
    if opts.mode == "mtp":
        return MTPProposer(engine)
    return DraftProposer(engine, opts.draft_engine)


# ---------------------------------------------------------------------------------------------------------------
# The decoding loop

class SpeculativeDecoder:
    """Collective: every rank constructs it with the same options and calls :meth:`generate` with the same
    requests."""

    def __init__(self, engine: Engine, opts: SpeculativeOptions):
        self.engine, self.opts = engine, opts
        self.comm = engine.comm
        self.proposer = make_proposer(engine, opts)

    def generate(self, requests: list[GenerationRequest], *,
                 on_token: Callable[[int, int], None] | None = None) -> list[GenerationResult]:
        engine, comm, N = self.engine, self.comm, self.opts.draft_len
        B = len(requests)
        tokens, lens = engine._batch([r.prompt_ids for r in requests])
        # A row can finish with its pending token up to N + 1 positions past its last emitted token, and finished
        # rows keep being verified (at a fixed position) until the batch ends: room for 2N + 2 beyond the longest.
        capacity = int(lens.max()) + max_new_tokens(requests) + 2 * N + 2
        cache = engine.model.new_cache(batch=B, capacity=capacity)
        self.proposer.start(batch=B, capacity=capacity)
        book = Bookkeeping(requests, comm, on_token)
        sampler = book.sampler
        results = [GenerationResult(token_ids=s.out, finish_reason="length", target_forwards=1) for s in book.seqs]

        # Prefill: the target over the prompts, its first token exactly as plain decoding samples it.
        zeros = torch.zeros(B, dtype=torch.long, device=comm.device)
        # ``normed``: the target's final-normed hidden states (last stage), what both its LM head and the MTP
        # module read.
        normed = logits = None
        hidden = engine.hidden(tokens, StepPositions(zeros, tokens.shape[1]), cache)
        if comm.last_stage:  # every TP rank of the last stage takes part in the vocab all-gather
            with torch.inference_mode():
                normed = engine.model.final_norm(hidden)
                logits = engine.model.head_logits(normed[torch.arange(B, device=hidden.device),
                                                         (lens - 1).to(hidden.device)])
        first = book.choose(range(B), logits)
        first_ids = first.cpu().tolist()
        state = DecodeState(requests=requests, draft_len=N, pending=first.cpu(), positions=lens.clone(),
                            history=[list(r.prompt_ids) + [first_ids[b]] for b, r in enumerate(requests)],
                            active=[not book.done(b) for b in range(B)], gens=book.gens, sampler=sampler)
        self.proposer.prefill(tokens, lens, normed, first)

        while any(state.active):
            round_ = self.proposer.propose(state)
            drafts = round_.drafts.cpu()
            verify = torch.cat([state.pending[:, None], drafts], dim=1)  # [B, N+1]
            hidden = engine.hidden(verify, StepPositions(state.positions.to(comm.device), N + 1), cache, decode=True)
            outcome = torch.zeros(B, N + 2, dtype=torch.long, device=comm.device)  # [accepted, tokens...]
            if comm.last_stage:
                with torch.inference_mode():
                    normed = engine.model.final_norm(hidden)
                    logits = engine.model.head_logits(normed)  # [B, N+1, V] (collective over the last stage's TP)
            if sampler:
                outcome = self._verify(state, book, drafts, round_.q, logits).to(comm.device)
            comm.broadcast(outcome, src=comm.sampler_rank)
            outcome = outcome.cpu()
            failed = (outcome[:, 0] == FAILED).tolist()
            share_failures(comm, book.seqs, failed)
            outcome[:, 0].clamp_(min=0)
            accepted = outcome[:, 0].clone()
            new_tokens = torch.zeros(B, dtype=torch.long)
            old_positions = state.positions.clone()
            for b in range(B):
                a = int(accepted[b])
                new = outcome[b, 1:a + 2].tolist()
                new_tokens[b] = new[-1]
                if not state.active[b] or failed[b]:  # finished rows stay put (bounded cache use); their outputs
                    new_tokens[b] = state.pending[b]  # are ignored
                    state.active[b] = False
                    continue
                res = results[b]
                res.total_draft_tokens += N
                res.total_accepted_draft_tokens += a
                res.target_forwards += 1
                book.record(b, new)
                state.history[b].extend(new)
                state.positions[b] += a + 1
                state.active[b] = not book.done(b)
            accepted[state.positions == old_positions] = 0  # rows that were already finished
            self.proposer.accept(state, accepted, new_tokens, drafts, normed, old_positions)
            state.pending = new_tokens
        for b, seq in enumerate(book.seqs):
            results[b].finish_reason, results[b].error = seq.reason or "length", seq.error
        return results

    def _verify(self, state: DecodeState, book: Bookkeeping, drafts: torch.Tensor, q,
                logits: torch.Tensor) -> torch.Tensor:
        """Sampler rank: [accepted, tokens...] per row; accepted FAILED for a row whose drafting or verification
        raised (that request alone fails)."""
        B, N = drafts.shape
        out = torch.zeros(B, N + 2, dtype=torch.long)
        for b, req in enumerate(state.requests):
            if not state.active[b]:
                continue
            try:
                if b in state.draft_errors:
                    raise RuntimeError(state.draft_errors.pop(b))
                a, new = verify_row(req, state.history[b], drafts[b].tolist(), logits[b],
                                    None if req.sampling.greedy else q[b], state.gens[b])
            except Exception as exc:
                book.seqs[b].error = f"sampling failed: {type(exc).__name__}: {exc}"
                out[b, 0] = FAILED
                continue
            out[b, 0] = a
            out[b, 1:a + 2] = torch.tensor(new, dtype=torch.long)
        return out


def verify_row(req: GenerationRequest, history: list[int], drafts: list[int], logits: torch.Tensor,
               q: list[torch.Tensor] | None, gen: torch.Generator | None) -> tuple[int, list[int]]:
    """One request's verification: ``logits`` [N+1, V] are the target's at the pending token and after each draft,
    ``history`` the request's emitted tokens (prompt and pending token included). Position k is penalized as plain
    decoding would at that point: its history is ``history + drafts[:k]``. ``q``: the drafter's distributions
    (sampling only). Returns (accepted count, tokens to emit)."""
    positions, params = range(len(drafts) + 1), req.sampling
    if params.greedy:
        if params.penalized:
            logits = torch.stack([adjusted_logits(logits[k], params, history + drafts[:k]) for k in positions])
        return greedy_verify(drafts, logits)
    past = history if params.penalized else []
    p = torch.stack([probabilities(logits[k], params, past + drafts[:k]) for k in positions])
    return rejection_verify(drafts, torch.stack(q), p, gen)
