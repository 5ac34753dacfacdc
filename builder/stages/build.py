"""build stage: the per-rank engine bundle in ``engines/`` (``builder.shard.bundle``), ``llm_api.yaml`` for
TensorRT-LLM (``builder.trtllm``) and, with ``--spec draft``, the draft model's one-rank bundle in
``engines/draft/`` (the reference engine runs the draft whole on its sampler rank; TensorRT-LLM shards the draft
itself, from ``draft-quantized/``, with the target's mapping when it loads).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from builder.atomic import atomic_write_text
from builder.errors import CheckpointError
from builder.layout import Layout
from builder.model.config import ModelConfig
from builder.pipeline import Stage, StageContext
from builder.rundir import DRAFT_BUNDLE, ENGINES, LLM_API_FILE
from builder.shard.bundle import write_engine_bundle
from builder.shard.fusion import FusionOptions, device_defaults
from builder.specs import RunSpec
from builder.stages.draft import DRAFT_QUANTIZE
from builder.trtllm import PINNED_VERSION, llm_api
from builder.trtllm.validate import validate_with_trtllm

VERSION = "3"


def fusion_of(spec: RunSpec) -> FusionOptions:
    """The flags given, the rest from the measured defaults of the device the bundle is for: a GPU build's bundle
    runs on CUDA, any other on the CPU."""
    names = FusionOptions.__dataclass_fields__
    given = {name: getattr(spec, name) for name in names if getattr(spec, name) is not None}
    return replace(device_defaults("cuda" if spec.gpu else "cpu"), **given)


def write_llm_api(spec: RunSpec, src: Path, out: Path, log=print) -> dict[str, Any]:
    """``llm_api.yaml`` for TensorRT-LLM; validated by TensorRT-LLM itself when it is importable."""
    cfg = ModelConfig.from_json_file(Path(src) / "config.json")
    rendered = llm_api.render(spec, cfg)
    atomic_write_text(Path(out) / LLM_API_FILE, rendered.to_yaml())
    for w in rendered.warnings:
        log(f"warning: {w}")
    validated = validate_with_trtllm(rendered.options, model_dir=src)
    return {"trtllm_version": PINNED_VERSION, "trtllm_validated_with": validated, "warnings": rendered.warnings,
            **rendered.info}


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def check_draft_fits_target(draft: Path, target: Path, *, name: str) -> ModelConfig:
    """A draft model must share the target's vocabulary and tokenizer; its config."""
    cfg = ModelConfig.from_json_file(draft / "config.json")
    target_cfg = ModelConfig.from_json_file(target / "config.json")
    if cfg.vocab_size != target_cfg.vocab_size:
        raise CheckpointError(f"draft model {name} has a vocabulary of {cfg.vocab_size}, the target "
                              f"{target_cfg.vocab_size}; a draft model must share the target's tokenizer")
    mine, theirs = _sha256(draft / "tokenizer.json"), _sha256(target / "tokenizer.json")
    if mine and theirs and mine != theirs:
        raise CheckpointError(f"draft model {name} has a different tokenizer.json from the target's; "
                              "a draft model must share the target's tokenizer")
    return cfg


def run(ctx: StageContext) -> dict[str, Any]:
    fusion = fusion_of(ctx.spec)
    info = write_engine_bundle(ctx.inputs["quantize"], ctx.out, layout=ctx.spec.layout, fusion=fusion)
    if ctx.spec.spec == "draft":
        draft = ctx.inputs[DRAFT_QUANTIZE.name]
        cfg = check_draft_fits_target(draft, ctx.inputs["quantize"], name=ctx.spec.draft_model)
        bundle = write_engine_bundle(draft, ctx.out / DRAFT_BUNDLE, layout=Layout(), fusion=fusion)
        info["draft"] = {"model": ctx.spec.draft_model, "layers": cfg.num_hidden_layers, **bundle}
    info["llm_api"] = write_llm_api(ctx.spec, ctx.inputs["quantize"], ctx.out, log=ctx.log)
    return info


def stage(spec: RunSpec) -> Stage:
    """The build stage of ``spec``'s pipeline (it also reads the draft model's checkpoint with --spec draft)."""
    upstream = ("plan", "quantize") + ((DRAFT_QUANTIZE.name,) if spec.spec == "draft" else ())
    return Stage(name="build", version=VERSION, output=ENGINES, upstream=upstream, run=run,
                 tools=("torch", "safetensors"),
                 # the fusions the bundle gets, defaults resolved: a changed defaults file rebuilds it
                 key_inputs=lambda spec, upstream: {"fusion": fusion_of(spec).to_dict()},
                 describe=lambda spec, extra: f"write {spec.layout.world_size} rank files")
