"""``make bench-report``: run every benchmark several times, record the machine and its load, and write the figures
the README and docs quote as ranges.

Each benchmark script runs ``--repeats`` times (default 3) in a child process with ``--json``; while it runs, the
1-minute load average is sampled every 5 s (the benchmark's own threads count in it). The figures below are read
from each run's JSON; a figure's range spans every run and every configuration it groups (e.g. both thread counts).
Outputs:

* ``benchmarks/results/report.json``: machine, and per benchmark its command and every run (start, wall time, load
  samples, the figures' values). ``--only NAME,...`` reruns some benchmarks and keeps the others' runs.
* ``docs/benchmarks.md``: one table per benchmark (range, median, runs, load), generated, never edited by hand.
* Every ``<!--fig:ID-->...<!--/fig-->`` in README.md and docs/*.md is rewritten with that figure's range
  (``<!--fig:ID@median-->``: its median), so the prose quotes exactly what the last report measured
  (``tests/unit/test_bench_report.py`` fails otherwise).

    PYTHONPATH=. python benchmarks/report.py [--only engine,serve] [--repeats 3] [--render-only]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from builder.atomic import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
REPORT = RESULTS / "report.json"
DOC = ROOT / "docs" / "benchmarks.md"
LOAD_SAMPLE_S = 5.0
MARKER = re.compile(r"<!--fig:(?P<id>[a-z0-9_.]+)(?P<median>@median)?-->(?P<text>.*?)<!--/fig-->", re.DOTALL)

Values = list[float]


@dataclass(frozen=True)
class Figure:
    id: str  # "<benchmark>.<name>", as the markers cite it
    what: str
    unit: str  # "x" ratio, "s", "min", "MiB", "%" (a fraction shown as a percentage), "" plain number
    extract: Callable[[dict], Values]  # the values one run contributes


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    args: tuple[str, ...]
    what: str
    figures: tuple[Figure, ...]
    repeats: int | None = None  # None: --repeats; 1 for deterministic results


def _comparisons(run: dict, **match) -> Values:
    return [c["engine_vs_transformers"] for c in run["comparisons"]
            if all(c[k] == v for k, v in match.items())]


def _levels(key: str, level: int) -> Callable[[dict], Values]:
    return lambda run: [r[key] for r in run["levels"] if r["concurrency"] == level and key in r]


def _push_rss(run: dict) -> Values:
    return [r["peak_rss_mb"] * 1e6 / 2**20 for r in run["rows"] if r["what"] == "dsbuild push"]


def _push_throughput(run: dict) -> Values:
    return [r["throughput_vs_baseline"] for r in run["rows"] if r["what"] == "dsbuild push" and r["gb"] >= 1]


def _quantize(mode: str, key: str) -> Callable[[dict], Values]:
    return lambda run: [row[mode][key] for row in run["rows"]]


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("plan", "benchmarks/bench_plan.py", ("--json",), "layout search for DeepSeek-V3.2 on 8-64 H200s", (
        Figure("plan.search_64_s", "full search, 64 GPUs (limit 1 s)", "s",
               lambda r: [s["search_s"] for s in r["searches"] if s["gpus"] == 64]),
        Figure("plan.slowest_search_s", "slowest of the 8/16/32/64-GPU searches", "s",
               lambda r: [r["slowest_search_s"]]),
        Figure("plan.naive_over_planner", "plan_ranks over the full catalogue per layout / the search, 64 GPUs", "x",
               lambda r: [r["naive_over_planner_64"]]),
    )),
    Benchmark("engine", "benchmarks/bench_engine.py", ("--json", "--png", "benchmarks/results/bench_engine.png"),
              "reference engine decode on CPU vs transformers generate, fusions, PP2 micro-batches", (
        Figure("engine.fp32_vs_transformers", "float32, 1 and 2 threads, batch 4 and 1", "x",
               lambda r: _comparisons(r, dtype="float32")),
        Figure("engine.bf16_b4_vs_transformers", "bfloat16, batch 4, 1 and 2 threads", "x",
               lambda r: _comparisons(r, dtype="bfloat16", batch=4)),
        Figure("engine.bf16_b1_vs_transformers", "bfloat16, batch 1, 1 and 2 threads", "x",
               lambda r: _comparisons(r, dtype="bfloat16", batch=1)),
        Figure("engine.b1_1thread_vs_transformers", "batch 1, 1 thread, float32 and bfloat16", "x",
               lambda r: _comparisons(r, batch=1, threads=1)),
        Figure("engine.fused_vs_unfused", "all fusions on vs all off (float32, batch 4, 1 thread)", "x",
               lambda r: [r["fused_vs_unfused"]]),
        *(Figure(f"engine.fusion_{name}", f"all on vs all on but {name}", "x",
                 lambda r, name=name: [r["each_fusion_speedup"][name]])
          for name in ("fuse_gate_up", "fuse_qkv_a", "absorb_mla", "stack_experts", "packed_gemms")),
        Figure("engine.pp2_micro_batches", "PP2: micro-batches vs the whole batch in turn", "x",
               lambda r: [r["pp2_micro_batch_speedup"]]),
    )),
    # 4 requests of 32 tokens per client thread and level: the default (2 x 16) is too short a level for a steady ratio
    Benchmark("serve", "benchmarks/bench_serve.py", ("--json", "--max-tokens", "32", "--rounds", "4", "--plot",
                                                     "benchmarks/results/bench_serve.png"),
              "CPU-flavour tritonserver (gRPC streaming, OpenAI endpoint) vs EngineService called directly, TP2", (
        *(Figure(f"serve.served_over_direct_c{c}", f"gRPC streaming / one direct batch, {c} concurrent", "x",
                 _levels("served_over_direct_batch", c)) for c in (1, 4, 16)),
        *(Figure(f"serve.openai_over_grpc_c{c}", f"OpenAI endpoint / gRPC streaming, {c} concurrent", "x",
                 _levels("openai_over_grpc", c)) for c in (1, 4, 16)),
    )),
    Benchmark("push", "benchmarks/bench_push.py", ("--json",), "dsbuild push/pull against a local registry", (
        Figure("push.peak_rss_mib", "dsbuild push peak RSS, 0.3 and 1.2 GB artifacts", "MiB", _push_rss),
        Figure("push.throughput_vs_oras", "dsbuild push / oras-py Registry.push, 1.2 GB", "x", _push_throughput),
    )),
    Benchmark("fetch", "benchmarks/bench_fetch.py", ("--json", "--png", "benchmarks/results/bench_fetch.png"),
              "dsbuild fetch vs huggingface_hub snapshot_download from a local hub, 1 GB", (
        Figure("fetch.throughput_vs_snapshot_download", "median throughput ratio", "x", lambda r: [r["ratio"]]),
    )),
    Benchmark("quantize", "benchmarks/bench_quantize.py", ("--json", "--sizes", "1", "4"),
              "streaming quantize modes vs raw sequential read, 1 and 4 GB", (
        Figure("quantize.fp8_of_raw_read", "fp8 (verify + link) throughput / raw read", "%",
               _quantize("fp8", "fraction_of_raw_read")),
        Figure("quantize.bf16_of_raw_read", "bf16 (dequantize) throughput / raw read", "%",
               _quantize("bf16", "fraction_of_raw_read")),
        Figure("quantize.bf16_of_io_floor", "bf16 throughput / its I/O floor (read + write, no conversion)", "%",
               _quantize("bf16", "fraction_of_io_floor")),
        Figure("quantize.peak_rss_mib", "peak RSS of either mode, either size", "MiB",
               lambda r: [row[m]["peak_rss_mb"] * 1e6 / 2**20 for row in r["rows"] for m in ("fp8", "bf16")]),
    )),
    # 4 steps: an AVX2-only CPU (no native bf16 for the autocast matmuls) takes tens of seconds per step
    Benchmark("train", "benchmarks/bench_train.py", ("--json", "--steps", "4"),
              "training the tiny models: make-tiny --train cut to the first 4 of the recipe's 600 steps", (
        Figure("train.target_cpu_s_per_step", "tiny (the target): CPU seconds per training step", "s",
               lambda r: [r["models"]["tiny"]["cpu_s_per_step"]]),
        Figure("train.draft_cpu_s_per_step", "tiny-draft: CPU seconds per training step", "s",
               lambda r: [r["models"]["tiny-draft"]["cpu_s_per_step"]]),
        Figure("train.recipe_target_cpu_min", "the target's 600-step recipe: CPU minutes (per-step cost x 600)", "min",
               lambda r: [r["recipe_target_cpu_min"]]),
    )),
)
BY_NAME = {b.name: b for b in BENCHMARKS}
FIGURES = {f.id: f for b in BENCHMARKS for f in b.figures}


def machine() -> dict:
    cpu = ""
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not cpu:
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return {"cpus": os.cpu_count(), "cpu": cpu or platform.processor(),
            "simd": sorted(f for f in flags if f.startswith(("avx512", "amx")) or f == "avx2"),
            "python": platform.python_version(), "system": platform.system()}


class LoadSampler:
    """The 1-minute load average every ``LOAD_SAMPLE_S`` seconds while a benchmark runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(round(os.getloadavg()[0], 2))
            if self._stop.wait(LOAD_SAMPLE_S):
                return

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_once(bench: Benchmark) -> dict:
    cmd = [sys.executable, bench.script, *bench.args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    # Its own process group: an interrupted report takes the benchmark's workers (torch.distributed ranks,
    # training processes) down with it instead of leaving them to load the machine the next run measures.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    with LoadSampler() as load:
        try:
            stdout, _ = proc.communicate()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{bench.script} exited with code {proc.returncode}; its output is above")
    data = json.loads(stdout[stdout.index("{"):])
    return {"started": started, "wall_s": round(wall, 1), "load": load.samples,
            "figures": {f.id: [round(v, 4) for v in f.extract(data)] for f in bench.figures}}


def values(report: dict, fig: Figure) -> Values:
    runs = report["benchmarks"].get(fig.id.split(".")[0], {}).get("runs", [])
    return [v for run in runs for v in run["figures"].get(fig.id, [])]


def fmt_value(v: float, unit: str) -> str:
    if unit == "x":
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    if unit == "%":
        return f"{100 * v:.0f}"
    if unit == "MiB":
        return f"{v:.1f}"
    if unit == "s":
        return f"{v:.2f}" if v < 10 else f"{v:.0f}"
    if unit == "min":
        return f"{v:.1f}" if v < 100 else f"{v:.0f}"
    return f"{v:g}"


def render_range(vals: Values, unit: str) -> str:
    lo, hi = min(vals), max(vals)
    text = fmt_value(lo, unit) if fmt_value(lo, unit) == fmt_value(hi, unit) else \
        f"{fmt_value(lo, unit)}–{fmt_value(hi, unit)}"
    return text + {"x": "×", "%": " %", "MiB": " MiB", "s": " s", "min": " min", "": ""}[unit]


def render_median(vals: Values, unit: str) -> str:
    return render_range([statistics.median(vals)], unit)


def load_range(runs: list[dict]) -> str:
    samples = [x for run in runs for x in run["load"]]
    return f"{min(samples):.1f}–{max(samples):.1f}" if samples else "not sampled"


def render_doc(report: dict) -> str:
    m = report["machine"]
    out = ["# Benchmark report", "",
           "Generated by `make bench-report` (`benchmarks/report.py`) from `benchmarks/results/report.json`; do not",
           "edit. Every figure is the range over all runs (and over the configurations it groups), with the median;",
           "load is the 1-minute load average sampled every 5 s while the benchmark ran, its own threads included.",
           "Ratios come from baselines measured in the same run, so a busy machine moves them less than absolute",
           "figures; rerun on your machine with `make bench-report` (`BENCH_ONLY=engine,serve` for some).", "",
           (f"Machine: {m['cpus']} CPUs, {m['cpu']} ({', '.join(m['simd']) or 'no AVX-512'}), "
            f"Python {m['python']}."), ""]
    for bench in BENCHMARKS:
        entry = report["benchmarks"].get(bench.name)
        if not entry:
            continue
        runs = entry["runs"]
        dates = sorted({r["started"][:10] for r in runs})
        out += [f"## {bench.name}: {bench.what}", "",
                (f"`{' '.join(entry['command'])}`: {len(runs)} run(s) on {', '.join(dates)}, "
                 f"{min(r['wall_s'] for r in runs):.0f}–{max(r['wall_s'] for r in runs):.0f} s each, "
                 f"load {load_range(runs)}."), "",
                "| figure | what | range | median |", "|---|---|---|---|"]
        for fig in bench.figures:
            vals = values(report, fig)
            if vals:
                out.append(f"| `{fig.id}` | {fig.what} | {render_range(vals, fig.unit)} | "
                           f"{render_median(vals, fig.unit)} |")
        out.append("")
    return "\n".join(out)


def render_markers(text: str, report: dict, where: str) -> str:
    def sub(match: re.Match) -> str:
        fig = FIGURES.get(match["id"])
        if fig is None:
            raise SystemExit(f"{where}: <!--fig:{match['id']}--> names no figure of benchmarks/report.py")
        vals = values(report, fig)
        if not vals:
            raise SystemExit(f"{where}: <!--fig:{match['id']}--> has no measured value in {REPORT.name}; "
                             f"run `make bench-report BENCH_ONLY={fig.id.split('.')[0]}`")
        if match["median"]:
            return f"<!--fig:{fig.id}@median-->median {render_median(vals, fig.unit)}<!--/fig-->"
        return f"<!--fig:{fig.id}-->{render_range(vals, fig.unit)}<!--/fig-->"
    return MARKER.sub(sub, text)


def quoting_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def rendered(report: dict) -> dict[Path, str]:
    """What every generated or figure-quoting file should contain for ``report``."""
    out = {DOC: render_doc(report)}
    for path in quoting_files():
        if path != DOC:
            out[path] = render_markers(path.read_text(), report, path.name)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help=f"comma list of {', '.join(BY_NAME)} (default: all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--render-only", action="store_true", help="rewrite the docs from report.json, run nothing")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
    report = json.loads(REPORT.read_text()) if REPORT.exists() else {"benchmarks": {}}
    if not args.render_only:
        report["machine"] = machine()
        for name in names:
            bench = BY_NAME[name]
            repeats = bench.repeats or args.repeats
            runs = []
            for i in range(repeats):
                print(f"[{name} {i + 1}/{repeats}] {bench.script} {' '.join(bench.args)}", file=sys.stderr, flush=True)
                runs.append(run_once(bench))
                print(f"[{name} {i + 1}/{repeats}] {runs[-1]['wall_s']:.0f} s, load {load_range(runs[-1:])}: "
                      + "; ".join(f"{k.split('.', 1)[1]} {v}" for k, v in runs[-1]["figures"].items()),
                      file=sys.stderr, flush=True)
            report["benchmarks"][name] = {"command": ["python", bench.script, *bench.args], "runs": runs}
            atomic_write_json(REPORT, report)  # each finished benchmark is kept, even if a later one fails
    for path, text in rendered(report).items():
        if not path.exists() or path.read_text() != text:
            atomic_write_text(path, text)
            print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
