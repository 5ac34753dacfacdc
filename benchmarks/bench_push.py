"""Push a >= 1 GB run directory to a local registry: throughput and the pushing process's peak RSS.

Baseline, in the same run against an identical fresh registry: oras-py's own ``Registry.push`` of the same files
(its default upload path, one PUT of each whole file), and the same with its ``do_chunked=True`` option. Then ``dsbuild push`` at two sizes (peak RSS should not
grow with the artifact: the goal is under 300 MB whatever the size), a re-push (every blob already there) and a
``dsbuild pull`` of the big artifact. Each transfer runs in a child process; its peak RSS is the child's own
``ru_maxrss`` from ``os.wait4``.

    python benchmarks/bench_push.py [--sizes-gb 0.3,1.2] [--ranks 4] [--json] [--png PATH] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from builder.model.config import preset  # noqa: E402
from builder.safeio import dumps_json  # noqa: E402
from tests.support.registry import run_registry  # noqa: E402

BLOCK = 16 << 20
RSS_GOAL_MB = 300
BASELINE = "oras-py Registry.push (baseline)"


def make_run(root: Path, *, total_bytes: int, ranks: int) -> int:
    """A synthetic run directory (plan, engines with ``ranks`` big rank files, package) with its manifest; its
    engines/config.json holds a real model config, since ``dsbuild pull`` checks the run before renaming it."""
    engine_config = json.dumps({"model": preset("deepseek-v3.2").to_dict()}).encode()
    stages = {"plan": ("plan", {"plan.json": b'{"layout": "bench"}'}),
              "build": ("engines", {"config.json": engine_config}),
              "package": ("package", {"triton_repo/tensorrt_llm/config.pbtxt": b'backend: "python"',
                                      "launch/run.sh": b"#!/bin/sh\nexec tritonserver\n"})}
    manifest = {"dsbuild_version": "bench", "run_name": root.name,
                "spec": {"model": "bench", "quant": "fp8", "tp": ranks, "pp": 1, "ep": 1, "gpu": None}, "stages": {}}
    per_rank = total_bytes // ranks
    written = 0
    for stage, (d, files) in stages.items():
        outputs = []
        for rel, data in files.items():
            p = root / d / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            outputs.append({"path": f"{d}/{rel}", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        if stage == "build":
            for r in range(ranks):
                p = root / d / f"rank{r}.safetensors"
                h = hashlib.sha256()
                with open(p, "wb") as fh:
                    left = per_rank
                    while left:
                        block = os.urandom(min(BLOCK, left))
                        h.update(block)
                        fh.write(block)
                        left -= len(block)
                outputs.append({"path": f"{d}/rank{r}.safetensors", "size": per_rank, "sha256": h.hexdigest()})
                written += per_rank
        manifest["stages"][stage] = {"key": stage * 8, "dir": d, "outputs": outputs,
                                     "bytes": sum(o["size"] for o in outputs),
                                     "completed_at": "2026-11-28T00:00:00+00:00"}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return written


def measure(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd`` under a small Python wrapper that reports the child's own peak RSS via os.wait4."""
    wrapper = ("import os,subprocess,sys,time,json;t=time.perf_counter();p=subprocess.Popen(sys.argv[1:],"
               "stdout=subprocess.PIPE);out=p.stdout.read();_,s,u=os.wait4(p.pid,0);"
               "sys.stderr.write(json.dumps({'wall':time.perf_counter()-t,'rss_kb':u.ru_maxrss,'status':s})+'\\n');"
               "sys.stdout.buffer.write(out)")
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True)
    info = json.loads(proc.stderr.decode().strip().splitlines()[-1])
    if info["status"] != 0:
        raise SystemExit(f"{' '.join(cmd[:5])} failed (status {info['status']}):\n{proc.stderr.decode()[-3000:]}")
    return info["wall"], info["rss_kb"] / 1024, proc.stdout.decode()


