"""Two `dsbuild run` processes on one run directory: one fails with the lock message (or, with --wait, waits and
then finds everything cached); the finished directory is never a mix (every stage key and output sha256 equal a
clean run's)."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.conftest import DSBUILD, REPO
from tests.hardening import record
from tests.hardening.test_kill_harness import ORDER, assert_manifest_lists_only_complete_outputs, digests


def start(tmp_path, env, *args):
    return subprocess.Popen([*DSBUILD, "run", "--out", "build/r", "--json", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def env(cache_dir):
    base = {k: v for k, v in os.environ.items() if not k.startswith("DSBUILD_")}
    return {**base, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(cache_dir), "OMP_NUM_THREADS": "1"}


@pytest.fixture
def clean(tmp_path, env):
    root = tmp_path / "clean"
    root.mkdir()
    subprocess.run([*DSBUILD, "run", "--out", "build/r"], cwd=root, env=env, check=True, capture_output=True)
    return digests(root / "build/r", ORDER)


def statuses(stdout: str) -> set[str]:
    return {s["status"] for s in json.loads(stdout)["stages"]}


@pytest.mark.parametrize("rounds", [pytest.param(1, id="fast"), pytest.param(5, id="slow", marks=pytest.mark.slow)])
def test_two_runs_at_once_one_fails_with_the_lock_message(tmp_path, env, clean, rounds):
    outcomes = []
    for i in range(rounds):
        work = tmp_path / f"round{i}"
        work.mkdir()
        a = start(work, env)
        time.sleep(0.3 * i)  # different overlaps: both starting together, the second arriving mid-run
        b = start(work, env)
        (out_a, err_a), (out_b, err_b) = a.communicate(timeout=600), b.communicate(timeout=600)
        codes = sorted([a.returncode, b.returncode])
        loser_err = err_a if a.returncode else err_b
        if codes == [0, 12]:
            assert "another dsbuild process (pid" in loser_err and "is working on build/r" in loser_err
            assert "--wait" in loser_err and "Traceback" not in loser_err
        else:  # the second started after the first finished: it found everything cached
            assert codes == [0, 0], (err_a, err_b)
            assert "cached" in statuses(out_a) | statuses(out_b)
        outcomes.append(codes)
        run_dir = work / "build/r"
        assert_manifest_lists_only_complete_outputs(run_dir)
        assert digests(run_dir, ORDER) == clean
        assert not [p.name for p in run_dir.iterdir() if ".tmp-" in p.name]
    assert [0, 12] in outcomes  # the lock was really contended at least once
    record.add("concurrency", "two-runs-no-wait", rounds=rounds, outcomes=outcomes)


def test_two_runs_with_wait_second_finds_everything_cached(tmp_path, env, clean):
    a = start(tmp_path, env | {"DSBUILD_FAULT_PAUSE": "quantize:3"})
    assert "fault-pause quantize" in a.stdout.readline()  # a holds the lock mid-run
    b = start(tmp_path, env, "--wait")
    out_a, err_a = a.communicate(timeout=600)
    out_b, err_b = b.communicate(timeout=600)
    assert a.returncode == 0 and b.returncode == 0, (err_a, err_b)
    assert statuses(out_b) == {"cached"}, out_b
    assert digests(tmp_path / "build/r", ORDER) == clean
    record.add("concurrency", "two-runs-with-wait", rounds=1)
