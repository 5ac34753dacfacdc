"""plan stage: evaluate the requested layout on the target cluster (and every alternative) before anything is
downloaded; refuse an infeasible one unless ``--allow-infeasible``; write ``plan.json`` and ``plan.png``.

The refusal runs in ``key_inputs``, so it applies on every run, cached or not, and toggling the flag does not
change the stage key (nothing downstream rebuilds).
"""

from __future__ import annotations

from typing import Any

from builder.atomic import atomic_write_json
from builder.errors import LayoutError
from builder.pipeline import Stage, StageContext
from builder.specs import RunSpec

VERSION = "2"


def plan_for_spec(spec: RunSpec, *, fixed: set[str] | None = None, requested: bool = True):
    """``plan_cluster`` for a spec. ``fixed``: the layout fields the user set (only those constrain the search);
    ``requested``: mark the spec's own layout (what a pipeline run builds) and always evaluate it."""
    from builder.plan import plan_cluster

    fixed = fixed or set()
    return plan_cluster(
        model=spec.model, gpu=spec.gpu, nodes=spec.nodes, gpus_per_node=spec.gpus_per_node, network=spec.network,
        hardware_file=spec.hardware_file, quant=spec.quant, kv_cache_dtype=spec.kv_cache_dtype, isl=spec.isl,
        osl=spec.osl, concurrency=spec.concurrency, ttft_ms=spec.ttft_ms, tpot_ms=spec.tpot_ms,
        include_mtp=not spec.skip_mtp, mtp=spec.spec == "mtp",
        **{k: getattr(spec, k) for k in ("tp", "pp", "ep", "attention_dp") if k in fixed},
        requested=spec.layout if requested else None)


def check_requested(spec: RunSpec, result=None) -> None:
    """Raise LayoutError naming every reason when the spec's layout is infeasible and not allowed."""
    result = result or plan_for_spec(spec)
    req = result.requested
    if req is not None and not req.feasible and not spec.allow_infeasible:
        raise LayoutError(f"layout {spec.layout.name} is not feasible: {'; '.join(req.reasons)} "
                          "(pass --allow-infeasible to build it anyway)")


def _key_inputs(spec: RunSpec, upstream: dict[str, dict[str, Any]]) -> dict[str, Any]:
    check_requested(spec)
    return {}


def run(ctx: StageContext) -> dict[str, Any]:
    from builder.plan.plot import plot_plan

    result = plan_for_spec(ctx.spec)
    check_requested(ctx.spec, result)
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


STAGE = Stage(name="plan", version=VERSION, output="plan", upstream=(), run=run, key_inputs=_key_inputs,
              tools=("matplotlib",),
              describe=lambda spec, extra: f"plan layout {spec.layout.name} for {spec.model}")


def _gib_or_mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
