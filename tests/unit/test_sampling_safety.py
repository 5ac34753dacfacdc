"""Numeric safety of sampling (issue 18, class 1): ``SamplingParams.validate`` is the one place that bounds the
values (docs/sampling.md), and for every value it accepts the engine's sampling arithmetic can produce no NaN/Inf:
probabilities are finite, non-negative and sum to one, a draw is a token of the vocabulary, greedy and speculative
verification pick real tokens. Hypothesis draws the parameters over their whole accepted ranges (FP32 extremes and
subnormals included) and the logits over every finite FP32 value."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from builder.engine.proposer import choose_draft
from builder.engine.sampling import GenerationRequest, adjusted_logits, probabilities, sample
from builder.engine.speculative import verify_row
from builder.errors import RequestError
from builder.sampling_params import FP32_MAX, FP32_TINY, INT32_MAX, SamplingParams

V = 12
fp32 = st.floats(min_value=-FP32_MAX, max_value=FP32_MAX, allow_nan=False, width=32)
# Every accepted temperature: 0, the FP32 subnormals, ordinary values, up to FP32's largest.
temperatures = st.one_of(st.just(0.0), st.floats(min_value=FP32_TINY, max_value=FP32_MAX, width=32),
                         st.sampled_from([1e-40, FP32_TINY, 1e-30, 1e-8, 0.7, 1e30, FP32_MAX]))
penalties = st.one_of(fp32, st.sampled_from([0.0, 3e38, -3e38, FP32_MAX, -FP32_MAX, 1e-45, -1e-45, 2.0, -2.0]))
top_ps = st.one_of(st.floats(min_value=FP32_TINY, max_value=1.0, width=32), st.sampled_from([FP32_TINY, 1e-30, 1.0]))
logit_rows = st.lists(st.one_of(fp32, st.sampled_from([FP32_MAX, -FP32_MAX, 0.0, 1e-45])), min_size=V, max_size=V)
histories = st.lists(st.integers(0, V - 1), max_size=300)


@st.composite
def accepted_params(draw) -> SamplingParams:
    params = SamplingParams(temperature=draw(temperatures), top_k=draw(st.integers(0, V + 3)), top_p=draw(top_ps),
                            presence_penalty=draw(penalties), frequency_penalty=draw(penalties),
                            seed=draw(st.integers(0, 2 ** 64 - 1)))
    return params.validate()


def check_distribution(p: torch.Tensor) -> None:
    assert bool(torch.isfinite(p).all()), p
    assert bool((p >= 0).all()), p
    assert math.isclose(float(p.sum()), 1.0, abs_tol=1e-9), float(p.sum())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=accepted_params(), row=logit_rows, history=histories, seed=st.integers(0, 2 ** 32))
@example(params=SamplingParams(temperature=1e-40), row=[1.0] * V, history=[], seed=0)
@example(params=SamplingParams(temperature=1e-40, presence_penalty=-3e38, frequency_penalty=-3e38),
         row=[FP32_MAX] + [-FP32_MAX] * (V - 1), history=[1] * 300, seed=0)
@example(params=SamplingParams(temperature=FP32_TINY, presence_penalty=3e38, frequency_penalty=-FP32_MAX),
         row=[-FP32_MAX] * V, history=list(range(V)) * 20, seed=1)
@example(params=SamplingParams(temperature=FP32_MAX, top_p=FP32_TINY), row=[0.0] * V, history=[], seed=2)
def test_no_accepted_value_gives_nan_or_inf(params, row, history, seed):
    logits = torch.tensor(row, dtype=torch.float32)
    adjusted = adjusted_logits(logits, params, history)
    assert bool(torch.isfinite(adjusted).all()), adjusted
    token = sample(logits, params, torch.Generator().manual_seed(seed), history)
    assert 0 <= token < V
    if not params.greedy:
        p = probabilities(logits, params, history)
        check_distribution(p)
        assert p[token] > 0  # the draw came from the distribution
        draft, q = choose_draft(logits, params, torch.Generator().manual_seed(seed), history)
        check_distribution(q)
        # Speculative verification of that draft against the same distribution: real tokens, accepted or not.
        stacked = torch.stack([logits, logits])
        accepted, tokens = verify_row(GenerationRequest([0], params), list(history), [draft], stacked, [q],
                                      torch.Generator().manual_seed(seed))
        assert accepted in (0, 1) and all(0 <= t < V for t in tokens)


@settings(max_examples=200, deadline=None)
@given(params=accepted_params())
def test_every_accepted_float_survives_the_fp32_wire(params):
    """Triton carries the float fields as FP32: what validate accepts neither overflows nor underflows to 0 there."""
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        as_fp32 = float(np.float32(value))
        assert math.isfinite(as_fp32) and (as_fp32 == 0) == (value == 0), (name, value)


def test_a_vanishing_temperature_samples_the_argmax_and_shares_exact_ties():
    """The T -> 0 limit of sampling (TensorRT-LLM samples at any temperature > 0; no greedy switch-over): the
    largest logit has all the probability, exact ties share it."""
    logits = torch.tensor([0.5, 3.0, 2.999999, -1.0])
    for t in (1e-40, FP32_TINY, 1e-20):
        p = probabilities(logits, SamplingParams(temperature=t))
        assert p.tolist() == [0.0, 1.0, 0.0, 0.0]
    tied = probabilities(torch.tensor([2.0, 7.0, 7.0, 1.0]), SamplingParams(temperature=1e-40))
    assert tied.tolist() == [0.0, 0.5, 0.5, 0.0]
    draws = {sample(torch.tensor([2.0, 7.0, 7.0, 1.0]), SamplingParams(temperature=1e-40),
                    torch.Generator().manual_seed(s)) for s in range(40)}
    assert draws == {1, 2}


def test_penalties_at_the_fp32_extremes_still_order_the_tokens():
    """-3e38 (favour what occurred) and +3e38 (forbid it) dominate every logit, as the formula says."""
    logits = torch.tensor([5.0, 1.0, 0.0, -2.0])
    favoured = SamplingParams(presence_penalty=-3e38)
    assert sample(logits, favoured, None, [3]) == 3
    forbidding = SamplingParams(frequency_penalty=3e38, presence_penalty=3e38, temperature=0.5)
    p = probabilities(logits, forbidding, [0, 0, 1])
    check_distribution(p)
    assert p[0] == 0 and p[1] == 0 and p[2] > p[3] > 0


@pytest.mark.parametrize("bad", [[math.nan] + [0.0] * (V - 1), [math.inf] * V, [0.0] * (V - 1) + [-math.inf]])
def test_non_finite_model_logits_raise_for_the_request(bad):
    """A model that produced NaN/Inf (bad weights) fails the request in hand with a reason, never a NaN draw;
    ``builder.engine.sampling.choose`` turns that into this request's error alone."""
    with pytest.raises(ValueError, match="non-finite logits"):
        sample(torch.tensor(bad), SamplingParams(temperature=0.8), torch.Generator())


