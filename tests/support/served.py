"""Start ``dsbuild serve`` on free 127.0.0.1 ports for a test, and always stop it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.conftest import DSBUILD, REPO


@dataclass
class Served:
    proc: subprocess.Popen
    http: str
    grpc: str
    log: Path
    stderr_lines: list[str]


@contextlib.contextmanager
def serve_repo(repo: Path, log: Path, *, exit_timeout: int = 10, ready_timeout: float = 300) -> Iterator[Served]:
    from triton_repo.server import free_ports

    ports = free_ports()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*DSBUILD, "serve", "--repo", str(repo), "--http-port", str(ports.http),
                             "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics),
                             "--exit-timeout", str(exit_timeout), "--log-file", str(log)],
                            env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def pump():
        for line in proc.stderr:
            lines.append(line)
            if "serving on" in line:
                ready.set()
    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + ready_timeout
        while not ready.wait(0.5):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, f"server not ready in {ready_timeout} s:\n" + "".join(lines)
        yield Served(proc, f"127.0.0.1:{ports.http}", f"127.0.0.1:{ports.grpc}", log, lines)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
