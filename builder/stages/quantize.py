"""quantize stage: the checkpoint in the requested weight format, in ``quantized/``.

``fp8`` keeps DeepSeek's block FP8 (verified, hard-linked, ``hf_quant_config.json`` added); ``bf16`` dequantizes
tensor by tensor from memory-mapped shards, writing each output shard as it goes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from builder.atomic import atomic_write_json
from builder.errors import QuantizationError
from builder.model.config import ModelConfig
from builder.model.safetensors_io import INDEX_NAME, validate_checkpoint, write_index, write_safetensors
from builder.pipeline import Stage, StageContext
from builder.stages.fetch import SMALL_FILES, link_or_copy

VERSION = "1"


def hf_quant_config(quant_algo: str | None, kv_cache_dtype: str) -> dict[str, Any]:
    from builder import __version__

    return {
        "producer": {"name": "dsbuild", "version": __version__},
        "quantization": {"quant_algo": quant_algo, "kv_cache_quant_algo": "FP8" if kv_cache_dtype == "fp8" else None},
    }


def quantize_fp8_passthrough(src: Path, out: Path, kv_cache_dtype: str) -> dict[str, Any]:
    cfg = ModelConfig.from_json_file(src / "config.json")
    if not cfg.is_fp8_block:
        raise QuantizationError("--quant fp8 keeps DeepSeek's native block FP8, but this checkpoint is not block FP8")
    layout = validate_checkpoint(src)
    for shard in layout.index.shard_files:
        link_or_copy(src / shard, out / shard)
    for name in SMALL_FILES:
        if (src / name).is_file() and name != "hf_quant_config.json":
            shutil.copy2(src / name, out / name)
    atomic_write_json(out / "hf_quant_config.json", hf_quant_config("FP8_BLOCK_SCALES", kv_cache_dtype))
    return {"mode": "fp8", "shards": len(layout.index.shard_files)}


def dequantize_bf16(src: Path, out: Path, kv_cache_dtype: str) -> dict[str, Any]:
    import torch
    from safetensors import safe_open

    from quantize import fp8_block

    layout = validate_checkpoint(src)
    weight_map: dict[str, str] = {}
    total = 0
    for shard in layout.index.shard_files:
        tensors = {}
        with safe_open(str(src / shard), framework="pt") as f:
            for name in f.keys():
                if name.endswith("weight_scale_inv"):
                    continue
                t = f.get_tensor(name)
                if t.dtype == torch.float8_e4m3fn:
                    scale_name = name[: -len("weight")] + "weight_scale_inv"
                    scale_file = layout.index.weight_map[scale_name]
                    if scale_file == shard:
                        s = f.get_tensor(scale_name)
                    else:
                        with safe_open(str(src / scale_file), framework="pt") as g:
                            s = g.get_tensor(scale_name)
                    t = fp8_block.dequantize(t, s, dtype=torch.bfloat16)
                tensors[name] = t
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        write_safetensors(out / shard, tensors)
        weight_map.update({n: shard for n in tensors})
        del tensors
    write_index(out, weight_map, total_size=total)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "bfloat16"
    atomic_write_json(out / "config.json", cfg)
    for name in SMALL_FILES:
        if (src / name).is_file() and name not in ("config.json", INDEX_NAME, "hf_quant_config.json"):
            shutil.copy2(src / name, out / name)
    atomic_write_json(out / "hf_quant_config.json", hf_quant_config(None, kv_cache_dtype))
    return {"mode": "bf16", "shards": len(layout.index.shard_files)}


MODES = {"fp8": quantize_fp8_passthrough, "bf16": dequantize_bf16}


def run(ctx: StageContext) -> dict[str, Any]:
    mode = ctx.spec.quant
    if mode not in MODES:
        raise QuantizationError(f"quantization mode {mode!r} is not available in this build of dsbuild")
    return MODES[mode](ctx.inputs["fetch"], ctx.out, ctx.spec.kv_cache_dtype)


STAGE = Stage(name="quantize", version=VERSION, output="quantized", upstream=("fetch",), run=run,
              tools=("torch", "safetensors"), describe=lambda spec, extra: f"quantize to {spec.quant}")
