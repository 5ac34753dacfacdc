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
    finish_reason: str  # "length" | "stop" | "cancelled" | "error"
    total_draft_tokens: int = 0
    total_accepted_draft_tokens: int = 0
    target_forwards: int = 0  # forward passes of the target model that served this request (prefill included)
    error: str | None = None  # finish_reason "error": why this request (and only it) failed

    @property
    def acceptance_rate(self) -> float:
        return self.total_accepted_draft_tokens / self.total_draft_tokens if self.total_draft_tokens else 0.0


def validate_request(req: GenerationRequest, cfg: ModelConfig, index: int | None = 0) -> None:
    """What the model can take: a prompt in its vocabulary that fits its positions, valid sampling parameters.
    Errors name ``request INDEX`` (a request of a batch call) or, for None, "the request"."""
    what = "the request" if index is None else f"request {index}"
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


# A token id the sampler rank broadcasts in place of a request's token when its sampling failed: every rank then ends
# that request (finish_reason "error") and only that request.
FAILED = -1


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
    """A row of logits as float64 on the host, divided by the temperature (when sampling) and then penalized:
    TensorRT-LLM's order (cpp/tensorrt_llm/kernels/penaltyKernels.cu, batchApplyPenalty: the logit is multiplied
    by 1/temperature, then the presence and frequency penalties are subtracted). Greedy requests penalize the raw
    logits and take the argmax. ``history``: the request's prompt and generated tokens (unused without
    penalties).

    Overflow-safe by construction (docs/sampling.md): the logits are finite FP32 values (checked here: a model that
    produced NaN/Inf fails this request), ``SamplingParams.validate`` keeps the temperature 0 or >= 2**-149 and
    |penalty| <= FP32_MAX, and a count is at most the context length (< 2**31); so |logit / temperature| < 2.5e83
    and |penalty * count| < 7.4e47, far inside float64's 1.8e308, and no value here is ever Inf or NaN."""
    logits = logits.to(torch.float64).cpu()
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the model produced non-finite logits")
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
    """The sampling distribution of a row of logits (temperature > 0), float64: temperature, penalties, then
    top-k, then top-p. Speculative sampling applies this same function to the target's and the draft's logits
    (with the same history, so that both distributions are the penalized ones). The row's largest value is finite
    and softmax subtracts it, so the most likely token has probability >= 1/V and none is NaN: a temperature far
    below the logits' spacing gives the argmax (ties shared), the limit of sampling as the temperature falls."""
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


def new_generator(request: GenerationRequest) -> torch.Generator:
    """The request's own generator (sampler rank): seeded by the request, else from the OS."""
    g = torch.Generator()
    g.manual_seed(request.sampling.seed if request.sampling.seed is not None else secrets.randbits(63))
    return g


@dataclass(eq=False)
class RequestState:
    """One request's decoding state, the same on every rank (its generator only on the sampler rank): the tokens
    chosen so far, and once it ends, why. ``key`` is the caller's name for it (its index in a batch call, its id in
    a running batch), what ``on_token`` is called with."""

    key: Any
    request: GenerationRequest
    gen: torch.Generator | None = None
    out: list[int] = field(default_factory=list)
    reason: str | None = None  # "length" | "stop" | "cancelled" | "error"; None while it runs
    error: str | None = None  # reason "error": why (known on rank 0)
    callback_error: str | None = None  # rank 0: its on_token callback raised; the caller ends the request
    stops: frozenset = frozenset()

    def __post_init__(self) -> None:
        self.stops = frozenset(self.request.stop_token_ids)

    @property
    def done(self) -> bool:
        return self.reason is not None

    def history(self) -> list[int]:
        """The prompt and generated tokens, which its penalties count (empty when it has none)."""
        req = self.request
        return list(req.prompt_ids) + self.out if req.sampling.penalized else []

    def record(self, tokens: list[int], on_token: Callable[[Any, int], None] | None) -> None:
        """Append new tokens until a stop token (not kept) or ``max_tokens`` ends it. ``on_token`` (rank 0 only)
        sees each kept token; if it raises, the request is marked for the caller to end (a callback never breaks
        the collective step the ranks are in)."""
        for t in tokens:
            if self.reason is not None:
                return
            if t in self.stops:
                self.reason = "stop"
                return
            self.out.append(t)
            if on_token is not None and self.callback_error is None:
                try:
                    on_token(self.key, t)
                except Exception as exc:  # the caller's failure, reported with this request alone
                    self.callback_error = f"{type(exc).__name__}: {exc}"
            if len(self.out) >= self.request.sampling.max_tokens:
                self.reason = "length"

    def fail(self, message: str) -> None:
        self.reason, self.error = "error", message

    def result(self) -> GenerationResult:
        """What the caller gets (on rank 0): a failed callback makes it an error too."""
        reason, error = self.reason or "length", self.error
        if self.callback_error is not None and error is None:
            reason, error = "error", f"the token callback failed: {self.callback_error}"
        return GenerationResult(token_ids=self.out, finish_reason=reason, error=error,
                                target_forwards=len(self.out) + (self.reason == "stop"))


