"""EngineService life cycle: clean close, a worker killed mid-request named, workers that die with a killed host,
start-up failures named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from builder.sampling_params import SamplingParams
from tests.conftest import REPO
from tests.support.engines import build_bundle


@pytest.fixture(scope="module")
def bundle_tp2(tiny_ckpt, tmp_path_factory):
    return build_bundle(tiny_ckpt, tmp_path_factory.mktemp("svc") / "tp2", tp=2, pp=1, ep=1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except OSError:
        return False


def test_close_stops_every_worker_and_refuses_later_requests(bundle_tp2):
    from builder.engine.service import EngineService, GenerationRequest
    from builder.errors import ServeError

    svc = EngineService(bundle_tp2, threads_per_rank=1)
    stats = svc.rank_stats()
    assert [s["shard_bytes"] for s in stats] == [svc.bundle.tensor_bytes(r) for r in range(2)]
    assert all(s["peak_rss_bytes"] >= s["rss_bytes"] > s["loaded_weight_bytes"] > 0 for s in stats)
    procs = list(svc._procs)
    svc.close()
    assert all(p.returncode == 0 for p in procs)  # stopped by the broadcast, not killed
    with pytest.raises(ServeError, match="closed"):
        svc.generate([GenerationRequest(prompt_ids=[5, 6])])


def test_a_worker_killed_mid_request_is_named_and_later_calls_fail_at_once(bundle_tp2):
    import threading

    from builder.engine.service import EngineService, GenerationRequest
    from builder.errors import ServeError

    svc = EngineService(bundle_tp2, threads_per_rank=1)
    worker = svc._procs[0]
    started = threading.Event()

    def first_token(b, t):
        started.set()

    def kill_when_decoding():
        started.wait(60)
        worker.send_signal(signal.SIGKILL)

    threading.Thread(target=kill_when_decoding, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(ServeError, match=r"engine rank 1 exited with code -9 during a request.*start a new one"):
        svc.generate([GenerationRequest(prompt_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=400))], on_token=first_token)
    assert time.monotonic() - t0 < 30
    t0 = time.monotonic()
    with pytest.raises(ServeError, match="engine rank 1 exited"):
        svc.generate([GenerationRequest(prompt_ids=[5, 6], sampling=SamplingParams(max_tokens=2))])
    assert time.monotonic() - t0 < 1
    svc.close()
    with pytest.raises(ServeError, match="closed"):
        svc.generate([GenerationRequest(prompt_ids=[5, 6])])


def test_workers_die_with_a_killed_host_process(bundle_tp2):
    script = (
        "import json, sys, time\n"
        "from builder.engine.service import EngineService\n"
        f"svc = EngineService({str(bundle_tp2)!r}, threads_per_rank=1)\n"
        "print(json.dumps([p.pid for p in svc._procs]), flush=True)\n"
        "time.sleep(600)\n"
    )
    host = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    try:
        pids = json.loads(host.stdout.readline())
        assert pids and all(_alive(p) for p in pids)
        host.send_signal(signal.SIGKILL)
        host.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids), "workers outlived their host (PR_SET_PDEATHSIG missing)"
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()


def test_a_rank_that_cannot_load_is_named_and_nothing_is_left_running(bundle_tp2, tmp_path):
    import shutil

    from builder.engine.service import EngineService
    from builder.errors import ServeError

    broken = tmp_path / "broken"
    shutil.copytree(bundle_tp2, broken)
    (broken / "rank1.safetensors").write_bytes(b"garbage")
    with pytest.raises(ServeError, match="engine rank 1 failed to start: .*rank1.safetensors"):
        EngineService(broken, threads_per_rank=1)
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_a_missing_python_for_workers_is_a_clear_error(bundle_tp2):
    from builder.engine.service import EngineService
    from builder.errors import ServeError

    with pytest.raises(ServeError, match="python executable '/nonexistent/python3' does not exist"):
        EngineService(bundle_tp2, python_executable="/nonexistent/python3")


def test_a_dead_rank_fails_the_scheduled_requests_and_the_service_says_so(bundle_tp2):
    """Continuous batching (``EngineService.scheduler``): a killed rank fails the running request with the rank
    named, ``broken`` says why, and a later request is answered with that error at once, never queued forever."""
    import threading

    from builder.engine.service import EngineService, GenerationRequest

    with EngineService(bundle_tp2, threads_per_rank=1) as svc:
        sched = svc.scheduler(max_batch=4)
        tokens, results, seen = [], {}, threading.Condition()

        def done(name):
            def on_done(res):
                with seen:
                    results[name] = res
                    seen.notify_all()
            return on_done

        def on_token(tok):
            with seen:
                tokens.append(tok)
                seen.notify_all()

        sched.submit(GenerationRequest([5, 6, 7], SamplingParams(max_tokens=400)), on_done=done("victim"),
                     on_token=on_token)
        with seen:
            assert seen.wait_for(lambda: len(tokens) >= 2 or "victim" in results, timeout=120)
        svc._procs[0].kill()
        with seen:
            assert seen.wait_for(lambda: "victim" in results, timeout=120)
        res = results["victim"]
        assert res.finish_reason == "error" and "engine rank 1 exited" in res.error
        assert svc.broken and "engine rank 1 exited" in svc.broken
        t0 = time.monotonic()
        sched.submit(GenerationRequest([5, 6], SamplingParams(max_tokens=2)), on_done=done("later"))
        with seen:
            assert seen.wait_for(lambda: "later" in results, timeout=30)
        assert results["later"].error == svc.broken and time.monotonic() - t0 < 5
