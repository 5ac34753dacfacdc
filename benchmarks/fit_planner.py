"""Fit the planner's efficiency parameters per GPU generation to the published TensorRT-LLM results.

For each generation with calibration rows (Hopper, Blackwell) the seven parameters of docs/choosing-a-layout.md
(``hbm_efficiency``, ``compute_efficiency``, ``gemm_half_rows``, ``attention_efficiency``,
``context_attention_efficiency``, ``layer_overhead_us``, ``draft_overhead_us``) are chosen to minimise the squared
log of predicted/published over that generation's rows of ``builder/data/calibration/trtllm_deepseek_published.yaml``,
plus a steep penalty for any row outside its band (so the fit prefers every row inside to a smaller average error).
Nelder-Mead from several starts and from the parameters in use (scipy), in log space with the efficiencies kept in
(0, 1]. The result is written to
``builder/data/calibration/efficiency.yaml`` (``--write``), which the planner loads; ``--json`` prints it.

Usage: ``python benchmarks/fit_planner.py [--write] [--json]`` (a few minutes on two cores).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import date

import numpy as np
import yaml
from scipy.optimize import minimize

from builder.atomic import atomic_write_bytes
from builder.plan.calibration import load_rows, predict, with_efficiency
from builder.plan.hardware import EFFICIENCY_FIELDS, EFFICIENCY_FILE, GPUS, load_hardware

BOUNDED = tuple(k for k in EFFICIENCY_FIELDS if k.endswith("_efficiency"))  # shares of a peak: (0, 1]
# Where the search starts, and the weak prior that keeps a parameter the rows barely constrain (Hopper has one
# latency row) at a plausible value: 0.05 x (log(value / prior))^2 per parameter, against ~1 for a row off by 2.7x.
PRIOR = {"hbm_efficiency": 0.8, "compute_efficiency": 0.5, "gemm_half_rows": 64, "attention_efficiency": 0.4,
         "context_attention_efficiency": 0.4, "layer_overhead_us": 100, "draft_overhead_us": 300}
PRIOR_WEIGHT = 0.05
RESTARTS = 5
OUTSIDE_WEIGHT = 2000  # per squared log-distance outside a row's band: a row 2 % outside costs ~1 row off by 2.7x
STARTS = (
    PRIOR,
    {"hbm_efficiency": 0.6, "compute_efficiency": 0.25, "gemm_half_rows": 16, "attention_efficiency": 0.15,
     "context_attention_efficiency": 0.2, "layer_overhead_us": 150, "draft_overhead_us": 500},
    {"hbm_efficiency": 0.9, "compute_efficiency": 0.7, "gemm_half_rows": 256, "attention_efficiency": 0.3,
     "context_attention_efficiency": 0.6, "layer_overhead_us": 60, "draft_overhead_us": 150},
)


def encode(params: dict[str, float]) -> np.ndarray:
    def logit(p: float) -> float:
        p = min(p, 1 - 1e-4)  # a share fitted to its bound (1.0) starts just inside it
        return math.log(p / (1 - p))

    return np.array([logit(params[k]) if k in BOUNDED else math.log(params[k]) for k in EFFICIENCY_FIELDS])


def decode(x: np.ndarray) -> dict[str, float]:
    out = {}
    for k, v in zip(EFFICIENCY_FIELDS, x):
        out[k] = 1 / (1 + math.exp(-v)) if k in BOUNDED else math.exp(v)
    return out


def loss(x: np.ndarray, arch: str, rows, table) -> float:
    tab = with_efficiency(table, arch, decode(x))
    total = 0.0
    for row in rows:
        p = predict(row, hardware=tab)
        if p.value <= 0:
            return 1e6
        err = math.log(p.ratio)
        lo, hi = (math.log(b) for b in row.band)
        outside = max(0.0, err - hi, lo - err)
        total += err * err + OUTSIDE_WEIGHT * outside * outside
    params = decode(x)
    return total + PRIOR_WEIGHT * sum(math.log(params[k] / PRIOR[k]) ** 2 for k in EFFICIENCY_FIELDS)


def fit(arch: str, rows, table, current: dict[str, float] | None = None) -> tuple[dict[str, float], float]:
    """Nelder-Mead from each start (and from the parameters in use), then restarted from the best point until a
    restart gains nothing: a fresh simplex gets the search out of the flat valleys a collapsed one stalls in."""
    def search(x0: np.ndarray):
        return minimize(loss, x0, args=(arch, rows, table), method="Nelder-Mead",
                        options={"maxiter": 1500, "xatol": 1e-3, "fatol": 1e-6})

    best = min((search(encode(start)) for start in STARTS + ((current,) if current else ())), key=lambda r: r.fun)
    for _ in range(RESTARTS):
        res = search(best.x)
        if res.fun > best.fun - 1e-5:
            break
        best = res
    return {k: round(v, 4 if k in BOUNDED else 1) for k, v in decode(best.x).items()}, float(best.fun)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"write {EFFICIENCY_FILE}")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--arch", action="append", help="fit only this generation (repeatable; default: all)")
    args = ap.parse_args()
    rows = load_rows()
    table = load_hardware()
    t0 = time.perf_counter()
    fitted = yaml.safe_load(EFFICIENCY_FILE.read_text())["generations"]  # --arch refits only some of them
    report = {}
    for arch in sorted({GPUS[r.gpu].arch for r in rows} & set(args.arch or [GPUS[r.gpu].arch for r in rows])):
        mine = [r for r in rows if GPUS[r.gpu].arch == arch]
        in_use = fitted.get(arch, {})
        params, value = fit(arch, mine, table, in_use if set(in_use) == set(EFFICIENCY_FIELDS) else None)
        fitted[arch] = params
        table = with_efficiency(table, arch, params)
        ratios = {r.id: round(predict(r, hardware=table).ratio, 4) for r in mine}
        report[arch] = {"rows": len(mine), "loss": round(value, 5), "parameters": params, "ratios": ratios}
    elapsed = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"generations": report, "elapsed_s": round(elapsed, 1)}, indent=1))
    else:
        for arch, rep in report.items():
            print(f"{arch}: {rep['rows']} rows, loss {rep['loss']}: {rep['parameters']}")
            for rid, ratio in rep["ratios"].items():
                print(f"  {rid:44s} {ratio:6.3f}")
        print(f"fitted in {elapsed:.0f} s")
    if args.write:
        head = ("# Efficiency parameters per GPU generation, fitted by benchmarks/fit_planner.py to\n"
                "# builder/data/calibration/trtllm_deepseek_published.yaml (regenerate: python benchmarks/fit_planner.py"
                " --write).\n# Meanings and sources: docs/choosing-a-layout.md.\n")
        body = {"fitted_on": {"date": date.today().isoformat(),
                              "rows": {a: sum(GPUS[r.gpu].arch == a for r in rows) for a in fitted}},
                "generations": fitted}
        atomic_write_bytes(EFFICIENCY_FILE, (head + yaml.safe_dump(body, sort_keys=False)).encode())
        print(f"wrote {EFFICIENCY_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
