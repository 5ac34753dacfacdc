"""Issue 18, class 1 -- a request can only fail itself -- on a real server: the tiny model's CPU Triton repository at
TP2 (two engine ranks) started by ``dsbuild serve``.

Each bad request is sent over HTTP's generate extension (finite extremes, as JSON numbers Triton converts to the
model's FP32/INT32 inputs) or raw gRPC (non-finite FP32 values JSON cannot carry), while a normal greedy request runs
beside it over a gRPC stream (so the two share the running batch). The bad request is either answered (a finite value
the sampling rules accept: the arithmetic is overflow-safe) or refused naming its input; the normal request beside
it and one sent after it get exactly the text the server gave before any bad request, and the server stays ready.
Last, an engine rank is killed: the request in flight fails, the model logs that its engine cannot continue and
``dsbuild serve`` restarts tritonserver, which then answers with the same text again."""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from builder.sampling_params import FP32_TINY, INT32_MAX, SamplingParams
from tests.hardening import record

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.xdist_group("triton-cpu")]

PROMPT = "Miss Bennet said that the river"
BAD_PROMPT = "Tokens and layers, number 3"
MAX_TOKENS = 8
ANSWERED = None
# (case, HTTP JSON fields of the bad request, None = must be answered / else a substring of its error)
HTTP_CASES = [
    ("temperature 1e-40", {"sampling_param_temperature": 1e-40}, ANSWERED),
    ("temperature = smallest FP32 subnormal", {"sampling_param_temperature": FP32_TINY}, ANSWERED),
    ("temperature 1e-30, seeded", {"sampling_param_temperature": 1e-30, "sampling_param_seed": 5}, ANSWERED),
    ("temperature 3.4e38", {"sampling_param_temperature": 3.4e38, "sampling_param_seed": 1}, ANSWERED),
    ("presence_penalty -3e38", {"sampling_param_presence_penalty": -3e38}, ANSWERED),
    ("frequency_penalty -3e38, sampled", {"sampling_param_frequency_penalty": -3e38,
                                          "sampling_param_temperature": 0.8}, ANSWERED),
    ("both penalties +3e38, temperature 1e-30", {"sampling_param_presence_penalty": 3e38,
                                                 "sampling_param_frequency_penalty": 3e38,
                                                 "sampling_param_temperature": 1e-30}, ANSWERED),
    ("every extreme at once", {"sampling_param_temperature": 1e-40, "sampling_param_presence_penalty": -3e38,
                               "sampling_param_frequency_penalty": 3e38, "sampling_param_top_p": FP32_TINY,
                               "sampling_param_top_k": INT32_MAX}, ANSWERED),
    ("top_p = smallest FP32 subnormal", {"sampling_param_top_p": FP32_TINY, "sampling_param_temperature": 1.0},
     ANSWERED),
    ("temperature -1e-40", {"sampling_param_temperature": -1e-40}, "sampling_param_temperature must be >= 0"),
    ("top_k -1", {"sampling_param_top_k": -1}, "sampling_param_top_k must be in"),
    ("top_p 0", {"sampling_param_top_p": 0.0}, "sampling_param_top_p must be in (0, 1]"),
]
GRPC_CASES = [
    ("temperature +inf (FP32)", "sampling_param_temperature", np.inf,
     "sampling_param_temperature must be a finite number"),
    ("presence_penalty -inf (FP32)", "sampling_param_presence_penalty", -np.inf,
     "sampling_param_presence_penalty must be a finite number"),
    ("frequency_penalty NaN (FP32)", "sampling_param_frequency_penalty", np.nan,
     "sampling_param_frequency_penalty must be a finite number"),
    ("temperature NaN (FP32)", "sampling_param_temperature", np.nan,
     "sampling_param_temperature must be a finite number"),
]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory, cache_dir) -> Path:
    from tests.support.served import build_cpu_run

    return build_cpu_run(tmp_path_factory.mktemp("bad-requests-run"), cache_dir, concurrency=8)


@pytest.fixture(scope="module")
def served(cpu_run, tmp_path_factory):
    from tests.support.served import serve_repo

    log = tmp_path_factory.mktemp("bad-requests-log") / "triton.log"
    with serve_repo(cpu_run / "package" / "triton_repo", log) as server:
        yield server


@pytest.fixture(scope="module")
def before(served) -> str:
    """The normal request's text before any bad request."""
    return normal(served)


def normal(served) -> str:
    from triton_repo.client import GenerateOptions, generate

    res = generate(served.grpc, GenerateOptions(prompt=PROMPT, stream=True,
                                                sampling=SamplingParams(max_tokens=MAX_TOKENS)), protocol="grpc")
    assert res.finish_reason in ("length", "stop"), res
    return res.text


