"""Run the endpoint on uvicorn (``dsbuild openai``), and keep it running beside ``dsbuild serve``'s Triton
(``dsbuild serve --openai-port``): a child process, started before Triton is ready (it waits for nothing but its
port), restarted if it dies, stopped with the server."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import uvicorn

from builder.errors import ServeError
from triton_repo.interface import MODEL_NAME
from triton_repo.openai_api.app import Endpoint, build_app
from triton_repo.openai_api.deployment import served_model
from triton_repo.openai_api.triton_backend import TritonBackend

READY_LINE = "OpenAI API on"


def run(*, triton_url: str, repo: Path, host: str, port: int, model_name: str = MODEL_NAME,
        tokenizer_dir: Path | None = None, log: Callable[[str], None] = print) -> None:
    """Serve until SIGTERM/SIGINT. Fails before binding when the repository's checkpoint cannot be read."""
    served = served_model(repo, tokenizer_dir=tokenizer_dir)
    endpoint = Endpoint(served=served, model_name=model_name, created=int(time.time()))
    server: uvicorn.Server | None = None

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        endpoint.backend = TritonBackend(triton_url)

        async def announce() -> None:
            while server is not None and not server.started:
                await asyncio.sleep(0.05)
            log(f"{READY_LINE} http://{host}:{port}/v1 (model {model_name}; Triton gRPC {triton_url}; "
                f"checkpoint {served.checkpoint})")
        task = asyncio.ensure_future(announce())
        try:
            yield
        finally:
            task.cancel()
            await endpoint.backend.close()

    config = uvicorn.Config(build_app(endpoint, lifespan=lifespan), host=host, port=port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise ServeError(f"the OpenAI endpoint could not listen on {host}:{port}")


def listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


class EndpointProcess:
    """``dsbuild openai`` as a child of ``dsbuild serve``."""

    def __init__(self, *, triton_url: str, repo: Path, host: str, port: int, max_restarts: int = 2,
                 log: Callable[[str], None] = print):
        self.cmd = [sys.executable, "-m", "builder.cli", "openai", "--triton-url", triton_url, "--repo", str(repo),
                    "--host", host, "--port", str(port)]
        self.host, self.port = host, port
        self.max_restarts = max_restarts
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.stopping = threading.Event()
        self.watcher: threading.Thread | None = None

    def start(self, *, ready_timeout: float = 120) -> "EndpointProcess":
        self._spawn()
        deadline = time.monotonic() + ready_timeout
        while not listening(self.host, self.port):
            if self.proc.poll() is not None:
                raise ServeError(f"the OpenAI endpoint exited with code {self.proc.returncode} before listening on "
                                 f"{self.host}:{self.port}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServeError(f"the OpenAI endpoint did not listen on {self.host}:{self.port} within "
                                 f"{ready_timeout:.0f} s")
            time.sleep(0.1)
        self.watcher = threading.Thread(target=self._watch, name="openai-endpoint", daemon=True)
        self.watcher.start()
        return self

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, start_new_session=True)

    def _watch(self) -> None:
        restarts = 0
        while not self.stopping.wait(1.0):
            if self.proc.poll() is None:
                continue
            if restarts >= self.max_restarts:
                self.log(f"the OpenAI endpoint exited with code {self.proc.returncode}; not restarting it again")
                return
            restarts += 1
            self.log(f"the OpenAI endpoint exited with code {self.proc.returncode}; restarting it "
                     f"({restarts}/{self.max_restarts})")
            self._spawn()

    def stop(self, timeout: float = 10) -> None:
        self.stopping.set()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
