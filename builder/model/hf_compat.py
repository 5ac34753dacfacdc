"""Bridges to HF transformers' ``DeepseekV32ForCausalLM`` (the fp32 numerics oracle).

A block-FP8 checkpoint is dequantized tensor by tensor into a plain float checkpoint directory, which transformers
then loads with its own weight conversion (per-expert names -> fused experts), so the oracle never depends on our
understanding of its internal layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from builder.model.safetensors_io import INDEX_NAME, validate_checkpoint, write_index, write_safetensors
from quantize import fp8_block


def iter_dequantized(root: str | Path, *, dtype: torch.dtype = torch.float32):
    """Yield ``(name, tensor)`` of a checkpoint with every FP8 weight dequantized and scale tensors dropped."""
    from safetensors import safe_open

    layout = validate_checkpoint(root)
    for shard in layout.index.shard_files:
        with safe_open(str(layout.root / shard), framework="pt") as f:
            names = set(f.keys())
            for name in sorted(names):
                if name.endswith(".weight_scale_inv"):
                    continue
                t = f.get_tensor(name)
                scale_name = name[: -len("weight")] + "weight_scale_inv" if name.endswith(".weight") else None
                if t.dtype == torch.float8_e4m3fn:
                    scale_file = layout.index.weight_map.get(scale_name)
                    if scale_file == shard:
                        s = f.get_tensor(scale_name)
                    else:
                        with safe_open(str(layout.root / scale_file), framework="pt") as g:
                            s = g.get_tensor(scale_name)
                    yield name, fp8_block.dequantize(t, s, dtype=dtype)
                else:
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
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
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
