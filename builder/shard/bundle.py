"""An engine bundle written from an HF-layout checkpoint: one ``rank{N}.safetensors`` per rank of a layout,
``config.json`` (model config, quantization, fusion and the mapping: world size, tp/pp/ep, attention-DP, each PP
stage's layers, each rank's experts and file) and the tokenizer files. The reference engine
(``builder.engine.bundle``) reads what this writes."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from builder.atomic import atomic_write_json
from builder.layout import Layout
from builder.model.catalog import policy_dtypes_found
from builder.model.config import ModelConfig
from builder.model.safetensors_io import validate_checkpoint
from builder.rundir import ENGINE_CONFIG
from builder.shard.fusion import FusionOptions, fuse_rank_tensors
from builder.shard.rules import plan_ranks
from builder.shard.writer import rank_file, write_all_ranks
from quantize.formats import mode_of_checkpoint, quantized_catalog

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def catalog_of_checkpoint(src: Path, cfg: ModelConfig):
    """The quantized format's catalogue (mode read from hf_quant_config.json), restricted to what the checkpoint
    holds (MTP may have been skipped at fetch), and the logical shapes of packed weights."""
    layout = validate_checkpoint(src)
    catalog = quantized_catalog(cfg, mode_of_checkpoint(src))
    # Tensors under the dtype policy are carried in the dtype the checkpoint stores (BF16 or F32), not the nominal one.
    specs = [replace(s, dtype=layout.tensor(s.name).dtype) if s.accepted is not None else s
             for s in catalog.specs if s.name in layout.index.weight_map]
    return layout, specs, catalog.logical_shapes


def write_engine_bundle(src: Path, out: Path, *, layout: Layout, fusion: FusionOptions) -> dict[str, Any]:
    """Rank files, ``config.json`` and tokenizer files of ``src`` (an HF-layout checkpoint) into ``out``."""
    src, out = Path(src), Path(out)
    cfg = ModelConfig.from_json_file(src / "config.json")
    ckpt, specs, logical_shapes = catalog_of_checkpoint(src, cfg)
    plans = plan_ranks(cfg, layout, specs, weight_shapes=logical_shapes)

    def fuse(tensors, plan):
        return fuse_rank_tensors(tensors, cfg=cfg, experts=plan.experts, options=fusion)

    sizes = write_all_ranks(ckpt, plans, out, transform=fuse)
    quant = json.loads((src / "hf_quant_config.json").read_text()) if (src / "hf_quant_config.json").exists() else {}
    mapping = {
        "world_size": layout.world_size, "tp": layout.tp, "pp": layout.pp, "ep": layout.ep,
        "moe_tp": layout.moe_tp, "attention_dp": layout.attention_dp,
        "stage_layers": layout.stage_layers(cfg.num_hidden_layers),
        "ranks": [{"rank": p.rank, "tp_rank": p.tp_rank, "pp_rank": p.pp_rank, "layers": p.layers,
                   "experts": p.experts, "file": rank_file(p.rank), "weight_bytes": p.nbytes} for p in plans],
    }
    dtypes = policy_dtypes_found(specs, lambda n: ckpt.tensor(n).dtype)
    atomic_write_json(out / ENGINE_CONFIG, {"model": cfg.to_dict(), "quantization": quant.get("quantization"),
                                            "stored_dtypes": dtypes, "mapping": mapping, "fusion": fusion.to_dict()})
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    return {"ranks": len(plans), "max_rank_bytes": max(sizes.values()), "stored_dtypes": dtypes}
