"""``make bench``: serve a run with ``dsbuild serve`` in the background on free loopback ports, run
``dsbuild bench`` against it (JSON and PNG into ``<run>/bench/``), and stop the server whatever happens.

Usage: ``python -m triton_repo.bench.serve_and_bench --run build/latest [-- BENCH FLAGS...]``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from builder.errors import ServeError
from triton_repo.background import serve_in_background

READY_TIMEOUT_S = 600


def serve_and_bench(run_dir: Path, bench_args: list[str]) -> int:
    run_dir = run_dir.resolve()  # build/latest is a link: results go into the run it names
    repo = run_dir / "package" / "triton_repo"
    if not repo.is_dir():
        raise ServeError(f"{run_dir} has no package/triton_repo to serve; run `make engine` (or `dsbuild run`) first")
    out = run_dir / "bench"
    out.mkdir(exist_ok=True)
    with serve_in_background(repo, log_file=out / "tritonserver.log", ready_timeout=READY_TIMEOUT_S,
                             on_line=lambda line: sys.stderr.write(f"[serve] {line}")) as server:
        return subprocess.call([sys.executable, "-m", "builder.cli", "bench", "--url", server.grpc,
                                "--run", str(run_dir), "--output", str(out / "result.json"),
                                "--plot", str(out / "bench.png"), *bench_args])


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