ORAS_BASELINE = """
import sys, oras.provider
addr, target, chunked, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
reg = oras.provider.Registry(hostname=addr, insecure=True)
reg.push(target=target, files=files, disable_path_validation=True, quiet=True, do_chunked=chunked == "1")
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-gb", default="0.3,1.2", help="artifact sizes for dsbuild push (the largest is also "
                    "pushed by the oras baseline and pulled)")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--png", type=Path, default=REPO / "benchmarks" / "results" / "bench_push.png")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args(argv)
    sizes = sorted(float(s) for s in args.sizes_gb.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench-push-", dir=args.workdir))
    rows = []
    try:
        for size in sizes:
            run = work / f"run-{size}"
            nbytes = make_run(run, total_bytes=int(size * 1e9), ranks=args.ranks)
            big = size == sizes[-1]
            for chunked, label in (("0", BASELINE), ("1", "oras-py Registry.push(do_chunked=True)")):
                if not big:
                    break
                with run_registry(work / "reg-oras") as reg:
                    files = [str(p) for p in sorted(run.rglob("*")) if p.is_file()]
                    wall, rss, _ = measure([sys.executable, "-c", ORAS_BASELINE, reg.address,
                                            f"{reg.address}/bench/oras:base", chunked, *files])
                    rows.append({"what": label, "gb": nbytes / 1e9, "wall_s": wall, "mb_s": nbytes / 1e6 / wall,
                                 "peak_rss_mb": rss})
                shutil.rmtree(work / "reg-oras", ignore_errors=True)
            with run_registry(work / f"reg-{size}") as reg:
                ref = f"oci://{reg.address}/bench/run:t"
                cli = [sys.executable, "-m", "builder.cli"]
                wall, rss, out = measure([*cli, "push", str(run), ref, "--plain-http", "--json"])
                stats = json.loads(out)["stats"]
                assert stats["bytes_uploaded"] >= nbytes, stats
                rows.append({"what": "dsbuild push", "gb": nbytes / 1e9, "wall_s": wall, "mb_s": nbytes / 1e6 / wall,
                             "peak_rss_mb": rss})
                if big:
                    wall, rss, out = measure([*cli, "push", str(run), ref, "--plain-http", "--json"])
                    assert json.loads(out)["stats"]["blobs_uploaded"] == 0
                    rows.append({"what": "dsbuild re-push (all blobs present)", "gb": nbytes / 1e9, "wall_s": wall,
                                 "mb_s": nbytes / 1e6 / wall, "peak_rss_mb": rss})
                    wall, rss, _ = measure([*cli, "pull", ref, str(work / "pulled"), "--plain-http", "--json"])
                    rows.append({"what": "dsbuild pull (verified)", "gb": nbytes / 1e9, "wall_s": wall,
                                 "mb_s": nbytes / 1e6 / wall, "peak_rss_mb": rss})
                    shutil.rmtree(work / "pulled", ignore_errors=True)
            shutil.rmtree(work / f"reg-{size}", ignore_errors=True)
            shutil.rmtree(run, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = rows[[r["what"] for r in rows].index(BASELINE)]
    for r in rows:
        r["throughput_vs_baseline"] = r["mb_s"] / base["mb_s"]
        r["rss_vs_baseline"] = r["peak_rss_mb"] / base["peak_rss_mb"]
    big_push = [r for r in rows if r["what"] == "dsbuild push"]
    result = {"rows": rows, "rss_goal_mb": RSS_GOAL_MB,
              "rss_goal_met": all(r["peak_rss_mb"] < RSS_GOAL_MB for r in rows if r["what"].startswith("dsbuild")),
              "rss_growth_mb_per_gb": ((big_push[-1]["peak_rss_mb"] - big_push[0]["peak_rss_mb"])
                                       / max(big_push[-1]["gb"] - big_push[0]["gb"], 1e-9)) if len(big_push) > 1 else None}
    _plot(rows, args.png)
    args.png.with_suffix(".json").write_text(dumps_json(result) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{'transfer':38} {'GB':>6} {'wall s':>8} {'MB/s':>8} {'peak RSS MB':>12} {'x base MB/s':>12} {'x base RSS':>11}")
        for r in rows:
            print(f"{r['what']:38} {r['gb']:6.2f} {r['wall_s']:8.1f} {r['mb_s']:8.1f} {r['peak_rss_mb']:12.1f} "
                  f"{r['throughput_vs_baseline']:12.2f} {r['rss_vs_baseline']:11.2f}")
        print(f"RSS goal (< {RSS_GOAL_MB} MB for every dsbuild transfer): {'met' if result['rss_goal_met'] else 'MISSED'}"
              f"; RSS growth per extra GB pushed: {result['rss_growth_mb_per_gb']:.1f} MB" if result["rss_growth_mb_per_gb"]
              is not None else "")
        print(f"plot: {args.png}; data: {args.png.with_suffix('.json')}")
    return 0 if result["rss_goal_met"] else 1


def _plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png.parent.mkdir(parents=True, exist_ok=True)
    labels = [f"{r['what']}\n{r['gb']:.2f} GB" for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    a.barh(labels, [r["mb_s"] for r in rows], color="tab:blue")
    a.set_xlabel("throughput (MB/s)")
    b.barh(labels, [r["peak_rss_mb"] for r in rows], color="tab:orange")
    b.axvline(RSS_GOAL_MB, color="red", linestyle="--", label=f"goal {RSS_GOAL_MB} MB")
    b.set_xlabel("peak RSS of the process (MB)")
    b.set_yticklabels([])
    b.legend()
    fig.suptitle("push/pull to a local docker-registry on 127.0.0.1")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
