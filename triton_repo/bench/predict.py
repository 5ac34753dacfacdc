"""What the planner predicts for the served run: its spec (``manifest.json``) with the benchmark's ISL, OSL and
concurrency, on the spec's hardware (no ``--gpu``: the planner's ``cpu`` profile, matching the CPU reference
engine). Measured figures are put next to these."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from builder.errors import SpecError
from builder.plan.spec import plan_for_spec
from builder.rundir import MANIFEST, RunDir
from builder.specs import RunSpec

PREDICTED_KEYS = ("decode_step_ms", "tpot_ms", "ttft_ms", "tokens_per_s_per_user", "tokens_per_s", "tokens_per_s_per_gpu",
                  "batch_per_replica", "gpus_per_replica", "bound")


def run_spec(run_dir: Path) -> RunSpec:
    manifest = RunDir(run_dir).manifest
    if not manifest.is_file():
        raise SpecError(f"{run_dir} has no {MANIFEST}; pass the run directory the served repository came from")
    try:
        spec = json.loads(manifest.read_text())["spec"]
        # A run written by another dsbuild version may carry options this one lacks; the planner needs none of them.
        return RunSpec(**{k: v for k, v in spec.items() if k in RunSpec.model_fields})
    except (KeyError, ValueError, TypeError) as exc:
        raise SpecError(f"{manifest} does not hold a valid run spec ({type(exc).__name__}: {exc})") from None


def predict(run_dir: Path, *, isl: int, osl: int, concurrency: int) -> dict[str, Any]:
    """The planner's figures for the run's own layout at this workload."""
    spec = run_spec(run_dir).model_copy(update={"isl": isl, "osl": osl, "concurrency": concurrency})
    plan = plan_for_spec(spec).requested
    if plan is None:
        raise SpecError(f"the planner did not evaluate the run's layout {spec.layout.name}")
    d = plan.to_dict()
    out = {k: d.get(k) for k in PREDICTED_KEYS}
    out.update({"layout": plan.name, "hardware": spec.gpu or "cpu", "feasible": plan.feasible})
    return out
