"""``dsbuild serve`` as a background process on free loopback ports, for ``make bench`` and the serving tests:
started with port 0 (``dsbuild serve`` chooses free ports and prints them, so no other process can take them
between choosing and binding here), waited for until it says it is serving, and always stopped (SIGTERM, then
SIGKILL after a minute)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from builder.errors import ServeError
READY_LINE = "serving on"
CHOSEN_LINE = "free ports chosen: "  # dsbuild serve's line for ports asked as 0: "http 127.0.0.1:N, grpc ..."


@dataclass
class BackgroundServer:
    proc: subprocess.Popen
    http: str  # host:port
    grpc: str
    stderr_lines: list[str]  # everything the server has written to stderr so far (it keeps growing)
    openai: str | None = None  # host:port of the OpenAI-compatible endpoint, when asked for


@contextlib.contextmanager
def serve_in_background(repo: Path, *, log_file: Path, ready_timeout: float, exit_timeout: int | None = None,
                        env: dict[str, str] | None = None, on_line: Callable[[str], None] | None = None,
                        openai: bool = False) -> Iterator[BackgroundServer]:
    """``env``: the server's environment (default: this process's); ``on_line``: called with every stderr line;
    ``openai``: also the OpenAI-compatible endpoint, on another free port."""

    cmd = [sys.executable, "-m", "builder.cli", "serve", "--repo", str(repo), "--http-port", "0", "--grpc-port", "0",
           "--metrics-port", "0", "--log-file", str(log_file)]
    if openai:
        cmd += ["--openai-port", "0"]
    if exit_timeout is not None:
        cmd += ["--exit-timeout", str(exit_timeout)]
    proc = subprocess.Popen(cmd, env=env if env is not None else dict(os.environ), stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()
    chosen: dict[str, str] = {}

    def pump() -> None:
        for line in proc.stderr:
            lines.append(line)
            if on_line is not None:
                on_line(line)
            if line.startswith(CHOSEN_LINE) and not chosen:
                chosen.update(part.split(" ", 1) for part in line[len(CHOSEN_LINE):].strip().split(", "))
            if READY_LINE in line:
                ready.set()
    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + ready_timeout
        while not ready.wait(0.5):
            if proc.poll() is not None:
                raise ServeError(f"dsbuild serve exited with code {proc.returncode} before serving {repo}: "
                                 + "".join(lines[-20:]))
            if time.monotonic() > deadline:
                raise ServeError(f"dsbuild serve did not get {repo} ready within {ready_timeout:.0f} s: "
                                 + "".join(lines[-20:]))
        yield BackgroundServer(proc, chosen["http"], chosen["grpc"], lines, chosen.get("openai"))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
