"""Bridges to HF transformers' ``DeepseekV32ForCausalLM`` (the fp32 numerics oracle).

A quantized checkpoint (any format dsbuild writes) is dequantized tensor by tensor into a plain float checkpoint
directory, which transformers then loads with its own weight conversion (per-expert names -> fused experts), so the
oracle never depends on our understanding of its internal layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from builder.model.safetensors_io import write_index
from builder.model.safetensors_tensors import write_safetensors
from builder.safeio import dumps_json
from quantize.dequant import iter_float


def iter_dequantized(root: str | Path, *, dtype: torch.dtype = torch.float32):
    """Yield ``(name, tensor)`` of a checkpoint in any format dsbuild writes, every weight dequantized (scale
    tensors consumed; AWQ's pre_quant_scale folded in)."""

    for name, t in iter_float(root):  # validates the checkpoint first
        yield name, t.to(dtype)


def write_dequantized_checkpoint(src: str | Path, dst: str | Path, *, dtype: torch.dtype = torch.float32,
                                 include_mtp: bool = False) -> Path:
    """A float checkpoint transformers can load (quantization_config removed; MTP dropped by default since
    transformers ignores it)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    n_layers = cfg["num_hidden_layers"]
    tensors = {}
    for name, t in iter_dequantized(src, dtype=dtype):
        parts = name.split(".")
        if not include_mtp and len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= n_layers:
            continue
        tensors[name] = t
    size = write_safetensors(dst / "model-00001-of-000001.safetensors", tensors)
    write_index(dst, {n: "model-00001-of-000001.safetensors" for n in tensors}, total_size=size)
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    (dst / "config.json").write_text(dumps_json(cfg))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / extra).exists():
            shutil.copy2(src / extra, dst / extra)
    return dst


def load_hf_model(float_dir: str | Path, *, dtype: torch.dtype = torch.float32):
    """transformers' DeepseekV32ForCausalLM on CPU, eager attention (its SDPA path mishandles padding masks)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=dtype, attn_implementation="eager",
                                                 trust_remote_code=False)
    model.generation_config.eos_token_id = None
    return model.eval()
