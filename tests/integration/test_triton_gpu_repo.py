"""The GPU-flavour repository on the real (CPU) tritonserver: everything up to TensorRT-LLM works — Triton parses
config.pbtxt, model.py imports, auto_complete_config reads model.yaml — and the load fails only because
TensorRT-LLM is not installed, with exactly that reason in Triton's repository index."""

from __future__ import annotations

import pytest

from tests.support.triton import fixed_inputs
from triton_repo.package import write_package
from triton_repo.server import TritonServer

pytestmark = [pytest.mark.server]


def test_gpu_repository_fails_only_for_missing_tensorrt_llm(tmp_path):
    write_package(fixed_inputs("gpu", "1.2.1"), tmp_path / "package")
    (tmp_path / "quantized").mkdir()  # the checkpoint model.yaml names, under the deploy directory (checked first)
    with TritonServer(repo=tmp_path / "package" / "triton_repo", log_path=tmp_path / "triton.log") as server:
        index = server.wait_ready(models=None, timeout=120)
        assert server.live()
        (model,) = index
        assert (model.name, model.version, model.state) == ("tensorrt_llm", "1", "UNAVAILABLE")
        assert "No module named 'tensorrt_llm'" in model.reason
        assert "model.py" in model.reason and "initialize" in model.reason  # failed inside initialize, not earlier
        log = server.log_text()
        # auto_complete_config ran (it reads model.yaml) and no other error was logged for the model.
        errors = [l for l in log.splitlines() if l.startswith("E") and "tensorrt_llm" in l]
        assert errors and all("No module named 'tensorrt_llm'" in l for l in errors), errors
        assert not server.model_ready("tensorrt_llm")
    assert not server.running


def test_serve_command_reports_the_load_failure(tmp_path, dsbuild):
    write_package(fixed_inputs("gpu", "1.2.1"), tmp_path / "package")
    (tmp_path / "quantized").mkdir()  # the checkpoint model.yaml names, under the deploy directory (checked first)
    from triton_repo.server import free_port

    # Port 0: dsbuild serve chooses free ports and prints them (tritonserver itself would print its usage text).
    metrics = free_port()
    proc = dsbuild("serve", "--repo", str(tmp_path / "package" / "triton_repo"), "--http-port", "0",
                   "--grpc-port", "0", "--metrics-port", str(metrics), "--ready-timeout", "120", timeout=200)
    assert proc.returncode == 9, proc.stderr
    chosen = next(l for l in proc.stderr.splitlines() if l.startswith("free ports chosen: "))
    parts = dict(p.split(" ") for p in chosen.removeprefix("free ports chosen: ").split(", "))
    assert set(parts) == {"http", "grpc"}  # only those asked as 0; metrics kept its port
    ports = {int(v.rsplit(":", 1)[1]) for v in parts.values()}
    assert len(ports) == 2 and 0 not in ports and metrics not in ports
    assert "Usage:" not in proc.stderr and "--http-port" not in proc.stderr
    assert "model tensorrt_llm failed to load" in proc.stderr
    assert "No module named 'tensorrt_llm'" in proc.stderr


def test_serve_command_refuses_a_directory_that_is_not_a_repository(tmp_path, dsbuild):
    proc = dsbuild("serve", "--repo", str(tmp_path))
    assert proc.returncode == 9 and "not a dsbuild Triton repository" in proc.stderr
