"""build stage: the per-rank engine bundle in ``engines/``.

``config.json`` (model config, quantization and the mapping: world size, tp/pp/ep, attention-DP, each PP stage's
layers, each EP rank's experts) and one ``rank{N}.safetensors`` per rank holding exactly what that rank needs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from builder.atomic import atomic_write_json
from builder.model.config import ModelConfig
from builder.model.safetensors_io import validate_checkpoint
from builder.pipeline import Stage, StageContext
from builder.shard.rules import plan_ranks, stage_layers
from builder.shard.writer import rank_file, write_all_ranks
from builder.stages.plan import layout_of

VERSION = "1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def catalog_of_checkpoint(src: Path, cfg: ModelConfig):
    """The quantized format's catalogue (mode read from hf_quant_config.json), restricted to what the checkpoint
    holds (MTP may have been skipped at fetch), and the logical shapes of packed weights."""
    from quantize.formats import mode_of_checkpoint, quantized_catalog

    layout = validate_checkpoint(src)
    catalog = quantized_catalog(cfg, mode_of_checkpoint(src))
    specs = [s for s in catalog.specs if s.name in layout.index.weight_map]
    return layout, specs, catalog.logical_shapes


def run(ctx: StageContext) -> dict[str, Any]:
    src = ctx.inputs["quantize"]
    cfg = ModelConfig.from_json_file(src / "config.json")
    layout = layout_of(ctx.spec)
    ckpt, specs, logical_shapes = catalog_of_checkpoint(src, cfg)
    plans = plan_ranks(cfg, layout, specs, weight_shapes=logical_shapes)
    sizes = write_all_ranks(ckpt, plans, ctx.out)
    quant = json.loads((src / "hf_quant_config.json").read_text()) if (src / "hf_quant_config.json").exists() else {}
    mapping = {
        "world_size": layout.world_size, "tp": layout.tp, "pp": layout.pp, "ep": layout.ep,
        "moe_tp": layout.moe_tp, "attention_dp": layout.attention_dp,
        "stage_layers": stage_layers(cfg.num_hidden_layers, layout.pp),
        "ranks": [{"rank": p.rank, "tp_rank": p.tp_rank, "pp_rank": p.pp_rank, "layers": p.layers,
                   "experts": p.experts, "file": rank_file(p.rank), "weight_bytes": p.nbytes} for p in plans],
    }
    atomic_write_json(ctx.out / "config.json", {"model": cfg.to_dict(), "quantization": quant.get("quantization"),
                                                "mapping": mapping})
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, ctx.out / name)
    return {"ranks": len(plans), "max_rank_bytes": max(sizes.values())}


STAGE = Stage(name="build", version=VERSION, output="engines", upstream=("plan", "quantize"), run=run,
              tools=("torch", "safetensors"), describe=lambda spec, extra: f"write {spec.tp * spec.pp} rank files")
