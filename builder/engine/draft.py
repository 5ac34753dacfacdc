"""A separate draft model (same tokenizer, DeepSeek architecture) as the speculative drafter of the reference engine.

The draft bundle is an ordinary engine bundle (``engines/draft/`` of a ``--spec draft`` run). In the reference
engine it runs whole on the sampler rank (a world of one: build it with TP1 PP1), beside the target's last-stage
shard; its draft tokens reach the other ranks by broadcast. It keeps its own latent and indexer caches; rejected
columns are simply overwritten (see ``builder.engine.speculative``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from builder.engine.bundle import EngineBundle
from builder.engine.distributed import make_comm
from builder.engine.generate import Engine
from builder.engine.kv_cache import StepPositions
from builder.engine.proposer import DecodeState, DraftRound, draft_tokens_collectively
from builder.errors import CheckpointError
from builder.layout import Layout


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def open_draft_bundle(path: str | Path | None, *, target: EngineBundle) -> EngineBundle:
    """The draft bundle at ``path``, checked against the target: one rank, same vocabulary and tokenizer."""
    if not path:
        raise CheckpointError("speculative mode 'draft' needs the draft model's engine bundle")
    draft = EngineBundle.open(path)
    if draft.world_size != 1:
        raise CheckpointError(f"draft bundle {draft.root} is laid out for {draft.world_size} ranks; the reference "
                              "engine runs the draft model on one rank (build it with TP1 PP1)")
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise CheckpointError(f"draft model vocabulary {draft.cfg.vocab_size} differs from the target's "
                              f"{target.cfg.vocab_size}; a draft model must share the target's tokenizer")
    mine, theirs = _digest(draft.root / "tokenizer.json"), _digest(target.root / "tokenizer.json")
    if mine and theirs and mine != theirs:
        raise CheckpointError(f"draft bundle {draft.root} has a different tokenizer.json from the target's; a draft "
                              "model must share the target's tokenizer")
    return draft


def _draft_engine(engine: Engine, path: str) -> Engine:
    """The draft model's engine on this (sampler) rank, loaded once per target engine and path."""
    loaded = engine.__dict__.setdefault("_draft_engines", {})
    if path not in loaded:
        bundle = open_draft_bundle(path, target=engine.bundle)
        comm = make_comm(Layout(tp=1, pp=1, ep=1), rank=0, device=str(engine.comm.device))
        loaded[path] = Engine(bundle, comm, dtype=engine.dtype)
    return loaded[path]


class DraftProposer:
    def __init__(self, engine: Engine, path: str):
        self.comm = engine.comm
        self.sampler = engine.comm.rank == engine.comm.sampler_rank
        self.draft = _draft_engine(engine, path) if self.sampler else None

    def start(self, *, batch: int, capacity: int) -> None:
        if self.draft is not None:
            self.cache = self.draft.model.new_cache(batch=batch, capacity=capacity)
        self.cached = torch.zeros(batch, dtype=torch.long)  # draft cache columns that hold the true history

    def prefill(self, tokens, lens, normed, first) -> None:
        if self.draft is not None:
            B, S = tokens.shape
            zeros = torch.zeros(B, dtype=torch.long, device=self.draft.comm.device)
            self.draft.forward(tokens, StepPositions(zeros, S), self.cache, None)
        self.cached = lens.clone()

    def _forward(self, rows: list[list[int]], starts: torch.Tensor) -> torch.Tensor:
        """Draft logits after feeding each row's tokens at its start position (right-padded): [B, V]."""
        B = len(rows)
        width = max(len(r) for r in rows)
        tokens = torch.zeros(B, width, dtype=torch.long)
        for b, r in enumerate(rows):
            tokens[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        last = torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)
        return self.draft.forward(tokens, StepPositions(starts.to(self.draft.comm.device), width), self.cache, last)

    def propose(self, state: DecodeState) -> DraftRound:
        B, N = len(state.requests), state.draft_len
        q = [[] for _ in range(B)]
        drafts: list[torch.Tensor] = []
        logits = None
        for k in range(N):
            if self.draft is not None:
                if k == 0:  # catch up: the history from the first uncached column through the pending token
                    rows = [state.history[b][int(self.cached[b]):int(state.positions[b]) + 1] for b in range(B)]
                    logits = self._forward(rows, self.cached)
                else:
                    logits = self._forward([[int(t)] for t in drafts[-1]], state.positions + k)
            drafts.append(draft_tokens_collectively(self.comm, logits, state, q, drafts))
        return DraftRound(torch.stack(drafts, dim=1), q if state.sampler else None)

    def accept(self, state, accepted, new_tokens, drafts, normed, old_positions) -> None:
        # Drafting cached the pending token and drafts 1..N-1: the accepted ones stay valid.
        N = drafts.shape[1]
        self.cached = torch.minimum(old_positions + torch.clamp(accepted, max=N - 1) + 1, state.positions)