@pytest.mark.parametrize("field,value,rule", [
    ("temperature", 1e-50, "FP32 can carry"),  # a positive value FP32 would turn into 0 (greedy by accident)
    ("temperature", 1e39, "FP32 can carry"),
    ("temperature", -1e-40, ">= 0"),
    ("temperature", math.inf, "FP32 can carry"),
    ("temperature", math.nan, "FP32 can carry"),
    ("presence_penalty", 3.5e38, "FP32 can carry"),
    ("frequency_penalty", -1e300, "FP32 can carry"),
    ("frequency_penalty", 1e-46, "FP32 can carry"),
    ("presence_penalty", -math.inf, "FP32 can carry"),
    ("top_p", 1e-50, "FP32 can carry"),
    ("top_p", 0.0, r"in \(0, 1\]"),
    ("top_p", 1.0000001, r"in \(0, 1\]"),
    ("top_k", INT32_MAX + 1, "INT32|2147483647"),
    ("max_tokens", INT32_MAX + 1, "INT32"),
    ("max_tokens", 0, "at least 1"),
    ("seed", 2 ** 64, "an integer in"),
    ("seed", -1, "an integer in"),
])
def test_values_outside_the_ranges_are_refused_naming_the_field(field, value, rule):
    with pytest.raises(RequestError, match=rf"^{field} must be .*({rule})"):
        SamplingParams(**{field: value}).validate()


@pytest.mark.parametrize("field,value", [("temperature", 1e-40), ("temperature", FP32_MAX), ("temperature", FP32_TINY),
                                         ("presence_penalty", -3e38), ("frequency_penalty", 3e38),
                                         ("presence_penalty", -FP32_MAX), ("top_p", FP32_TINY),
                                         ("top_k", INT32_MAX), ("max_tokens", INT32_MAX)])
def test_extreme_values_within_the_ranges_are_accepted(field, value):
    """TensorRT-LLM takes these (it checks only temperature >= 0, top_k >= 0, top_p in [0, 1]); so does dsbuild,
    and its arithmetic handles them (above)."""
    SamplingParams(**{field: value}).validate()


def test_triton_inputs_name_the_input_in_errors():
    values = {"sampling_param_temperature": 1e-50}
    with pytest.raises(RequestError, match="^sampling_param_temperature must be"):
        SamplingParams.from_triton(lambda name, default: values.get(name, default), lambda name: [])
