"""What training the tiny models costs: ``dsbuild make-tiny --train`` cut to ``--steps`` (default 80: the 40 dense
warm-up steps and 40 sparse ones, the recipe's two phases), CPU seconds per step of each model from its training
report, and the whole command's wall time. The full recipe's CPU time follows from the per-step cost (600 steps per
model; both models train at once, one core each with ``--jobs 2``, so the target's time is the command's floor).

    PYTHONPATH=. python benchmarks/bench_train.py [--steps 80] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from builder.train.trainer import RECIPES

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        out = Path(tmp) / "models"  # make-tiny refuses an existing directory
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "builder.cli", "make-tiny", "--train", "--steps", str(args.steps),
                        "--out", str(out)], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        reports = {p: json.loads((out / f"{p}.report.json").read_text()) for p in RECIPES}
    models = {p: {"cpu_s_per_step": r["train_cpu_s"] / args.steps, "recipe_steps": RECIPES[p].steps,
                  "recipe_cpu_s": r["train_cpu_s"] / args.steps * RECIPES[p].steps} for p, r in reports.items()}
    result = {"steps": args.steps, "command_wall_s": wall, "models": models,
              "recipe_target_cpu_min": models["tiny"]["recipe_cpu_s"] / 60}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for p, m in models.items():
            print(f"{p}: {m['cpu_s_per_step']:.2f} CPU s per step -> {m['recipe_cpu_s'] / 60:.1f} CPU min for the "
                  f"{m['recipe_steps']}-step recipe")
        print(f"make-tiny --train --steps {args.steps}: {wall:.0f} s of wall time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