def ready(served) -> bool:
    try:
        with urllib.request.urlopen(f"http://{served.http}/v2/health/ready", timeout=10) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def send_http(served, fields: dict) -> tuple[int, str]:
    body = {"text_input": BAD_PROMPT, "sampling_param_max_tokens": MAX_TOKENS, **fields}
    req = urllib.request.Request(f"http://{served.http}/v2/models/tensorrt_llm/generate",
                                 data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def send_grpc(served, name: str, value: float) -> tuple[int, str]:
    import tritonclient.grpc as grpcclient

    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(served.grpc)
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    tensors = []
    for key, dtype, arr in (("text_input", "BYTES", np.array([BAD_PROMPT.encode()], dtype=np.object_)),
                            ("sampling_param_max_tokens", "INT32", np.array([MAX_TOKENS], dtype=np.int32)),
                            (name, "FP32", np.array([value], dtype=np.float32))):
        t = grpcclient.InferInput(key, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        tensors.append(t)
    try:
        client.async_stream_infer("tensorrt_llm", tensors)
        result, error = events.get(timeout=120)
    finally:
        client.stop_stream()
        client.close()
    return (400, error.message()) if error is not None else (200, str(result.as_numpy("text_output")))


def beside(served, send) -> tuple[tuple[int, str], str]:
    """``send()`` (the bad request) while a normal request runs; returns both outcomes."""
    got = {}
    worker = threading.Thread(target=lambda: got.__setitem__("normal", normal(served)))
    worker.start()
    time.sleep(0.05)
    outcome = send()
    worker.join(timeout=300)
    return outcome, got.get("normal", "<no answer>")


def check(served, before: str, case: str, outcome: tuple[int, str], alongside: str, expect: str | None) -> None:
    status, body = outcome
    if expect is ANSWERED:
        assert status == 200, (case, status, body)
        assert "text_output" in body or body.startswith("[b"), (case, body)
    else:
        assert 400 <= status < 500 and expect in body, (case, status, body)
    assert "generation failed" not in body, (case, body)
    assert alongside == before, (case, alongside, before)
    assert normal(served) == before, case
    assert ready(served), case


@pytest.mark.parametrize("case,fields,expect", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_extreme_sampling_values_fail_at_most_themselves(served, before, case, fields, expect):
    outcome, alongside = beside(served, lambda: send_http(served, fields))
    check(served, before, case, outcome, alongside, expect)
    record.add("serving_requests", case, item=1, protocol="http", outcome="answered" if expect is ANSWERED else "refused",
               normal_text_unchanged=True)


@pytest.mark.parametrize("case,name,value,expect", GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_non_finite_sampling_values_are_refused_and_fail_nothing_else(served, before, case, name, value, expect):
    outcome, alongside = beside(served, lambda: send_grpc(served, name, value))
    check(served, before, case, outcome, alongside, expect)
    record.add("serving_requests", case, item=1, protocol="grpc", outcome="refused", normal_text_unchanged=True)


def test_z_a_dead_engine_rank_fails_its_requests_and_serve_restarts_the_server(served, before):
    """The one failure a request cannot be isolated from: a rank process dies. The requests in flight get an error,
    the model logs that its engine cannot continue, `dsbuild serve` restarts tritonserver, and the same request gets
    the same text afterwards."""
    import psutil

    from triton_repo.client import GenerateOptions, generate

    workers = [p for p in psutil.Process(served.proc.pid).children(recursive=True)
               if "builder.engine.worker" in " ".join(p.cmdline())]
    assert len(workers) == 1, workers  # TP2: rank 1 beside the stub's rank 0
    n_ready = sum("serving on" in l for l in served.stderr_lines)
    workers[0].kill()
    gone = time.monotonic() + 30  # not our child: it stays a zombie until the stub reaps it
    while True:
        try:
            if workers[0].status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        assert time.monotonic() < gone
        time.sleep(0.1)
    with pytest.raises(Exception) as failed:
        generate(served.grpc, GenerateOptions(prompt=PROMPT, sampling=SamplingParams(max_tokens=MAX_TOKENS)),
                 protocol="grpc", timeout=120)
    assert "engine rank 1" in str(failed.value) or "cannot continue" in str(failed.value), failed.value
    deadline = time.monotonic() + 240
    while sum("serving on" in l for l in served.stderr_lines) == n_ready:
        assert served.proc.poll() is None, "".join(served.stderr_lines)
        assert time.monotonic() < deadline, "".join(served.stderr_lines)
        time.sleep(0.5)
    log = "".join(served.stderr_lines)
    assert "the CPU model's engine cannot continue" in log and "restarting tritonserver (1/2)" in log, log[-2000:]
    assert ready(served)
    assert normal(served) == before
    record.add("serving_requests", "engine rank killed", item=1, protocol="grpc", outcome="request failed, server restarted",
               normal_text_unchanged=True)
