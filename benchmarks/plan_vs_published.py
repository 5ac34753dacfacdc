"""The planner's prediction of every published TensorRT-LLM DeepSeek result it is calibrated on, and the ratio.

Rows: ``builder/data/calibration/trtllm_deepseek_published.yaml`` (sources quoted there). Printed: each row's
setup, the published figure, dsbuild's prediction and predicted/published; with ``--aic``, NVIDIA's aiconfigurator
(optional: installed into ``.venv-aic`` by benchmarks/plan_vs_aiconfigurator.py) is asked for the rows it can
model (aggregated serving at a fixed batch: its TPOT and per-GPU throughput) and its ratio is printed beside.
``--plot FILE.png``: predicted vs published, log-log, one point per row (and aiconfigurator's where it has one);
``--json``: everything as one object.

Usage: ``python benchmarks/plan_vs_published.py [--json] [--plot FILE.png] [--aic]``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from builder.atomic import atomic_write_bytes
from builder.plan.calibration import load_rows, predict

UNITS = {"output_tokens_per_s_per_gpu": "tok/s/GPU", "output_tokens_per_s_per_user_with_ttft": "tok/s/user (w/ TTFT)",
         "output_tokens_per_s_per_user": "tok/s/user (1/TPOT)", "ttft_ms": "TTFT ms",
         "weights_plus_activations_gib_per_gpu": "GiB/GPU (weights+act.)"}


def setup(row) -> str:
    lay = f"{'DEP' if row.attention_dp else 'TP'}{row.tp}" + ("" if row.attention_dp or row.ep == 1 else f"EP{row.ep}")
    mtp = f" MTP{row.draft_len}" if row.draft_len else ""
    conc = "offline" if row.concurrency is None else f"c{row.concurrency}"
    return f"{row.gpus}x{row.gpu} {lay} {row.quant}/{row.kv_cache_dtype}KV{mtp} {row.isl}/{row.osl} {conc}"


def aic_predictions(rows) -> dict[str, dict]:
    """aiconfigurator's figure for the rows it models (fixed batch, no MTP, throughput or TPOT metrics)."""
    from plan_vs_aiconfigurator import aic_throughput, ensure_venv

    py = ensure_venv()
    cases = []
    for r in rows:
        if r.draft_len or r.metric not in ("output_tokens_per_s_per_gpu", "output_tokens_per_s_per_user_with_ttft"):
            continue
        p = predict(r)
        if not p.plan.batch:
            continue
        cases.append({"id": r.id, "model": "deepseek-ai/DeepSeek-V3" if r.model == "deepseek-v3"
                      else "deepseek-ai/DeepSeek-V3.2", "system": {"h200-sxm": "h200_sxm", "b200": "b200_sxm",
                                                                   "gb200": "gb200"}[r.gpu],
                      # aiconfigurator counts attention-DP ranks apart from TP: DEP8 = tp 1 x attention-DP 8.
                      "tp": 1 if r.attention_dp else r.tp, "pp": 1, "ep": r.ep,
                      "adp": r.tp if r.attention_dp else 1,
                      "batch": max(1, p.plan.batch // (r.tp if r.attention_dp else 1)), "isl": r.isl, "osl": r.osl,
                      "quant": r.quant, "kv": r.kv_cache_dtype, "metric": r.metric})
    steps = aic_throughput(py, cases)
    out = {}
    for c in cases:  # aiconfigurator's decode step in dsbuild's throughput formula (same prefill share)
        got = steps.get(c["id"], {})
        if "tpot_ms" not in got:
            out[c["id"]] = {"error": got.get("error")}
            continue
        p = predict(next(r for r in rows if r.id == c["id"]))
        lp = p.plan
        steps_s = lp.workload.osl * got["tpot_ms"] / 1e3
        per_replica = lp.batch * lp.workload.osl / (steps_s + lp.batch * lp.workload.isl / lp.prefill.tokens_per_s)
        value = per_replica / lp.gpus_per_replica if c["metric"] == "output_tokens_per_s_per_gpu" \
            else lp.workload.osl / ((lp.prefill.ttft_ms + lp.workload.osl * got["tpot_ms"]) / 1e3)
        out[c["id"]] = {"value": value, "tpot_ms": got["tpot_ms"]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--aic", action="store_true", help="also ask aiconfigurator (installs .venv-aic once)")
    args = ap.parse_args()
    rows = load_rows()
    t0 = time.perf_counter()
    preds = [predict(r) for r in rows]
    elapsed = time.perf_counter() - t0
    aic = aic_predictions(rows) if args.aic else {}
    out = []
    for p in preds:
        r = p.row
        a = aic.get(r.id, {})
        out.append({"id": r.id, "group": r.group, "setup": setup(r), "metric": r.metric, "published": r.value,
                    "dsbuild": round(p.value, 4), "ratio": round(p.ratio, 4), "band": list(r.band),
                    "within_band": p.within_band, "aiconfigurator": a.get("value"),
                    "aiconfigurator_ratio": round(a["value"] / r.value, 4) if a.get("value") else None,
                    "aiconfigurator_note": a.get("error"),
                    "source": f"{r.source['repo']} {r.source['path']} @ {r.source['commit'][:12]}"})
    logs = [abs(math.log(x["ratio"])) for x in out]
    summary = {"rows": len(out), "within_band": sum(x["within_band"] for x in out),
               "within_0.8_1.25": sum(0.8 <= x["ratio"] <= 1.25 for x in out),
               "geomean_abs_error": round(math.exp(sum(logs) / len(logs)) - 1, 4),
               "worst_ratio": min((x["ratio"] for x in out), key=lambda v: -abs(math.log(v))),
               "dsbuild_s": round(elapsed, 3)}
    both = [x for x in out if x["aiconfigurator_ratio"]]
    if both:
        summary["rows_both_predict"] = len(both)
        summary["dsbuild_closer"] = sum(abs(math.log(x["ratio"])) < abs(math.log(x["aiconfigurator_ratio"]))
                                        for x in both)
    if args.json:
        print(json.dumps({"summary": summary, "rows": out}, indent=1))
    else:
        print(f"{'row':44} {'setup':52} {'metric':24} {'published':>10} {'dsbuild':>10} {'ratio':>6}"
              + (f" {'aic':>10} {'ratio':>6}" if args.aic else ""))
        for x in out:
            flag = "" if x["within_band"] else " !"
            line = (f"{x['id']:44} {x['setup']:52} {UNITS[x['metric']]:24} {x['published']:>10.1f} "
                    f"{x['dsbuild']:>10.1f} {x['ratio']:>6.3f}{flag}")
            if args.aic:
                line += (f" {x['aiconfigurator']:>10.1f} {x['aiconfigurator_ratio']:>6.3f}" if x["aiconfigurator"]
                         else f" {'-':>10} {'-':>6}")
            print(line)
        print(f"{summary['within_band']}/{summary['rows']} rows within their band "
              f"({summary['within_0.8_1.25']} within 0.8-1.25); geometric-mean error "
              f"{summary['geomean_abs_error']:.1%}; all rows predicted in {elapsed:.2f} s")
        if both:
            print(f"aiconfigurator predicts {len(both)} rows; dsbuild is closer on {summary['dsbuild_closer']}")
    if args.plot:
        plot(out, args.plot)
    return 0


def plot(out: list[dict], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(x["metric"] for x in out))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.6))
    groups = list(dict.fromkeys(x["group"] for x in out))
    colors = {g: plt.cm.tab10(i % 10) for i, g in enumerate(groups)}
    for ax, metric in zip(axes, metrics):
        mine = [x for x in out if x["metric"] == metric]
        vals = [x["published"] for x in mine] + [x["dsbuild"] for x in mine]
        lo, hi = min(vals) / 1.6, max(vals) * 1.6
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.fill_between([lo, hi], [lo * 0.8, hi * 0.8], [lo * 1.25, hi * 1.25], color="0.9", label="0.8-1.25x")
        for x in mine:
            ax.scatter(x["published"], x["dsbuild"], color=colors[x["group"]], s=28, zorder=3)
            if x["aiconfigurator"]:
                ax.scatter(x["published"], x["aiconfigurator"], marker="x", color=colors[x["group"]], s=30, zorder=3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_title(UNITS[metric], fontsize=9)
        ax.set_xlabel("published", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("predicted (o dsbuild, x aiconfigurator)", fontsize=8)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colors[g], label=g) for g in groups]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("dsbuild planner vs published TensorRT-LLM DeepSeek results (one point per row)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


if __name__ == "__main__":
    sys.exit(main())
