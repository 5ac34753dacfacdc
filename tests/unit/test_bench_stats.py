"""Benchmark statistics against numpy, and the option parsers."""

from __future__ import annotations

import random

import numpy as np
import pytest

from builder.errors import SpecError
from triton_repo.bench.prompts import Length
from triton_repo.bench.stats import distribution, percentile
from triton_repo.bench.stream import RequestRecord


@pytest.mark.parametrize("data", [
    [5.0], [3.0, 1.0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [0.25, 100.0, 3.5, 3.5, -2.0, 7.125, 11.0],
    [random.Random(s).lognormvariate(3, 1) for s in range(997)],
])
def test_percentiles_equal_numpys_linear_method(data):
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)), rel=1e-12, abs=1e-12)
    d = distribution(data, scale=1e3)
    scaled = np.asarray(data, dtype=float) * 1e3
    assert d["count"] == len(data)
    assert d["mean"] == pytest.approx(scaled.mean()) and d["max"] == pytest.approx(scaled.max())
    assert [d["p50"], d["p90"], d["p99"]] == pytest.approx(list(np.percentile(scaled, [50, 90, 99])))


def test_empty_distribution_has_no_figures_and_percentile_refuses_nonsense():
    assert distribution([]) == {"count": 0, "mean": None, "min": None, "max": None, "p50": None, "p90": None,
                                "p99": None}
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_tpot_is_latency_after_the_first_token_over_the_remaining_tokens():
    r = RequestRecord(index=0, prompt_tokens=4, max_tokens=5, ttft_s=0.1, latency_s=0.5, output_tokens=5)
    assert r.tpot_s == pytest.approx(0.1)
    r.response_times_s = [0.1, 0.2, 0.35, 0.4, 0.5]
    assert r.inter_token_s == pytest.approx([0.1, 0.15, 0.05, 0.1])
    assert RequestRecord(index=1, prompt_tokens=4, max_tokens=1, ttft_s=0.1, latency_s=0.1, output_tokens=1).tpot_s \
        is None
    assert RequestRecord(index=2, prompt_tokens=4, max_tokens=5, error="boom").tpot_s is None


def test_length_parsing_and_sampling():
    assert Length.parse("128", what="--isl") == Length(128, 0.0)
    assert Length.parse("128:16", what="--isl") == Length(128, 16.0)
    for bad in ("", "x", "0", "12:-1", "1.5"):
        with pytest.raises(SpecError, match="--isl"):
            Length.parse(bad, what="--isl")
    rng = random.Random(0)
    samples = [Length(10, 50).sample(rng) for _ in range(500)]
    assert min(samples) == 1 and max(samples) > 10  # clipped at 1, spread by the std


class _TimedSender:
    """Stands in for the network in scheduler tests: each request takes ``service_s``; in-flight counts kept."""

    def __init__(self, service_s: float):
        self.service_s, self.in_flight, self.peak, self.sent_at = service_s, 0, 0, []

    async def send(self, index, req, level_t0):
        import asyncio
        import time

        self.sent_at.append(time.perf_counter() - level_t0)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(self.service_s)
        self.in_flight -= 1
        return RequestRecord(index=index, prompt_tokens=1, max_tokens=1)


@pytest.mark.parametrize("rate", [None, 200.0])
def test_scheduler_caps_in_flight_at_the_concurrency_and_spaces_poisson_arrivals(rate):
    import asyncio

    from triton_repo.bench.runner import _run_batch

    sender = _TimedSender(0.02)
    done = []
    records, duration = asyncio.run(_run_batch(sender, list(range(60)), concurrency=4, rate=rate,
                                               rng=random.Random(0), on_done=lambda: done.append(1)))
    assert [r.index for r in records] == list(range(60)) and len(done) == 60
    assert sender.peak <= 4
    if rate is None:  # closed loop: 60 requests of 20 ms, always 4 at a time
        assert sender.peak == 4 and duration >= 15 * 0.02
    else:  # Poisson at 200/s: about 60/200 s of arrivals, mean gap near 5 ms
        gaps = np.diff(sender.sent_at)
        assert 0.002 < float(np.mean(gaps)) < 0.012
        assert duration >= 0.15
