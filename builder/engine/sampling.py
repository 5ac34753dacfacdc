"""Requests and sampling in the reference engine: a request (prompt ids + ``SamplingParams`` + stop tokens), its
result, the sampling math (temperature, penalties, top-k, top-p, a seeded draw) and the per-request bookkeeping
that plain, pipelined and speculative decoding share.

Sampling runs on one rank (the sampler rank, TP rank 0 of the last stage) with each request's own seeded
generator; the chosen tokens are broadcast, and every rank records them the same way.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from builder.engine.distributed import Comm
from builder.errors import RequestError
from builder.model.config import ModelConfig
from builder.sampling_params import SamplingParams


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_ids": list(self.prompt_ids), "sampling": self.sampling.to_dict(),
                "stop_token_ids": list(self.stop_token_ids)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationRequest":
        return cls(prompt_ids=list(data["prompt_ids"]), sampling=SamplingParams.from_dict(data["sampling"]),
                   stop_token_ids=list(data.get("stop_token_ids", [])))


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
    """What the model can take: a prompt in its vocabulary that fits its positions, valid sampling parameters."""
    what = f"request {index}"
    if not req.prompt_ids:
        raise RequestError(f"{what} has an empty prompt")
    bad = [t for t in list(req.prompt_ids) + list(req.stop_token_ids) if not 0 <= int(t) < cfg.vocab_size]
    if bad:
        raise RequestError(f"{what} has token id {bad[0]} outside the vocabulary of {cfg.vocab_size}")
    try:
        req.sampling.validate()
    except RequestError as exc:
        raise RequestError(f"{what}: {exc}") from None
    if len(req.prompt_ids) + req.sampling.max_tokens > cfg.max_position_embeddings:
        raise RequestError(f"{what} needs {len(req.prompt_ids) + req.sampling.max_tokens} positions, more than the "
                           f"model's {cfg.max_position_embeddings}")


def penalize(logits: torch.Tensor, history: Sequence[int], *, presence_penalty: float,
             frequency_penalty: float) -> torch.Tensor:
    """A row of logits minus ``frequency_penalty * count[t] + presence_penalty * (count[t] > 0)``, where
    ``count[t]`` is how often token t occurs in ``history`` (the prompt and the tokens generated so far)."""
    if presence_penalty == 0 and frequency_penalty == 0:
        return logits
    counts = torch.bincount(torch.as_tensor(list(history), dtype=torch.long), minlength=logits.shape[-1])
    counts = counts[: logits.shape[-1]].to(logits.dtype)
    return logits - frequency_penalty * counts - presence_penalty * (counts > 0).to(logits.dtype)


def adjusted_logits(logits: torch.Tensor, params: SamplingParams, history: Sequence[int] = ()) -> torch.Tensor:
    """A row of logits as float32 on the host, divided by the temperature (when sampling) and then penalized:
    TensorRT-LLM's order (cpp/tensorrt_llm/kernels/penaltyKernels.cu, batchApplyPenalty: the logit is multiplied
    by 1/temperature, then the presence and frequency penalties are subtracted). Greedy requests penalize the raw
    logits and take the argmax. ``history``: the request's prompt and generated tokens (unused without
    penalties)."""
    logits = logits.to(torch.float32).cpu()
    if params.temperature > 0:
        logits = logits / params.temperature
    return penalize(logits, history, presence_penalty=params.presence_penalty,
                    frequency_penalty=params.frequency_penalty)


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None,
           history: Sequence[int] = ()) -> int:
    """One token from a row of logits: greedy at temperature 0, else temperature, penalties, top-k, top-p, a seeded
    draw (sampling and its seeded generator on the host)."""
    if params.greedy:
        return int(torch.argmax(adjusted_logits(logits, params, history)))
    return int(torch.multinomial(probabilities(logits, params, history), 1, generator=gen))


def probabilities(logits: torch.Tensor, params: SamplingParams, history: Sequence[int] = ()) -> torch.Tensor:
    """The sampling distribution of a row of logits (temperature > 0): temperature, penalties, then top-k, then
    top-p. Speculative sampling applies this same function to the target's and the draft's logits (with the same
    history, so that both distributions are the penalized ones)."""
    logits = adjusted_logits(logits, params, history)
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = torch.cumsum(probs, dim=-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return torch.softmax(logits, dim=-1)


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
                g.manual_seed(r.sampling.seed if r.sampling.seed is not None else secrets.randbits(63))
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
            chosen = torch.tensor([sample(logits[i], self.requests[b].sampling, self.gens[b], self.history(b))
                                   if self.reasons[b] is None else 0 for i, b in enumerate(rows)],
                                  dtype=torch.long, device=self.comm.device)
        self.comm.broadcast(chosen, src=self.comm.sampler_rank)
        for b, t in zip(rows, chosen.cpu().tolist()):
            self.record(b, [t])
        return chosen

    def history(self, b: int) -> list[int]:
        """Request ``b``'s prompt and generated tokens, which its penalties count (empty when it has none)."""
        req = self.requests[b]
        return list(req.prompt_ids) + self.out[b] if req.sampling.penalized else []

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
            if len(self.out[b]) >= self.requests[b].sampling.max_tokens:
                self.reasons[b] = "length"

    def all_done(self) -> bool:
        return all(r is not None for r in self.reasons)

    def results(self) -> list[GenerationResult]:
        return [GenerationResult(token_ids=o, finish_reason=r, target_forwards=len(o) + (r == "stop"))
                for o, r in zip(self.out, self.reasons)]


def max_new_tokens(requests: list[GenerationRequest]) -> int:
    return max(r.sampling.max_tokens for r in requests)
