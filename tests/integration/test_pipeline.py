"""The staged pipeline end to end on the tiny model: caching, --force, crash safety, bad options."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import DSBUILD, REPO


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def test_run_then_rerun_is_cached_and_force_rebuilds_downstream(dsbuild, tmp_path):
    first = dsbuild("run", "--json", check=True)
    stages = [s["stage"] for s in json.loads(first.stdout)["stages"]]
    assert stages[:4] == ["plan", "fetch", "quantize", "build"]
    assert all(s["status"] == "built" for s in json.loads(first.stdout)["stages"])
    run_dir = tmp_path / "build" / "tiny-fp8-tp2pp2ep1"
    assert (tmp_path / "build" / "latest").resolve() == run_dir.resolve()
    m = manifest(run_dir)
    for name, entry in m["stages"].items():
        for f in entry["outputs"]:
            assert (run_dir / f["path"]).stat().st_size == f["size"], f

    t0 = time.perf_counter()
    second = json.loads(dsbuild("run", "--json", check=True).stdout)["stages"]
    assert all(s["status"] == "cached" for s in second), second
    assert time.perf_counter() - t0 < 30

    forced = {s["stage"]: s["status"] for s in json.loads(dsbuild("run", "--json", "--force", "quantize", check=True).stdout)["stages"]}
    assert forced["plan"] == forced["fetch"] == "cached"
    assert forced["quantize"] == forced["build"] == "built"
    assert all(v == "built" for k, v in forced.items() if k not in ("plan", "fetch"))


def test_changed_option_rebuilds_only_affected_stages(dsbuild, tmp_path):
    dsbuild("run", "--out", "build/r", check=True)
    res = {s["stage"]: s["status"] for s in
           json.loads(dsbuild("run", "--out", "build/r", "--tp", "4", "--json", check=True).stdout)["stages"]}
    assert res["fetch"] == res["quantize"] == "cached"
    assert res["plan"] == res["build"] == "built"
    assert len(list((tmp_path / "build/r/engines").glob("rank*.safetensors"))) == 8


def test_sigkill_before_rename_leaves_nothing_listed_and_rerun_completes(tmp_path, cache_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(cache_dir),
           "DSBUILD_FAULT_PAUSE": "build:30"}
    proc = subprocess.Popen([*DSBUILD, "run"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    run_dir = tmp_path / "build" / "tiny-fp8-tp2pp2ep1"
    line = proc.stdout.readline()
    assert "fault-pause build" in line, line + proc.stderr.read()
    temps = list(run_dir.glob(".engines.tmp-*"))
    assert temps and list(temps[0].glob("rank*.safetensors"))  # the stage had written its files
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    m = manifest(run_dir)
    assert "build" not in m["stages"] and not (run_dir / "engines").exists()
    assert set(m["stages"]) == {"plan", "fetch", "quantize"}

    env.pop("DSBUILD_FAULT_PAUSE")
    out = subprocess.run([*DSBUILD, "run", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    status = {s["stage"]: s["status"] for s in json.loads(out.stdout)["stages"]}
    assert status["build"] == "built" and status["quantize"] == "cached"
    assert not list(run_dir.glob(".*.tmp-*"))
    assert len(list((run_dir / "engines").glob("rank*.safetensors"))) == 4


@pytest.mark.parametrize("args,message", [
    (["--quant", "int3"], "Invalid value for '--quant': 'int3' is not one of"),
    (["--tp", "3"], "TP 3 does not divide the 16 attention heads"),
    (["--pp", "5"], "PP 5 is larger than the model's 4 layers"),
    (["--model", "./nowhere"], "model path ./nowhere is not a directory"),
    (["--tp", "2", "--ep", "4"], "EP 4 must divide TP 2"),
])
def test_bad_options_exit_nonzero_with_one_sentence_and_write_nothing(dsbuild, tmp_path, args, message):
    res = dsbuild("run", *args)
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()
    assert message in res.stderr, res.stderr
    assert len(err) == 1 or "Usage" in res.stderr or "Error" in res.stderr
    assert not (tmp_path / "build").exists() or not any((tmp_path / "build").rglob("manifest.json"))


def test_bad_value_from_env_or_config_file_is_named(dsbuild, tmp_path):
    res = dsbuild("run", env={"DSBUILD_QUANT": "int3"})
    assert res.returncode == 2 and "invalid value 'int3' for quant" in res.stderr, res.stderr
    (tmp_path / "c.yaml").write_text("tp: 2\nunknown_knob: 1\n")
    res = dsbuild("run", "--config", "c.yaml")
    assert res.returncode == 2 and "unknown option 'unknown_knob'" in res.stderr, res.stderr
    (tmp_path / "c.yaml").write_text("tp: 4\n")
    res = dsbuild("run", "--config", "c.yaml", "--dry-run", "--json", env={"DSBUILD_PP": "1"})
    assert res.returncode == 0, res.stderr
    assert "tiny-fp8-tp4pp1ep1" in json.loads(res.stdout)["run_dir"]
    res = dsbuild("run", "--config", "c.yaml", "--tp", "8", "--dry-run", "--json", env={"DSBUILD_PP": "1"})
    assert "tiny-fp8-tp8pp1ep1" in json.loads(res.stdout)["run_dir"]


def test_model_dir_without_config_json(dsbuild, tmp_path):
    (tmp_path / "empty").mkdir()
    res = dsbuild("run", "--model", str(tmp_path / "empty"))
    assert res.returncode == 3
    assert "has no config.json" in res.stderr
    assert not (tmp_path / "build").exists() or not any((tmp_path / "build").rglob("manifest.json"))


def test_second_process_on_the_same_run_dir_fails_clearly(tmp_path, cache_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(cache_dir), "DSBUILD_FAULT_PAUSE": "quantize:20"}
    first = subprocess.Popen([*DSBUILD, "run"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        assert "fault-pause quantize" in first.stdout.readline()
        env.pop("DSBUILD_FAULT_PAUSE")
        second = subprocess.run([*DSBUILD, "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 12
        assert "another dsbuild process" in second.stderr and "--wait" in second.stderr
    finally:
        first.kill()
        first.wait()
