"""Presence/frequency penalties of the reference engine against the formula written out by hand (TensorRT-LLM's
SamplingParams semantics: counts over prompt and output, temperature first, then the penalties)."""

from __future__ import annotations

import math

import pytest
import torch

from builder.engine.proposer import choose_draft
from builder.engine.sampling import (
    GenerationRequest,
    adjusted_logits,
    penalize,
    probabilities,
    sample,
    validate_request,
)
from builder.errors import RequestError
from builder.model.config import tiny_config
from builder.sampling_params import SamplingParams


def by_hand(logits: list[float], history: list[int], presence: float, frequency: float) -> list[float]:
    out = list(logits)
    for t in range(len(out)):
        n = sum(1 for h in history if h == t)
        if n:
            out[t] = out[t] - frequency * n - presence
    return out


@pytest.mark.parametrize("presence,frequency", [(0.7, 0.0), (0.0, 0.45), (0.3, -0.2), (-1.5, 0.25), (2.0, 1.0)])
def test_penalize_matches_the_formula(presence, frequency):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, generator=g)
    prompt = [3, 3, 7, 0, 39]
    generated = [7, 7, 7, 12, 3]
    got = penalize(logits, prompt + generated, presence_penalty=presence, frequency_penalty=frequency)
    want = torch.tensor(by_hand(logits.tolist(), prompt + generated, presence, frequency))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got[7] == pytest.approx(float(logits[7]) - 4 * frequency - presence)  # 1 in the prompt + 3 generated
    assert got[5] == logits[5]  # never seen: untouched


def test_zero_penalties_are_the_identity_without_counting():
    logits = torch.randn(10)
    assert penalize(logits, [1, 1, 2], presence_penalty=0.0, frequency_penalty=0.0) is logits
    params = SamplingParams()
    assert not params.penalized
    # With no penalties the history is never looked at (a bincount of these would fail on the negative id).
    # (The sampling arithmetic is float64, overflow-safe: docs/sampling.md; the values are the row's own.)
    torch.testing.assert_close(adjusted_logits(logits, params, [-5]), logits, check_dtype=False)


def test_temperature_scales_before_the_penalties_are_subtracted():
    """penaltyKernels.cu batchApplyPenalty: logit * (1 / temperature), then - presence - frequency * count."""
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    params = SamplingParams(temperature=0.5, presence_penalty=0.25, frequency_penalty=0.5)
    want = torch.tensor([4.0, 2.0 - 0.25 - 0.5 * 2, 1.0 - 0.25 - 0.5, -2.0])
    torch.testing.assert_close(adjusted_logits(logits, params, [1, 2, 1]), want, check_dtype=False)
    torch.testing.assert_close(probabilities(logits, params, [1, 2, 1]), torch.softmax(want, dim=-1),
                               check_dtype=False)


def test_greedy_takes_the_argmax_of_the_penalized_logits():
    logits = torch.tensor([0.0, 3.0, 2.6, -1.0])
    history = [1, 1]  # token 1 twice
    assert sample(logits, SamplingParams(), None, history) == 1
    assert sample(logits, SamplingParams(frequency_penalty=0.3), None, history) == 2  # 3.0 - 0.6 < 2.6
    assert sample(logits, SamplingParams(presence_penalty=0.3), None, history) == 1  # 3.0 - 0.3 > 2.6
    assert sample(logits, SamplingParams(presence_penalty=-1.0), None, [2]) == 2  # negative: encourage
    # The drafter's choice uses the same rule, so greedy speculative decoding can equal plain decoding.
    assert choose_draft(logits, SamplingParams(frequency_penalty=0.3), None, history) == (2, None)


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "0.5"])
def test_non_finite_penalties_are_refused_naming_the_request_and_field(field, value):
    req = GenerationRequest([1, 2], SamplingParams(**{field: value}))
    with pytest.raises(RequestError, match=rf"request 3: {field} must be a (finite )?number"):
        validate_request(req, tiny_config("tiny"), 3)
    validate_request(GenerationRequest([1, 2], SamplingParams(**{field: -2.5})), tiny_config("tiny"), 3)  # negative is fine


def plain_greedy_verdict(logits: torch.Tensor, history: list[int], drafts: list[int], presence: float,
                         frequency: float) -> tuple[int, list[int]]:
    """What plain penalized greedy decoding emits over these positions: at position k it has emitted
    history + drafts[:k] (while the drafts agree with it) and takes the argmax of the hand-penalized logits."""
    for k in range(len(drafts) + 1):
        row = by_hand(logits[k].tolist(), history + drafts[:k], presence, frequency)
        best = max(range(len(row)), key=row.__getitem__)
        if k == len(drafts) or best != drafts[k]:
            return k, drafts[:k] + [best]


def test_greedy_verification_counts_the_earlier_drafts():
    """Drafts [2, 2]: at the second position token 2 has occurred once more (the first draft), which the frequency
    penalty must count, so the repeated draft is rejected for token 3."""
    from builder.engine.speculative import verify_row

    logits = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 2.0, 1.8], [0.0, 0.0, 0.0, 1.0]])
    req = GenerationRequest([0], SamplingParams(frequency_penalty=0.5))
    assert verify_row(req, [0, 1], [2, 2], logits, None, None) == (1, [2, 3])
    assert verify_row(GenerationRequest([0]), [0, 1], [2, 2], logits, None, None) == (2, [2, 2, 3])


@pytest.mark.parametrize("seed", range(30))
def test_greedy_verification_equals_plain_penalized_greedy(seed):
    from builder.engine.speculative import verify_row

    g = torch.Generator().manual_seed(seed)
    V, N = 6, 3
    logits = torch.randn(N + 1, V, generator=g) * 2
    history = torch.randint(0, V, (5,), generator=g).tolist()
    presence, frequency = (torch.rand(2, generator=g) * 3 - 1.5).tolist()
    drafts = []
    for k in range(N):  # mostly the plain path itself, sometimes a wrong draft
        agreed = plain_greedy_verdict(logits, history, drafts + [-1], presence, frequency)[1][-1]
        drafts.append(agreed if torch.rand((), generator=g) < 0.7 else int(torch.randint(0, V, (), generator=g)))
    req = GenerationRequest([0], SamplingParams(presence_penalty=presence, frequency_penalty=frequency))
    assert verify_row(req, history, drafts, logits, None, None) == \
        plain_greedy_verdict(logits, history, drafts, presence, frequency)


@pytest.mark.parametrize("seed", range(10))
def test_sampled_verification_uses_the_penalized_target_distribution(seed):
    """A drafter whose distributions are exactly the target's penalized ones (written out by hand) has every draft
    accepted: acceptance is min(1, p/q) = 1 only if verification penalizes position k with history + drafts[:k]."""
    from builder.engine.speculative import verify_row

    g = torch.Generator().manual_seed(seed)
    V, N, T = 8, 3, 0.7
    logits = torch.randn(N + 1, V, generator=g) * 2
    history = torch.randint(0, V, (6,), generator=g).tolist()
    drafts = torch.randint(0, V, (N,), generator=g).tolist()
    req = GenerationRequest([0], SamplingParams(temperature=T, presence_penalty=0.9, frequency_penalty=1.3))
    q = [torch.softmax(torch.tensor(by_hand((logits[k] / T).tolist(), history + drafts[:k], 0.9, 1.3)), dim=-1)
         for k in range(N)]
    accepted, tokens = verify_row(req, history, drafts, logits, q, torch.Generator().manual_seed(seed))
    assert accepted == N and tokens[:N] == drafts and 0 <= tokens[-1] < V