def new_sequence(key: Any, request: GenerationRequest, comm: Comm) -> RequestState:
    return RequestState(key, request, gen=new_generator(request) if comm.rank == comm.sampler_rank else None)


def sample_isolated(seq: RequestState, pick: Callable[[RequestState], int]) -> int:
    """``pick(seq)`` on the sampler rank, or FAILED (the reason kept on ``seq``) if it raises: one request's
    failure must not leave the sampler rank out of the broadcast every rank is waiting in."""
    try:
        return pick(seq)
    except Exception as exc:
        seq.error = f"sampling failed: {type(exc).__name__}: {exc}"
        return FAILED


def share_failures(comm: Comm, seqs: list[RequestState], failed: list[bool]) -> None:
    """Every rank: end the requests whose token came back FAILED, with the sampler rank's reason also on rank 0
    (one more broadcast, only in a step where something failed)."""
    if not any(failed):
        return
    reasons = [s.error if f else None for s, f in zip(seqs, failed)]
    if comm.sampler_rank != 0:
        reasons = comm.broadcast_json(reasons if comm.rank == comm.sampler_rank else None, src=comm.sampler_rank)
    for seq, f, why in zip(seqs, failed, reasons):
        if f:
            seq.fail(why or "sampling failed")


def choose(comm: Comm, seqs: list[RequestState], logits: torch.Tensor | None,
           on_token: Callable[[Any, int], None] | None) -> torch.Tensor:
    """Collective: the next token of each of ``seqs`` (row i of ``logits``, on the sampler rank, belongs to
    ``seqs[i]``), sampled on the sampler rank with each request's own generator, broadcast, recorded everywhere.
    Returns them (0 for requests already finished or failed just now). A request whose sampling raises fails
    alone."""
    chosen = torch.zeros(len(seqs), dtype=torch.long, device=comm.device)
    if comm.rank == comm.sampler_rank:
        picks = [0 if s.done else sample_isolated(s, lambda s, i=i: sample(logits[i], s.request.sampling, s.gen,
                                                                           s.history()))
                 for i, s in enumerate(seqs)]
        chosen = torch.tensor(picks, dtype=torch.long, device=comm.device)
    comm.broadcast(chosen, src=comm.sampler_rank)
    tokens = chosen.cpu().tolist()
    share_failures(comm, seqs, [t == FAILED for t in tokens])
    for seq, t in zip(seqs, tokens):
        if t != FAILED:
            seq.record([t], on_token if comm.rank == 0 else None)
    return chosen.clamp(min=0)


class Bookkeeping:
    """The sequences of one batch call (static membership), indexed by row: plain, pipelined and speculative
    decoding share it. ``on_token(row, token)`` streams on rank 0."""

    def __init__(self, requests: list[GenerationRequest], comm: Comm, on_token: Callable[[int, int], None] | None):
        self.requests, self.comm, self.on_token = requests, comm, on_token
        self.sampler = comm.rank == comm.sampler_rank
        self.seqs = [new_sequence(b, r, comm) for b, r in enumerate(requests)]

    def choose(self, rows, logits: torch.Tensor | None) -> torch.Tensor:
        """The next token of requests ``rows`` (row i of ``logits`` belongs to ``rows[i]``); 0 for finished ones."""
        return choose(self.comm, [self.seqs[b] for b in rows], logits, self.on_token)

    def record(self, b: int, tokens: list[int]) -> None:
        self.seqs[b].record(tokens, self.on_token if self.comm.rank == 0 else None)

    def done(self, b: int) -> bool:
        return self.seqs[b].done

    def all_done(self) -> bool:
        return all(s.done for s in self.seqs)

    @property
    def gens(self) -> list[torch.Generator | None]:
        return [s.gen for s in self.seqs]

    def results(self) -> list[GenerationResult]:
        return [s.result() for s in self.seqs]


def max_new_tokens(requests: list[GenerationRequest]) -> int:
    return max(r.sampling.max_tokens for r in requests)
