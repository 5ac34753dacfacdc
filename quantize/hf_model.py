"""The float model as transformers runs it, for calibration and the quality report (whole model in memory).

``float_model(tensors, config_json)`` writes the given float tensors (main model only; transformers ignores the
MTP layer) to a temporary HF checkpoint and loads ``DeepseekV32ForCausalLM`` from it with transformers' own weight
conversion, so we never depend on its in-memory layout; then the fused experts are replaced by per-expert linears.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from builder.model.catalog import is_mtp_tensor
from builder.model.config import ModelConfig
from builder.model.hf_compat import load_hf_model
from builder.model.safetensors_io import write_index
from builder.model.safetensors_tensors import write_safetensors
from builder.safeio import dumps_json
from quantize.fp8_tensor import FP8_MAX
from quantize.hf_experts import unfuse_experts


def float_model(tensors: Iterable[tuple[str, torch.Tensor]], config_json: str | Path, *,
                dtype: torch.dtype = torch.float32, unfuse: bool = True):

    raw = json.loads(Path(config_json).read_text())
    cfg = ModelConfig.from_dict(raw, source=str(config_json))
    raw.pop("quantization_config", None)
    raw["torch_dtype"] = str(dtype).replace("torch.", "")
    with tempfile.TemporaryDirectory(prefix="dsbuild-float-") as tmp:
        state = {n: t.to(dtype) for n, t in tensors if not is_mtp_tensor(n, cfg)}
        size = write_safetensors(Path(tmp) / "model.safetensors", state)
        write_index(tmp, {n: "model.safetensors" for n in state}, total_size=size)
        del state
        (Path(tmp) / "config.json").write_text(dumps_json(raw))
        model = load_hf_model(tmp, dtype=dtype)
    if unfuse:
        unfuse_experts(model)
    return model


def fake_quant_fp8_inputs(model: torch.nn.Module, scales: dict[str, float]) -> list:
    """Quantize-dequantize each named linear's input to FP8 with its static per-tensor scale (as the kernel sees it)."""
    handles = []
    modules = dict(model.named_modules())
    for name, scale in scales.items():
        mod = modules.get(name)
        if mod is None:
            continue

        def hook(_m, args, s=float(scale)):
            x = args[0]
            q = (x.to(torch.float32) / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            return (q.to(torch.float32) * s).to(x.dtype), *args[1:]
        handles.append(mod.register_forward_pre_hook(hook))
    return handles


@torch.no_grad()
def logits(model, tokens: torch.Tensor, *, batch: int = 4) -> torch.Tensor:
    outs = [model(tokens[i: i + batch]).logits.to(torch.float32) for i in range(0, len(tokens), batch)]
    return torch.cat(outs)
