"""dsbuild's planner next to NVIDIA's aiconfigurator on the same DeepSeek workloads.

aiconfigurator (PyPI ``aiconfigurator``, CPU-only, ~850 MB with its measured per-op databases) is installed into
its own virtualenv ``.venv-aic`` (created here if missing; ignored by git) and queried by ``_aic_probe.py``
running in that venv. Printed side by side per case: weight memory per GPU, KV-cache capacity (tokens per GPU at
``free_gpu_memory_fraction`` 0.9), decode step time (TPOT at batch 64, isl/osl 1024). Differences over 10 % are
marked; docs/choosing-a-layout.md explains each.

Usage: ``python benchmarks/plan_vs_aiconfigurator.py [--json] [--plot FILE.png]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from builder.model.config import preset
from builder.plan.search import plan_cluster

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-aic"
AIC_VERSION = "0.12.0"
GIB = 1 << 30
ISL = OSL = 1024
BATCH = 64

# (label, model preset, aiconfigurator model id, dsbuild gpu, aiconfigurator system, nodes, tp, pp, ep)
CASES = [
    ("V3 8xH200 TP8 EP8", "deepseek-v3", "deepseek-ai/DeepSeek-V3", "h200-sxm", "h200_sxm", 1, 8, 1, 8),
    ("V3 16xH200 TP8 PP2", "deepseek-v3", "deepseek-ai/DeepSeek-V3", "h200-sxm", "h200_sxm", 2, 8, 2, 8),
    ("V3 16xH100 TP8 PP2", "deepseek-v3", "deepseek-ai/DeepSeek-V3", "h100-sxm", "h100_sxm", 2, 8, 2, 8),
    ("V3 16xH100 TP16 EP16", "deepseek-v3", "deepseek-ai/DeepSeek-V3", "h100-sxm", "h100_sxm", 2, 16, 1, 16),
    ("V3.2 8xH200 TP8 EP8", "deepseek-v3.2", "deepseek-ai/DeepSeek-V3.2", "h200-sxm", "h200_sxm", 1, 8, 1, 8),
    ("V3.2 16xH200 TP8 PP2", "deepseek-v3.2", "deepseek-ai/DeepSeek-V3.2", "h200-sxm", "h200_sxm", 2, 8, 2, 8),
    ("V3.2 16xH100 TP8 PP2", "deepseek-v3.2", "deepseek-ai/DeepSeek-V3.2", "h100-sxm", "h100_sxm", 2, 8, 2, 8),
]


def ensure_venv() -> Path:
    py = VENV / "bin" / "python"
    if not (VENV / "bin" / "aiconfigurator").exists():
        print(f"creating {VENV} with aiconfigurator=={AIC_VERSION} (~850 MB, once)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"aiconfigurator=={AIC_VERSION}"], check=True)
    return py


def aic_results(py: Path) -> list[dict]:
    cases = [{"model": c[2], "system": c[4], "tp": c[6], "pp": c[7], "ep": c[8], "batch": BATCH, "isl": ISL,
              "osl": OSL} for c in CASES]
    res = subprocess.run([str(py), str(ROOT / "benchmarks" / "_aic_probe.py"), json.dumps(cases)],
                         capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise SystemExit(f"aiconfigurator probe failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def aic_throughput(py: Path, cases: list[dict]) -> dict[str, dict]:
    """aiconfigurator's decode step (static_gen TPOT at each case's batch per rank) for calibration rows: returns
    ``{id: {"tpot_ms": ...}}`` or ``{id: {"error": ...}}``."""
    # Weight formats as NVIDIA's checkpoints store them: block-FP8 GEMMs, MoE in block FP8 or NVFP4.
    probe = [{"model": c["model"], "system": c["system"], "tp": c["tp"], "pp": c["pp"], "ep": c["ep"],
              "adp": c["adp"], "batch": c["batch"], "isl": c["isl"], "osl": c["osl"], "skip_memory": True,
              "kv": "fp8" if c["kv"] == "fp8" else "bfloat16", "gemm": "fp8_block",
              "moe": "nvfp4" if c["quant"] == "nvfp4" else "fp8_block",
              "fmha": "fp8" if c["kv"] == "fp8" else "bfloat16"}
             for c in cases]
    res = subprocess.run([str(py), str(ROOT / "benchmarks" / "_aic_probe.py"), json.dumps(probe)],
                         capture_output=True, text=True, timeout=7200)
    if res.returncode != 0:
        raise SystemExit(f"aiconfigurator probe failed:\n{res.stderr[-2000:]}")
    results = json.loads(res.stdout.strip().splitlines()[-1])
    return {c["id"]: ({"tpot_ms": r["tpot_ms"]} if "tpot_ms" in r else {"error": r.get("tpot_error")})
            for c, r in zip(cases, results)}


def dsbuild_results() -> tuple[list[dict], float]:
    out, t0 = [], time.perf_counter()
    for label, model, _, gpu, _, nodes, tp, pp, ep in CASES:
        # aiconfigurator models the base model without the MTP module (nextn 0): so does this comparison.
        r = plan_cluster(model=preset(model), gpu=gpu, nodes=nodes, tp=tp, pp=pp, ep=ep, attention_dp=False,
                         isl=ISL, osl=OSL, concurrency=BATCH, kv_cache_dtype="fp8", include_mtp=False)
        (lp,) = r.layouts
        d = lp.to_dict()
        out.append({"weights_gib": d["memory_per_gpu_gib"]["weights"] if d["memory_per_gpu_gib"] else None,
                    "weights_mean_gib": sum(lp.weights_per_rank) / len(lp.weights_per_rank) / GIB,
                    "kv_tokens": lp.kv_pool // lp.kv_bytes_per_token if lp.kv_bytes_per_token else None,
                    "kv_bytes_per_token": lp.kv_bytes_per_token, "tpot_ms": d["decode_step_ms"],
                    "feasible": lp.feasible, "reasons": lp.reasons, "batch": lp.batch,
                    "activations_gib": lp.activations / GIB})
    return out, time.perf_counter() - t0


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else (a - b) / b


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    py = ensure_venv()
    t0 = time.perf_counter()
    aic = aic_results(py)
    aic_s = time.perf_counter() - t0
    ours, ours_s = dsbuild_results()
    rows = []
    for case, a, d in zip(CASES, aic, ours):
        row = {"case": case[0]}
        for key in ("weights_gib", "kv_tokens", "kv_bytes_per_token", "tpot_ms"):
            row[key] = {"dsbuild": d.get(key), "aiconfigurator": a.get(key), "diff": _diff(d.get(key), a.get(key))}
        row["dsbuild_weights_mean_gib"] = d["weights_mean_gib"]
        row["aiconfigurator_errors"] = {k: v for k, v in a.items() if k.endswith("error")}
        row["dsbuild_reasons"] = d["reasons"]
        rows.append(row)
    if args.json:
        print(json.dumps({"rows": rows, "aiconfigurator_s": aic_s, "dsbuild_s": ours_s}, indent=1))
    else:
        print(f"batch {BATCH}, isl {ISL} / osl {OSL}, FP8 block weights, FP8 KV, free_gpu_memory_fraction 0.9, no MTP")
        hdr = f"{'case':<22}{'weights GiB/GPU':>24}{'KV tokens/GPU':>28}{'KV B/token':>20}{'decode step ms':>24}"
        print(hdr)
        print(f"{'':<22}{'dsb / aic':>24}{'dsb / aic':>28}{'dsb / aic':>20}{'dsb / aic':>24}")
        for r in rows:
            cells = []
            for key, fmt, width in (("weights_gib", "{:.1f}", 24), ("kv_tokens", "{:,.0f}", 28),
                                    ("kv_bytes_per_token", "{:,.0f}", 20), ("tpot_ms", "{:.1f}", 24)):
                v = r[key]
                a = fmt.format(v["aiconfigurator"]) if v["aiconfigurator"] is not None else "n/a"
                b = fmt.format(v["dsbuild"]) if v["dsbuild"] is not None else "n/a"
                flag = "" if v["diff"] is None else f" {v['diff']:+.0%}{'!' if abs(v['diff']) > 0.10 else ''}"
                cells.append(f" {b + ' / ' + a + flag:>{width}}")
            print(f"{r['case']:<22}" + "".join(cells))
        for r in rows:
            for k, v in r["aiconfigurator_errors"].items():
                print(f"  {r['case']}: aiconfigurator {k.replace('_error', '')}: {v}")
        print("'!' marks a difference over 10 % (explained in docs/choosing-a-layout.md).")
        print(f"time: aiconfigurator {aic_s:.1f} s for {len(CASES)} cases, dsbuild {ours_s:.3f} s "
              f"(ratio {aic_s / ours_s:.0f}x)")
    if args.plot:
        _plot(rows, args.plot)
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("weights_gib", "kv_tokens", "tpot_ms")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key in zip(axes, keys):
        names = [r["case"] for r in rows]
        ds = [r[key]["dsbuild"] or 0 for r in rows]
        ac = [r[key]["aiconfigurator"] or 0 for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], ds, 0.4, label="dsbuild")
        ax.bar([i + 0.2 for i in x], ac, 0.4, label="aiconfigurator")
        ax.set_xticks(list(x), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(key)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
