"""Acceptance rules of speculative decoding, on toy distributions: greedy prefix matching, and rejection sampling
checked with a chi-square goodness-of-fit test (scipy.stats) against the target distribution -- which must also
reject deliberately broken acceptance rules."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from builder.engine.sampling import probabilities
from builder.engine.speculative import greedy_verify, rejection_verify
from builder.sampling_params import SamplingParams

V = 6
SAMPLES = 8000
ALPHA = 1e-3

# Target and draft over a 6-token vocabulary that disagree a lot (q puts mass where p has little), for two
# positions, so that acceptance, rejection + residual, and the bonus token all happen often.
P = torch.tensor([[0.05, 0.10, 0.40, 0.05, 0.30, 0.10],
                  [0.30, 0.05, 0.05, 0.20, 0.10, 0.30],
                  [0.10, 0.25, 0.15, 0.20, 0.20, 0.10]])
Q = torch.tensor([[0.30, 0.25, 0.10, 0.20, 0.05, 0.10],
                  [0.10, 0.10, 0.40, 0.10, 0.20, 0.10]])


def _run(n_draft: int, acceptance=None, seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """Many rounds; returns first emitted tokens, second emitted tokens (rounds with >= 2), accepted counts."""
    g = torch.Generator().manual_seed(seed)
    firsts, seconds, accepted = [], [], []
    kw = {} if acceptance is None else {"acceptance": acceptance}
    for _ in range(SAMPLES):
        drafts = [int(torch.multinomial(Q[k], 1, generator=g)) for k in range(n_draft)]
        a, toks = rejection_verify(drafts, Q[:n_draft], P[:n_draft + 1], g, **kw)
        assert len(toks) == a + 1 and toks[:a] == drafts[:a]
        firsts.append(toks[0])
        if len(toks) >= 2:
            seconds.append(toks[1])
        accepted.append(a)
    return firsts, seconds, accepted


def _pvalue(tokens: list[int], p: torch.Tensor) -> float:
    observed = torch.bincount(torch.tensor(tokens), minlength=V).double()
    expected = p.double() / p.double().sum() * observed.sum()
    return float(stats.chisquare(observed.numpy(), expected.numpy()).pvalue)


@pytest.mark.parametrize("n_draft", [1, 2])
def test_rejection_sampling_preserves_the_target_distribution(n_draft):
    firsts, seconds, accepted = _run(n_draft)
    assert 0 < sum(a == 0 for a in accepted) < SAMPLES  # both rejections and acceptances happened
    assert _pvalue(firsts, P[0]) > ALPHA
    if n_draft == 2:
        # Given the first draft was accepted, the next emitted token (accepted draft 2, residual, or bonus) ~ p[1].
        assert len(seconds) > SAMPLES // 10
        assert _pvalue(seconds, P[1]) > ALPHA


@pytest.mark.parametrize("broken", [
    pytest.param(lambda p, q: torch.tensor(1.0), id="always-accept"),
    pytest.param(lambda p, q: torch.clamp(q / p, max=1.0), id="q-over-p"),
    pytest.param(lambda p, q: (p >= q).float(), id="accept-iff-p-ge-q"),
])
def test_a_broken_acceptance_rule_fails_the_same_test(broken):
    firsts, _, _ = _run(1, acceptance=broken)
    assert _pvalue(firsts, P[0]) < ALPHA


def test_the_draft_distribution_itself_fails_the_test():
    """Sanity of the statistic: raw draft samples are not target samples."""
    g = torch.Generator().manual_seed(1)
    assert _pvalue(torch.multinomial(Q[0], SAMPLES, replacement=True, generator=g).tolist(), P[0]) < ALPHA


def test_greedy_verification_accepts_the_longest_matching_prefix():
    logits = torch.full((4, V), -1.0)
    for k, t in enumerate([2, 5, 1, 3]):
        logits[k, t] = 1.0
    assert greedy_verify([2, 5, 1], logits) == (3, [2, 5, 1, 3])  # all accepted + bonus
    assert greedy_verify([2, 4, 1], logits) == (1, [2, 5])  # first mismatch replaced by the target's argmax
    assert greedy_verify([0, 5, 1], logits) == (0, [2])


def test_temperature_top_k_top_p_shape_p_and_q_alike():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    params = SamplingParams(temperature=0.7, top_k=4, top_p=0.9)
    p = probabilities(logits, params)
    assert p.dtype == torch.float64  # the sampling math runs in float64 (docs/sampling.md)
    assert torch.isclose(p.sum(), torch.tensor(1.0, dtype=p.dtype))
    assert (p[4:] == 0).all()  # top-k
    kept = torch.softmax(logits[:4] / 0.7, -1)
    assert p[3] == 0 or kept[:3].sum() < 0.9  # top-p drops the tail once the prefix reaches 0.9
