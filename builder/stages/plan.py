"""plan stage: check the requested layout against the model before anything is downloaded, and record it."""

from __future__ import annotations

from typing import Any

from builder.atomic import atomic_write_json
from builder.model.catalog import build_catalog
from builder.model.source import resolve_model
from builder.pipeline import Stage, StageContext
from builder.shard.rules import Layout, plan_ranks, stage_layers
from builder.specs import RunSpec

VERSION = "1"


def layout_of(spec: RunSpec) -> Layout:
    return Layout(tp=spec.tp, pp=spec.pp, ep=spec.ep, attention_dp=spec.attention_dp)


def run(ctx: StageContext) -> dict[str, Any]:
    src = resolve_model(ctx.spec.model)
    cfg = src.config
    layout = layout_of(ctx.spec)
    ranks = plan_ranks(cfg, layout, build_catalog(cfg))
    plan = {
        "model": ctx.spec.model,
        "layout": {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep, "attention_dp": layout.attention_dp,
                   "world_size": layout.world_size, "moe_tp": layout.moe_tp},
        "stage_layers": stage_layers(cfg.num_hidden_layers, layout.pp),
        "weights_per_rank_bytes": [r.nbytes for r in ranks],
        "feasible": True,
    }
    atomic_write_json(ctx.out / "plan.json", plan)
    return {"world_size": layout.world_size, "max_weights_per_rank_bytes": max(plan["weights_per_rank_bytes"])}


STAGE = Stage(name="plan", version=VERSION, output="plan", upstream=(), run=run,
              describe=lambda spec, extra: f"check layout {spec.layout_name()} for {spec.model}")
