"""The planner for a run spec: what ``dsbuild plan``, the plan stage and ``dsbuild bench``'s prediction ask."""

from __future__ import annotations

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
