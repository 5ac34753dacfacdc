"""What a speculative drafter is: the protocol the MTP module (``builder.engine.mtp``) and a separate draft model
(``builder.engine.draft``) implement, the per-row decoding state every rank keeps identical, and how one round of
draft tokens is chosen on the sampler rank and shared with every rank."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from builder.engine.distributed import Comm
from builder.engine.sampling import GenerationRequest, adjusted_logits, probabilities
from builder.sampling_params import SamplingParams


@dataclass
class DraftRound:
    """What the sampler rank needs from one round of drafting (drafts are known on every rank)."""

    drafts: torch.Tensor  # [B, N] long
    q: list[list[torch.Tensor | None]] | None  # sampler rank: per row, per draft, the draft distribution


@dataclass
class DecodeState:
    """Per-row state every rank keeps identical: the pending token (emitted, not yet in the target's cache) and its
    position, the whole token history, which rows are still generating."""

    requests: list[GenerationRequest]
    draft_len: int
    pending: torch.Tensor  # [B] long
    positions: torch.Tensor  # [B] long: position of the pending token
    history: list[list[int]]
    active: list[bool]
    gens: list[torch.Generator] = field(default_factory=list)  # sampler rank only
    sampler: bool = False
    draft_errors: dict[int, str] = field(default_factory=dict)  # sampler rank: rows whose drafting raised


class Proposer(Protocol):
    def start(self, *, batch: int, capacity: int) -> None: ...

    def prefill(self, tokens: torch.Tensor, lens: torch.Tensor, normed: torch.Tensor | None,
                first: torch.Tensor) -> None: ...

    def propose(self, state: DecodeState) -> DraftRound: ...

    def accept(self, state: DecodeState, accepted: torch.Tensor, new_tokens: torch.Tensor, drafts: torch.Tensor,
               normed: torch.Tensor | None, old_positions: torch.Tensor) -> None: ...


def choose_draft(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None,
                 history: list[int] | None = None) -> tuple[int, torch.Tensor | None]:
    """A draft token from one row of drafter logits: argmax for greedy requests, else a draw from q (returned).
    ``history``: the tokens the request's penalties count at this draft (emitted tokens plus earlier drafts)."""
    history = history or []
    if params.greedy:
        return int(torch.argmax(adjusted_logits(logits, params, history))), None
    q = probabilities(logits, params, history)
    return int(torch.multinomial(q, 1, generator=gen)), q


def draft_tokens_collectively(comm: Comm, logits_rows: torch.Tensor | None, state: DecodeState,
                              q: list[list[torch.Tensor | None]], previous: list[torch.Tensor]) -> torch.Tensor:
    """One draft token per row: chosen on the sampler rank from ``logits_rows`` [B, V], broadcast to every rank.
    ``previous``: this round's drafts so far ([B] each), which a penalized request's history includes."""
    B = len(state.requests)
    chosen = torch.zeros(B, dtype=torch.long, device=comm.device)
    if state.sampler:
        picks = []
        for b, req in enumerate(state.requests):
            history = state.history[b] + [int(d[b]) for d in previous] if req.sampling.penalized else None
            try:
                t, dist = choose_draft(logits_rows[b], req.sampling, state.gens[b] if state.gens else None, history)
            except Exception as exc:  # this request fails at its verification; the broadcast goes on
                state.draft_errors.setdefault(b, f"{type(exc).__name__}: {exc}")
                t, dist = 0, None
            picks.append(t)
            q[b].append(dist)
        chosen = torch.tensor(picks, dtype=torch.long, device=comm.device)
    comm.broadcast(chosen, src=comm.sampler_rank)
    return chosen.cpu()
