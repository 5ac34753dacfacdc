"""Run a real ``tritonserver`` on a model repository: find the binary, fix its environment, wait until the models
are ready, watch their health, forward SIGTERM and stop cleanly.

CPU hosts use the ``tritonserver`` 2.51 shipped in the ``nvidia-pytriton`` wheel, which needs three environment
fixes (docs/upstream-facts.md#U-TRITON-1): the wheel's bundled libraries and the interpreter's ``LIBDIR`` on ``LD_LIBRARY_PATH`` (otherwise the
stub loads another libpython: ``'_thread.RLock' object has no attribute '_recursion_count'``), ``python3`` on
``PATH`` being this interpreter with numpy < 2 (the stub takes ``python3`` from ``PATH``; numpy 2 garbles inputs), and
a backend directory holding the python backend and the stub for this Python version. GPU hosts (NVIDIA's
``tritonserver:*-trtllm-python-py3`` container) use the container's own ``/opt/tritonserver``, which needs none of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from builder.errors import ServeError

CONTAINER_ROOT = Path("/opt/tritonserver")
DEFAULT_EXIT_TIMEOUT_S = 20
LOOPBACK = "127.0.0.1"
# Log lines after which a served model cannot answer again until tritonserver restarts (``serve_forever``):
# Triton 2.51's own line for a crashed python-backend stub, and the CPU model's line for an engine whose ranks can
# no longer work together (its ENGINE_BROKEN, triton_repo/templates/trtllm-1.2.1/cpu/tensorrt_llm/1/model.py; the
# Python backend of Triton 2.51 has no hook by which a model could mark itself not ready).
UNHEALTHY_MARKERS = {"is not healthy": "python-backend stub is not healthy",
                     "dsbuild cpu model: the engine cannot continue": "the CPU model's engine cannot continue"}


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


@dataclass(frozen=True)
class Installation:
    """Where a usable ``tritonserver`` lives and what it needs around it."""

    kind: str  # "container" | "pytriton-wheel"
    binary: Path
    backend_source: Path  # the directory holding ``python/`` (the python backend)
    stub: Path | None  # the python-backend stub for this interpreter (wheel only; the container's is in place)
    lib_dirs: tuple[Path, ...] = ()


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(host: str = LOOPBACK) -> Ports:
    """Three distinct free ports (asked for while all three sockets are open, so they differ)."""
    socks = []
    try:
        for _ in range(3):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return Ports(*(s.getsockname()[1] for s in socks))
    finally:
        for s in socks:
            s.close()


def resolve_ports(ports: Ports, host: str = LOOPBACK, *, extra: tuple[int, ...] = ()) -> tuple[Ports, tuple[int, ...]]:
    """``ports`` (and ``extra`` ports, e.g. the OpenAI endpoint's) with every 0 replaced by a free port on ``host``,
    all distinct from each other and from the ports given (tritonserver itself takes no 0). The ports are free
    when chosen; another process could take one before tritonserver binds it, which then fails to start."""
    wanted = [ports.http, ports.grpc, ports.metrics, *extra]
    taken = {p for p in wanted if p}
    socks = []
    try:
        for i, p in enumerate(wanted):
            while p == 0:
                s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
                s.bind((host, 0))
                socks.append(s)  # held open until all are chosen, so they differ
                candidate = s.getsockname()[1]
                if candidate not in taken:
                    p = candidate
            wanted[i] = p
            taken.add(p)
    finally:
        for s in socks:
            s.close()
    return Ports(*wanted[:3]), tuple(wanted[3:])


def find_installation(*, prefer: str | None = None) -> Installation:
    """The container's tritonserver when running in NVIDIA's Triton container, else the pytriton wheel's."""
    container_bin = CONTAINER_ROOT / "bin" / "tritonserver"
    if prefer != "pytriton-wheel" and container_bin.is_file() and os.access(container_bin, os.X_OK):
        return Installation("container", container_bin, CONTAINER_ROOT / "backends", None)
    if prefer == "container":
        raise ServeError(f"no tritonserver at {container_bin}; run inside NVIDIA's Triton container")
    try:
        import pytriton  # noqa: F401  (only to locate the wheel's files)
    except ImportError:
        raise ServeError("no tritonserver found: install dsbuild[triton] (nvidia-pytriton) or run inside NVIDIA's "
                         "Triton container") from None
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
    binary = root / "bin" / "tritonserver"
    for needed in (binary, stub, root / "backends" / "python" / "libtriton_python.so"):
        if not needed.is_file():
            raise ServeError(f"the nvidia-pytriton wheel lacks {needed} (Python {py} stub needed)")
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return Installation("pytriton-wheel", binary, root / "backends", stub, (libs,) if libs.is_dir() else ())


def python_bin_dir() -> Path:
    """The directory of this interpreter, holding a ``python3`` the stub will pick up from ``PATH``."""
    exe = Path(sys.executable)
    d = exe.parent
    if not (d / "python3").exists():
        raise ServeError(f"{d} has no python3; the python-backend stub takes python3 from PATH")
    return d


def check_stub_python(env: dict[str, str]) -> str:
    """The numpy version of the ``python3`` the stub will use; numpy 2 garbles the stub's inputs (docs/upstream-facts.md#U-TRITON-1)."""
    proc = subprocess.run(["python3", "-c", "import numpy, sys; print(numpy.__version__); print(sys.version_info[:2])"],
                          env=env, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ServeError(f"python3 on the server's PATH cannot import numpy: {proc.stderr.strip().splitlines()[-1:]}")
    version = proc.stdout.split()[0]
    if int(version.split(".")[0]) >= 2:
        raise ServeError(f"python3 on the server's PATH has numpy {version}; the Triton 2.51 python stub needs numpy<2")
    return version


def prepare_backends(inst: Installation, work: Path) -> Path:
    """A backend directory: the python backend plus this interpreter's stub next to it (wheel layout only)."""
    if inst.stub is None:
        return inst.backend_source
    dst = work / "backends" / "python"
    dst.mkdir(parents=True, exist_ok=True)
    for f in (inst.backend_source / "python").iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    shutil.copy2(inst.stub, dst / "triton_python_backend_stub")
    return work / "backends"


def server_env(inst: Installation, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    if inst.kind == "pytriton-wheel":
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        parts = [str(p) for p in inst.lib_dirs] + ([libdir] if libdir else [])
        if env.get("LD_LIBRARY_PATH"):
            parts.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(parts)
        env["PATH"] = os.pathsep.join([str(python_bin_dir()), env.get("PATH", "")])
    return env


def server_command(inst: Installation, *, repo: Path, ports: Ports, host: str, backend_dir: Path,
                   exit_timeout_s: int, log_verbose: int = 0) -> list[str]:
    return [
        str(inst.binary), f"--model-repository={repo}", f"--backend-directory={backend_dir}",
        f"--http-address={host}", f"--http-port={ports.http}", f"--grpc-address={host}", f"--grpc-port={ports.grpc}",
        f"--metrics-address={host}", f"--metrics-port={ports.metrics}", "--allow-metrics=true",
        "--exit-on-error=false", "--strict-readiness=true", f"--exit-timeout-secs={exit_timeout_s}",
        f"--log-verbose={log_verbose}",
    ]


@dataclass
class ModelState:
    name: str
    version: str
    state: str  # READY | UNAVAILABLE | LOADING | UNLOADING
    reason: str


@dataclass
class TritonServer:
    """One ``tritonserver`` process. Use as a context manager, or ``start()``/``stop()``."""

    repo: Path
    ports: Ports = field(default_factory=free_ports)
    host: str = LOOPBACK
    exit_timeout_s: int = DEFAULT_EXIT_TIMEOUT_S
    installation: Installation | None = None
    log_path: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.repo = Path(self.repo).resolve()
        self.proc: subprocess.Popen | None = None
        self._work: Path | None = None
        self._log_fh = None
        self._log_start = 0

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> "TritonServer":
        if not self.repo.is_dir():
            raise ServeError(f"model repository {self.repo} does not exist")
        inst = self.installation or find_installation()
        self._work = Path(tempfile.mkdtemp(prefix="dsbuild-triton-"))
        backend_dir = prepare_backends(inst, self._work)
        env = server_env(inst)
        env.update(self.extra_env)
        if inst.kind == "pytriton-wheel":
            check_stub_python(env)
        if self.log_path is None:
            self.log_path = self._work / "tritonserver.log"
        # Only this run's part of an appended log counts (an earlier run's stub failure must not fail this one).
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log_fh = open(self.log_path, "ab")
        cmd = server_command(inst, repo=self.repo, ports=self.ports, host=self.host, backend_dir=backend_dir,
                             exit_timeout_s=self.exit_timeout_s)
        # Own process group: a SIGTERM to us is forwarded once, not delivered twice by the terminal.
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log_fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, wait (Triton waits up to its exit timeout for in-flight requests), then SIGKILL the group."""
        timeout = self.exit_timeout_s + 10 if timeout is None else timeout
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)
                try:
                    rc = self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    rc = self.proc.wait(timeout=30)
            else:
                rc = self.proc.returncode
            # Stubs and engine workers live in the server's session; none may outlive it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        if self._work is not None:
            # The log stays (in the temporary directory, named in errors) only when the server failed.
            log_inside = self.log_path is not None and self._work in self.log_path.parents
            shutil.rmtree(self._work if (rc == 0 or not log_inside) else self._work / "backends", ignore_errors=True)
            self._work = None
        return rc

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    # -- state -------------------------------------------------------------------------------------------------
    def _get(self, path: str, *, method: str = "GET", body: bytes | None = None, timeout: float = 5) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def live(self) -> bool:
        try:
            return self._get("/v2/health/live")[0] == 200
        except (urllib.error.URLError, OSError):
            return False

    def model_ready(self, name: str) -> bool:
        try:
            return self._get(f"/v2/models/{name}/ready")[0] == 200
        except (urllib.error.URLError, OSError):
            return False

    def model_index(self) -> list[ModelState]:
        """Triton's repository index: every model with its state and the reason it is not ready."""
        status, body = self._get("/v2/repository/index", method="POST", body=b"{}")
        if status != 200:
            raise ServeError(f"repository index request failed with HTTP {status}: {body[:200]!r}")
        return [ModelState(m.get("name", ""), str(m.get("version", "")), m.get("state", ""), m.get("reason", ""))
                for m in json.loads(body)]

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as fh:
            fh.seek(self._log_start)
            return fh.read().decode(errors="replace")

    def wait_ready(self, *, models: list[str] | None, timeout: float = 300,
                   poll_s: float = 0.25) -> list[ModelState]:
        """Wait until the server is live and ``models`` are READY (or, for ``None``, until no model is loading).

        Raises ServeError as soon as the server exits or a requested model fails to load, with Triton's reason.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise ServeError(f"tritonserver exited with code {self.proc.returncode if self.proc else '?'} "
                                 f"before becoming ready: {self._log_tail()}")
            if self.live():
                try:
                    index = self.model_index()
                except (ServeError, urllib.error.URLError, OSError):
                    index = None
                if index is not None:
                    states = {m.name: m for m in index}
                    wanted = models if models is not None else list(states)
                    pending = [n for n in wanted if n not in states or states[n].state in ("", "LOADING")]
                    failed = [states[n] for n in wanted if n in states and states[n].state == "UNAVAILABLE"]
                    if failed and models is not None:
                        m = failed[0]
                        reason = (m.reason or "no reason given").strip().splitlines()[0]
                        raise ServeError(f"model {m.name} failed to load: {reason}")
                    if not pending:
                        return index
            time.sleep(poll_s)
        raise ServeError(f"tritonserver did not get {models or 'its models'} ready within {timeout:.0f} s")

    def stub_pids(self) -> set[int]:
        """The python-backend stub processes (one per model instance) of this server."""
        import psutil

        if not self.running:
            return set()
        try:
            children = psutil.Process(self.proc.pid).children(recursive=False)
        except psutil.NoSuchProcess:
            return set()
        out = set()
        for child in children:
            try:
                if "triton_python_backend_stub" in " ".join(child.cmdline()[:1]) or \
                        child.name().startswith("triton_python"):
                    out.add(child.pid)
            except psutil.Error:
                continue
        return out

    def unhealthy_reason(self, models: list[str], stubs: set[int] | None = None) -> str | None:
        """Why the server can no longer serve ``models`` (dead process, stub crash, model not ready), else None.
        ``stubs``: the stub pids seen when the models became ready; a vanished one means a crashed stub, which
        Triton 2.51 only notices at the next request."""
        if not self.running:
            return f"tritonserver exited with code {self.proc.returncode if self.proc else '?'}"
        if stubs:
            gone = stubs - self.stub_pids()
            if gone:
                return f"python-backend stub process {sorted(gone)[0]} died"
        log = self.log_text()
        for marker, what in UNHEALTHY_MARKERS.items():
            if marker in log:
                line = next((l for l in log.splitlines() if marker in l), marker)
                return f"{what}: {line.strip()[-200:]}"
        for name in models:
            if not self.model_ready(name):
                return f"model {name} is no longer ready"
        return None

    def _log_tail(self, lines: int = 15) -> str:
        text = self.log_text().strip().splitlines()
        return " | ".join(text[-lines:]) if text else "(no log output)"


def serve_forever(*, repo: Path, ports: Ports, host: str = LOOPBACK, models: list[str] | None = None,
                  ready_timeout: float = 600, health_interval_s: float = 2.0, max_restarts: int = 2,
                  exit_timeout_s: int = DEFAULT_EXIT_TIMEOUT_S, log: Callable[[str], None] = print,
                  log_path: Path | None = None, stop_event: threading.Event | None = None) -> int:
    """Run Triton in the foreground until SIGTERM/SIGINT (forwarded to the server), restarting it when its
    model becomes unhealthy (a crashed stub leaves Triton 2.51 answering "Stub process is not healthy" and the model
    can hang in UNLOADING, so a restart is the only reliable cure) up to ``max_restarts`` times. Returns 0 on a
    requested shutdown; raises ServeError when the server cannot be (re)started."""
    stop_event = stop_event or threading.Event()
    previous = {}

    def on_signal(signum, frame):  # noqa: ARG001
        stop_event.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    restarts = 0
    try:
        while True:
            server = TritonServer(repo=repo, ports=ports, host=host, exit_timeout_s=exit_timeout_s, log_path=log_path)
            server.start()
            try:
                index = _wait_ready_or_stop(server, models, ready_timeout, stop_event)
                if index is None:
                    log("shutting down")
                    server.stop()
                    return 0
                names = models if models is not None else [m.name for m in index if m.state == "READY"]
                for m in index:
                    log(f"model {m.name} v{m.version}: {m.state}" + (f" ({m.reason})" if m.reason else ""))
                log(f"serving on http://{server.http_url} grpc {server.grpc_url} "
                    f"metrics http://{host}:{ports.metrics}/metrics")
                reason = None
                stubs = server.stub_pids()
                while not stop_event.wait(health_interval_s):
                    reason = server.unhealthy_reason(names, stubs)
                    if reason:
                        break
                if reason is None:
                    log("SIGTERM received: stopping tritonserver")
                    rc = server.stop()
                    log(f"tritonserver stopped (exit code {rc})")
                    return 0
                log(f"unhealthy: {reason}")
                server.stop(timeout=10)
                restarts += 1
                if restarts > max_restarts:
                    raise ServeError(f"tritonserver became unhealthy {restarts} times, last: {reason}")
                log(f"restarting tritonserver ({restarts}/{max_restarts})")
            except BaseException:
                server.stop(timeout=10)
                raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_ready_or_stop(server: TritonServer, models: list[str] | None, timeout: float,
                        stop_event: threading.Event) -> list[ModelState] | None:
    deadline = time.monotonic() + timeout
    while not stop_event.is_set():
        try:
            return server.wait_ready(models=models, timeout=min(2.0, max(0.1, deadline - time.monotonic())))
        except ServeError as exc:
            if "did not get" not in str(exc) or time.monotonic() >= deadline:
                raise
    return None
