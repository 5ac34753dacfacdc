"""The planner for a run spec: what ``dsbuild plan``, the plan stage and ``dsbuild bench``'s prediction ask."""

from __future__ import annotations

from collections.abc import Callable

from builder.layout import Layout
from builder.plan.result import LayoutPlan, PlanResult
from builder.plan.search import plan_cluster
from builder.specs import RunSpec

LAYOUT_FIELDS = ("tp", "pp", "ep", "attention_dp")


def plan_for_spec(spec: RunSpec, *, fixed: set[str] | None = None, requested: bool = True):
    """``plan_cluster`` for a spec. ``fixed``: the layout fields the user set (only those constrain the search);
    ``requested``: mark the spec's own layout (what a pipeline run builds) and always evaluate it."""
    fixed = fixed or set()
    return plan_cluster(
        model=spec.model, gpu=spec.gpu, nodes=spec.nodes, gpus_per_node=spec.gpus_per_node, network=spec.network,
        hardware_file=spec.hardware_file, quant=spec.quant, kv_cache_dtype=spec.kv_cache_dtype, isl=spec.isl,
        osl=spec.osl, concurrency=spec.concurrency, ttft_ms=spec.ttft_ms, tpot_ms=spec.tpot_ms,
        include_mtp=not spec.skip_mtp, draft_len=spec.draft_len if spec.spec == "mtp" else 0,
        **{k: getattr(spec, k) for k in LAYOUT_FIELDS if k in fixed},
        requested=spec.layout if requested else None)


def alternatives(spec: RunSpec, result: PlanResult, *, limit: int = 3,
                 accept: Callable[[LayoutPlan], bool] = lambda lp: True) -> list[LayoutPlan]:
    """Feasible layouts to suggest instead of the spec's infeasible one, closest first: the requested layout with
    one of TP, PP, EP or attention-DP changed (each evaluated by the planner exactly as a run with those flags
    would be), then the planner's own ranking of the cluster. Only layouts the same checks pass (and ``accept``,
    the caller's further checks) are returned."""
    req = spec.layout
    near: list[LayoutPlan] = []
    for name, values in (("tp", _around(req.tp)), ("pp", _around(req.pp)), ("ep", _around(req.ep)),
                         ("attention_dp", [not req.attention_dp])):
        for v in values:
            fields = layout_fields(req) | {name: v}
            if fields["tp"] % fields["ep"]:
                continue
            lp = plan_for_spec(spec.model_copy(update=fields), fixed=set(LAYOUT_FIELDS)).requested
            if lp is not None and lp.feasible and accept(lp):
                near.append(lp)
    near.sort(key=lambda lp: (_distance(lp.layout, req), lp.sort_key()))
    ranked = [lp for lp in result.layouts if lp.feasible and lp.layout not in {n.layout for n in near} and accept(lp)]
    return (near + ranked)[:limit]


def _around(v: int) -> list[int]:
    """Powers of two and the neighbours around ``v`` (the sizes TP/PP/EP usually take), nearest first."""
    cands = {v - 1, v + 1, *(1 << i for i in range(11))} - {v}
    return sorted((c for c in cands if c >= 1), key=lambda c: (abs(c - v), c))[:6]


def _distance(a: Layout, b: Layout) -> tuple[int, float]:
    changed = sum(getattr(a, k) != getattr(b, k) for k in LAYOUT_FIELDS)
    return changed, sum(abs(getattr(a, k) - getattr(b, k)) / max(getattr(b, k), 1) for k in ("tp", "pp", "ep"))


def layout_fields(layout: Layout) -> dict[str, int | bool]:
    return {k: getattr(layout, k) for k in LAYOUT_FIELDS}


def layout_flags(layout: Layout) -> str:
    """The flags that ask for ``layout``."""
    return (f"--tp {layout.tp} --pp {layout.pp}" + (f" --ep {layout.ep}" if layout.ep != 1 else "")
            + (" --attention-dp" if layout.attention_dp else ""))
