"""build stage: the per-rank engine bundle in ``engines/``.

``config.json`` (model config, quantization, fusion and the mapping: world size, tp/pp/ep, attention-DP, each PP
stage's layers, each EP rank's experts) and one ``rank{N}.safetensors`` per rank holding exactly what that rank
needs (fused per ``builder.shard.fusion``), plus ``llm_api.yaml`` for TensorRT-LLM (``builder.trtllm``).
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
from builder.shard.fusion import FusionOptions, fuse_rank_tensors
from builder.shard.rules import plan_ranks
from builder.layout import Layout
from builder.shard.writer import rank_file, write_all_ranks
from builder.stages.draft import build_draft, key_inputs as draft_key_inputs

VERSION = "2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
ENGINE_CONFIG = "config.json"
LLM_API_FILE = "llm_api.yaml"


def catalog_of_checkpoint(src: Path, cfg: ModelConfig):
    """The quantized format's catalogue (mode read from hf_quant_config.json), restricted to what the checkpoint
    holds (MTP may have been skipped at fetch), and the logical shapes of packed weights."""
    from quantize.formats import mode_of_checkpoint, quantized_catalog

    layout = validate_checkpoint(src)
    catalog = quantized_catalog(cfg, mode_of_checkpoint(src))
    specs = [s for s in catalog.specs if s.name in layout.index.weight_map]
    return layout, specs, catalog.logical_shapes


def fusion_of(spec) -> FusionOptions:
    return FusionOptions(fuse_gate_up=spec.fuse_gate_up, fuse_qkv_a=spec.fuse_qkv_a, stack_experts=spec.stack_experts,
                         absorb_mla=spec.absorb_mla)


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
    atomic_write_json(out / ENGINE_CONFIG, {"model": cfg.to_dict(), "quantization": quant.get("quantization"),
                                            "mapping": mapping, "fusion": fusion.to_dict()})
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    return {"ranks": len(plans), "max_rank_bytes": max(sizes.values())}


def write_llm_api(spec, src: Path, out: Path, log=print) -> dict[str, Any]:
    """``llm_api.yaml`` for TensorRT-LLM; validated by TensorRT-LLM itself when it is importable."""
    from builder.atomic import atomic_write_text
    from builder.trtllm import PINNED_VERSION, llm_api
    from builder.trtllm.validate import validate_with_trtllm

    cfg = ModelConfig.from_json_file(Path(src) / "config.json")
    rendered = llm_api.render(spec, cfg)
    atomic_write_text(Path(out) / LLM_API_FILE, rendered.to_yaml())
    for w in rendered.warnings:
        log(f"warning: {w}")
    validated = validate_with_trtllm(rendered.options, model_dir=src)
    return {"trtllm_version": PINNED_VERSION, "trtllm_validated_with": validated, "warnings": rendered.warnings}


def run(ctx: StageContext) -> dict[str, Any]:
    info = write_engine_bundle(ctx.inputs["quantize"], ctx.out, layout=ctx.spec.layout, fusion=fusion_of(ctx.spec))
    if ctx.spec.spec == "draft":
        info["draft"] = build_draft(ctx, target_src=ctx.inputs["quantize"], fusion=fusion_of(ctx.spec))
    info["llm_api"] = write_llm_api(ctx.spec, ctx.inputs["quantize"], ctx.out, log=ctx.log)
    return info


STAGE = Stage(name="build", version=VERSION, output="engines", upstream=("plan", "quantize"), run=run,
              key_inputs=draft_key_inputs,
              tools=("torch", "safetensors"), describe=lambda spec, extra: f"write {spec.layout.world_size} rank files")
