"""``make bench``: serve a run with ``dsbuild serve`` in the background on free loopback ports, run
``dsbuild bench`` against it (JSON and PNG into ``<run>/bench/``), and stop the server whatever happens.

Usage: ``python -m triton_repo.bench.serve_and_bench --run build/latest [-- BENCH FLAGS...]``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from builder.errors import ServeError

READY_TIMEOUT_S = 600


def serve_and_bench(run_dir: Path, bench_args: list[str]) -> int:
    from triton_repo.server import free_ports

    run_dir = run_dir.resolve()  # build/latest is a link: results go into the run it names
    repo = run_dir / "package" / "triton_repo"
    if not repo.is_dir():
        raise ServeError(f"{run_dir} has no package/triton_repo to serve; run `make engine` (or `dsbuild run`) first")
    out = run_dir / "bench"
    out.mkdir(exist_ok=True)
    ports = free_ports()
    dsbuild = [sys.executable, "-m", "builder.cli"]
    server = subprocess.Popen([*dsbuild, "serve", "--repo", str(repo), "--http-port", str(ports.http),
                               "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics),
                               "--log-file", str(out / "tritonserver.log")],
                              stderr=subprocess.PIPE, text=True, env={**os.environ})
    ready = threading.Event()

    def pump() -> None:
        for line in server.stderr:
            sys.stderr.write(f"[serve] {line}")
            if "serving on" in line:
                ready.set()
    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.wait(0.5):
            if server.poll() is not None:
                raise ServeError(f"dsbuild serve exited with code {server.returncode} before serving {repo}")
            if time.monotonic() > deadline:
                raise ServeError(f"dsbuild serve did not get {repo} ready within {READY_TIMEOUT_S} s")
        return subprocess.call([*dsbuild, "bench", "--url", f"127.0.0.1:{ports.grpc}", "--run", str(run_dir),
                                "--output", str(out / "result.json"), "--plot", str(out / "bench.png"),
                                *bench_args])
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def main(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    words, bench_args = argv[:split], argv[split + 1:]
    if len(words) != 2 or words[0] != "--run":
        print("usage: python -m triton_repo.bench.serve_and_bench --run RUN_DIR [-- BENCH FLAGS...]", file=sys.stderr)
        return 2
    try:
        return serve_and_bench(Path(words[1]), bench_args)
    except ServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
