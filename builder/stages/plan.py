"""plan stage: evaluate the requested layout on the target cluster (and every alternative) before anything is
downloaded; refuse an infeasible one (one that a later stage cannot build: always; one that only does not fit:
unless ``--allow-infeasible``); write ``plan.json`` and ``plan.png``.

The refusal is the stage's preflight, so it applies on every run, cached or not, before any stage starts, and
toggling the flag does not change the stage key (nothing downstream rebuilds).
"""

from __future__ import annotations

from typing import Any

from builder.atomic import atomic_write_json
from builder.errors import LayoutError
from builder.pipeline import Stage, StageContext
from builder.plan.plot import plot_plan
from builder.plan.spec import alternatives, layout_fields, layout_flags, plan_for_spec
from builder.rundir import PLAN
from builder.specs import RunSpec
from builder.stages import package

VERSION = "2"


def check_requested(spec: RunSpec, stages: tuple[str, ...] = (), result=None) -> None:
    """Raise LayoutError naming every reason when the spec's layout is infeasible: always when a stage of this run
    (``stages``) would refuse it too (a sharding rule, a weight format the GPU cannot run, launch files that cannot
    spread its ranks), otherwise unless --allow-infeasible. The message suggests only layouts that pass the same
    checks, and --allow-infeasible only where it would work."""
    result = result or plan_for_spec(spec)
    req = result.requested
    if req is None:
        return
    packaged = "package" in stages

    def later_refusals(s: RunSpec, lp) -> list[str]:
        return list(lp.unbuildable) + ([r] if packaged and (r := package.refusal(s)) else [])

    refused = later_refusals(spec, req)
    if req.feasible and not refused or not refused and spec.allow_infeasible:
        return
    options = [f"{lp.layout.name} ({layout_flags(lp.layout)})" for lp in alternatives(
        spec, result, accept=lambda lp: not later_refusals(spec.model_copy(update=layout_fields(lp.layout)), lp))]
    instead = f"; feasible instead: {', '.join(options)}" if options else ""
    if refused:
        raise LayoutError(f"cannot build {spec.layout.name}: {'; '.join(dict.fromkeys(req.reasons + refused))}"
                          f"{instead}")
    raise LayoutError(f"layout {spec.layout.name} is not feasible: {'; '.join(req.reasons)}{instead}"
                      f"{' or' if options else ';'} pass --allow-infeasible to build it anyway")


def run(ctx: StageContext) -> dict[str, Any]:
    result = plan_for_spec(ctx.spec)
    check_requested(ctx.spec, result=result)
    out = result.to_dict()
    out["allowed_infeasible"] = bool(result.requested and not result.requested.feasible)
    atomic_write_json(ctx.out / "plan.json", out)
    plot_plan(result, ctx.out / "plan.png")
    req = result.requested
    rec = result.recommended
    summary = (f"{req.name}: {'feasible' if req.feasible else 'INFEASIBLE (allowed)'}, "
               f"{_gib_or_mib(max(req.weights_per_rank or [0]))} weights on the fullest GPU"
               + (f", {req.decode.step_ms:.1f} ms/step" if req.decode else "")
               + (f"; planner recommends {rec.name}" if rec is not None and rec is not req else ""))
    return {"layout": req.name, "feasible": req.feasible, "world_size": req.gpus_per_replica,
            "max_weights_per_rank_bytes": max(req.weights_per_rank or [0]), "recommended": rec.name if rec else None,
            "plan": summary}


STAGE = Stage(name="plan", version=VERSION, output=PLAN, upstream=(), run=run, preflight=check_requested,
              tools=("matplotlib",),
              describe=lambda spec, extra: f"plan layout {spec.layout.name} for {spec.model}")


def _gib_or_mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
