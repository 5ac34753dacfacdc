"""Serving under load: 32 concurrent gRPC streams plus a stream of malformed requests against the tiny model's CPU
Triton repository for a fixed time. Every valid request must finish with the text EngineService gives directly for
that prompt; every malformed one must get an error; the RSS of the whole server tree (dsbuild serve, tritonserver,
the python-backend stub, the engine's rank processes) must not grow between the first and the second half."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from builder.sampling_params import SamplingParams
from tests.hardening import record

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.xdist_group("triton-cpu")]

DURATION_S = 60
STREAMS = 32
MAX_TOKENS = 8
RSS_MARGIN = 1.10  # second-half peak within 10% (+64 MiB) of the first half's peak
PROMPTS = [f"Load {i}: the river ran past the house" if i % 2 else f"Miss Bennet said, number {i}" for i in range(8)]
BAD_BODIES = [({"sampling_param_max_tokens": 4}, "text_input"),
              ({"text_input": "hi", "sampling_param_max_tokens": -1}, "at least 1"),
              ({"text_input": "hi", "sampling_param_max_tokens": 10 ** 9}, "max_seq_len"),
              ({"text_input": "hi", "sampling_param_top_p": 1.5}, "sampling_param_top_p")]


def tree_rss(pid: int) -> int:
    import psutil

    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory, cache_dir) -> Path:
    from tests.support.served import build_cpu_run

    return build_cpu_run(tmp_path_factory.mktemp("load-run"), cache_dir, concurrency=32)


@pytest.fixture(scope="module")
def expected(cpu_run):
    from tests.support.served import direct_results

    results = direct_results(cpu_run / "engines", {p: (p, {}) for p in PROMPTS}, max_tokens=MAX_TOKENS)
    return {p: text for p, (text, _) in results.items()}


def test_32_streams_and_malformed_requests_for_a_fixed_time(cpu_run, expected, tmp_path):
    from tests.support.served import serve_repo
    from triton_repo.client import GenerateOptions, generate

    stop = threading.Event()
    lock = threading.Lock()
    good: list[float] = []
    wrong: list[str] = []
    errors: list[str] = []
    bad_ok: list[str] = []
    bad_missed: list[str] = []
    rss: list[tuple[float, int]] = []

    with serve_repo(cpu_run / "package" / "triton_repo", tmp_path / "triton.log") as served:
        def stream(worker: int):
            i = worker
            while not stop.is_set():
                prompt = PROMPTS[i % len(PROMPTS)]
                i += STREAMS
                t0 = time.perf_counter()
                try:
                    res = generate(served.grpc, GenerateOptions(prompt=prompt, stream=True, sampling=SamplingParams(max_tokens=MAX_TOKENS)),
                                   protocol="grpc", timeout=300)
                except Exception as exc:  # counted and reported below
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    (good if res.text == expected[prompt] else wrong).append(
                        time.perf_counter() - t0 if res.text == expected[prompt] else f"{prompt!r}: {res.text!r}")

        def malformed():
            n = 0
            while not stop.is_set():
                body, message = BAD_BODIES[n % len(BAD_BODIES)]
                n += 1
                req = urllib.request.Request(f"http://{served.http}/v2/models/tensorrt_llm/generate",
                                             data=json.dumps(body).encode(), method="POST")
                try:
                    urllib.request.urlopen(req, timeout=120)
                    bad_missed.append(f"{body} was answered")
                except urllib.error.HTTPError as exc:
                    text = exc.read().decode()
                    (bad_ok if exc.code >= 400 and message in text else bad_missed).append(f"{exc.code} {text[:80]}")
                stop.wait(0.2)

        def sample():
            t0 = time.monotonic()
            while not stop.wait(1.0):
                rss.append((time.monotonic() - t0, tree_rss(served.proc.pid)))

        threads = [threading.Thread(target=stream, args=(w,)) for w in range(STREAMS)]
        threads += [threading.Thread(target=malformed), threading.Thread(target=sample)]
        t_start = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(DURATION_S)
        stop.set()
        for t in threads:
            t.join(timeout=300)
        elapsed = time.monotonic() - t_start
        assert served.proc.poll() is None, "the server died under load"

    assert not errors, errors[:5]
    assert not wrong, wrong[:5]
    assert not bad_missed, bad_missed[:5]
    assert len(good) >= STREAMS and len(bad_ok) >= 20
    half = [r for t, r in rss if t < DURATION_S / 2], [r for t, r in rss if t >= DURATION_S / 2]
    assert half[0] and half[1]
    first, second = max(half[0]), max(half[1])
    assert second <= first * RSS_MARGIN + (64 << 20), (first, second)
    good.sort()
    record.add("load", "serve-32-streams", duration_s=round(elapsed, 1), streams=STREAMS, valid_requests=len(good),
               malformed_requests=len(bad_ok), errors=len(errors), wrong_text=len(wrong),
               latency_p50_s=round(good[len(good) // 2], 2), latency_max_s=round(good[-1], 2),
               rss_first_half_mb=round(first / 2 ** 20), rss_second_half_mb=round(second / 2 ** 20))
