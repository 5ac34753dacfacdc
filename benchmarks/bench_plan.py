"""Full layout search for DeepSeek-V3.2 on clusters of up to 64 GPUs: must finish in under 1 s (cold caches).

Baseline, measured in the same process: ``plan_ranks`` over the full 92 000-tensor catalogue for one layout (what
a naive planner would run per candidate). Usage: ``python benchmarks/bench_plan.py [--gpu h200-sxm]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from builder.layout import Layout
from builder.model.config import preset
from builder.plan.memory import clear_caches
from builder.plan.search import plan_cluster
from builder.shard.rules import plan_ranks
from quantize.formats import quantized_catalog

LIMIT_S = 1.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", default="h200-sxm")
    ap.add_argument("--quant", default="fp8")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    say = (lambda *a, **k: None) if args.json else print
    searches = []
    cfg = preset("deepseek-v3.2")
    worst = 0.0
    say(f"{'cluster':>18} {'layouts':>8} {'feasible':>8} {'search s':>9}  recommended")
    for nodes in (1, 2, 4, 8):
        clear_caches()
        t0 = time.perf_counter()
        r = plan_cluster(model=cfg, gpu=args.gpu, nodes=nodes, quant=args.quant)
        dt = time.perf_counter() - t0
        worst = max(worst, dt)
        rec = r.recommended.name if r.recommended else "-"
        searches.append({"gpus": nodes * 8, "layouts": len(r.layouts), "search_s": dt, "recommended": rec})
        say(f"{nodes:>3} x 8 {args.gpu:>10} {len(r.layouts):>8} {sum(lp.feasible for lp in r.layouts):>8} "
              f"{dt:>9.3f}  {rec}")
    t0 = time.perf_counter()
    qc = quantized_catalog(cfg, args.quant)
    plan_ranks(cfg, Layout(tp=8, pp=1, ep=8), qc.specs, weight_shapes=qc.logical_shapes)
    naive = time.perf_counter() - t0
    layouts = len(r.layouts)
    say(f"baseline: plan_ranks over the full catalogue ({len(qc.specs)} tensors), one layout: {naive:.2f} s; "
          f"x {layouts} layouts ~ {naive * layouts:.0f} s")
    say(f"64-GPU search: {dt:.3f} s (limit {LIMIT_S} s); ratio naive/planner = {naive * layouts / dt:.0f}x")
    if args.json:
        print(json.dumps({"searches": searches, "naive_one_layout_s": naive, "naive_over_planner_64": naive * layouts / dt,
                          "slowest_search_s": worst, "limit_s": LIMIT_S}, indent=2))
    say(f"slowest search: {worst:.3f} s -> {'PASS' if worst < LIMIT_S else 'FAIL'}")
    return 0 if worst < LIMIT_S else 1


if __name__ == "__main__":
    sys.exit(main())
