"""The tritonserver environment fixes of docs/upstream-facts.md#U-TRITON-1, and which binary is chosen."""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

import pytest

from builder.errors import ServeError
from triton_repo import server


def test_wheel_installation_environment_and_backend_dir(tmp_path):
    inst = server.find_installation(prefer="pytriton-wheel")
    assert inst.kind == "pytriton-wheel" and inst.binary.is_file()
    env = server.server_env(inst, {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/keep"})
    ld = env["LD_LIBRARY_PATH"].split(":")
    assert sysconfig.get_config_var("LIBDIR") in ld and ld[-1] == "/keep"
    assert any(p.endswith("nvidia_pytriton.libs") for p in ld)
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert server.check_stub_python(env).startswith("1.")
    backends = server.prepare_backends(inst, tmp_path)
    assert (backends / "python" / "libtriton_python.so").is_file()
    assert os.access(backends / "python" / "triton_python_backend_stub", os.X_OK)
    cmd = server.server_command(inst, repo=tmp_path, ports=server.Ports(1, 2, 3), host="127.0.0.1",
                                backend_dir=backends, exit_timeout_s=7)
    assert f"--backend-directory={backends}" in cmd and "--exit-on-error=false" in cmd
    assert "--http-address=127.0.0.1" in cmd and "--grpc-address=127.0.0.1" in cmd and "--exit-timeout-secs=7" in cmd


def test_numpy_2_on_the_stub_path_is_refused(tmp_path):
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\necho 2.1.0\necho '(3, 11)'\n")
    fake.chmod(0o755)
    with pytest.raises(ServeError, match="numpy 2.1.0; the Triton 2.51 python stub needs numpy<2"):
        server.check_stub_python({"PATH": str(tmp_path)})


def test_container_binary_is_preferred_when_present(tmp_path, monkeypatch):
    root = tmp_path / "opt" / "tritonserver"
    (root / "bin").mkdir(parents=True)
    (root / "backends" / "python").mkdir(parents=True)
    binary = root / "bin" / "tritonserver"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setattr(server, "CONTAINER_ROOT", root)
    inst = server.find_installation()
    assert inst.kind == "container" and inst.binary == binary and inst.stub is None
    assert server.prepare_backends(inst, tmp_path / "work") == root / "backends"
    env = server.server_env(inst, {"PATH": "/usr/bin"})
    assert env == {"PATH": "/usr/bin"}  # the container needs none of the wheel's fixes
    monkeypatch.setattr(server, "CONTAINER_ROOT", tmp_path / "absent")
    with pytest.raises(ServeError, match="no tritonserver at"):
        server.find_installation(prefer="container")


def test_free_ports_are_distinct():
    ports = server.free_ports()
    assert len({ports.http, ports.grpc, ports.metrics}) == 3


def test_zero_ports_become_distinct_free_ports_and_given_ones_stay():
    fixed = server.free_port()
    ports, extra = server.resolve_ports(server.Ports(0, fixed, 0), extra=(0, 0))
    assert ports.grpc == fixed
    chosen = [ports.http, ports.metrics, *extra]
    assert 0 not in chosen and len(set(chosen) | {fixed}) == 5
    assert server.resolve_ports(server.Ports(1, 2, 3)) == (server.Ports(1, 2, 3), ())


def test_missing_repository_is_refused(tmp_path):
    with pytest.raises(ServeError, match="does not exist"):
        server.TritonServer(repo=tmp_path / "nope").start()


def test_the_cpu_models_engine_broken_line_is_an_unhealthy_marker():
    """`dsbuild serve` restarts tritonserver on the line the CPU model logs when its engine cannot continue
    (tests/hardening/test_serving_requests.py kills a rank of a served model to see it happen)."""
    import re

    template = Path(server.__file__).parent / "templates" / "trtllm-1.2.1" / "cpu" / "tensorrt_llm" / "1" / "model.py"
    line = re.search(r'^ENGINE_BROKEN = "([^"]+)"', template.read_text(), re.M)
    assert line and line.group(1) in server.UNHEALTHY_MARKERS
    assert "is not healthy" in server.UNHEALTHY_MARKERS  # Triton 2.51's own line for a crashed stub
