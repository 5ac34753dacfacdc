"""Read any quantized checkpoint dsbuild writes back to float weights: one dequantizer per stored format.

This is both what the quality report runs (the quantized model as transformers sees it) and a check of each format:
a wrong packing order, scale layout or scale direction shows up as a collapsed SQNR / KL in ``quant_report.json``
and in the round-trip tests.

``iter_float(root)`` yields ``(name, float32 tensor)`` under the original HF names (scales consumed, AWQ
``pre_quant_scale`` folded into its weight as ``W * diag(s)``); ``activation_scales(root)`` gives the static
per-tensor FP8 input scales a format uses at inference (module name -> scale).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import torch

from quantize import fp8_block, fp8_tensor, int4, nvfp4
from quantize.formats import mode_of_checkpoint
from quantize.stream import TensorReader

# What a stored weight ``X.weight`` may come with, as ``X.<suffix>``: the tensors its float value depends on, and
# TensorRT-LLM's static activation scale, which belongs to the projection but not to its weight's value.
WEIGHT_COMPANIONS = ("weight_scale_inv", "weight_scale", "weight_scale_2", "pre_quant_scale")
COMPANIONS = WEIGHT_COMPANIONS + ("input_scale",)
COMPANION_SUFFIXES = tuple("." + c for c in COMPANIONS)
# TensorRT-LLM names expert projections w1 (gate), w2 (down), w3 (up).
_W_TO_PROJ = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}
_W4A8_SCALE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.\d+)\.w([123])\.input_scale$")


def iter_float(root: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    with TensorReader(root) as r:
        names = set(r.names)
        for name in r.names:
            if not name.endswith(COMPANION_SUFFIXES):
                yield name, dequantize(r.read(name), companions_of(name, names, r.read))


def companions_of(name: str, names: set[str], read) -> dict[str, torch.Tensor]:
    """The weight companions of tensor ``name`` present in ``names`` (suffix -> tensor, read with ``read``)."""
    if not name.endswith(".weight"):
        return {}
    base = name[: -len("weight")]
    return {c: read(base + c) for c in WEIGHT_COMPANIONS if base + c in names}


def dequantize(weight: torch.Tensor, companions: dict[str, torch.Tensor], *,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One stored weight in ``dtype``, from its companions (suffix -> tensor, see ``WEIGHT_COMPANIONS``). The format
    follows from the stored dtype and which companions exist, as in the checkpoints each format's writer makes."""
    dt, c = weight.dtype, companions
    if dt == torch.float8_e4m3fn and "weight_scale_inv" in c:
        return fp8_block.dequantize(weight, c["weight_scale_inv"], dtype=dtype)
    if dt == torch.int8 and "weight_scale_inv" in c:  # TensorRT-LLM W4A8: int4 along the input dim
        return int4.dequantize(int4.unpack(weight, along="in"), c["weight_scale_inv"]).to(dtype)
    if dt == torch.float8_e4m3fn and "weight_scale" in c:
        return fp8_tensor.dequantize(weight, c["weight_scale"]).to(dtype)
    if dt == torch.uint8 and "weight_scale_2" in c:
        return nvfp4.dequantize(weight, c["weight_scale"], c["weight_scale_2"]).to(dtype)
    if dt == torch.uint8 and "weight_scale" in c:  # ModelOpt INT4 AWQ: int4 along the output dim
        w = int4.dequantize(int4.unpack(weight, along="out"), c["weight_scale"])
        if "pre_quant_scale" in c:
            w = w * c["pre_quant_scale"].to(torch.float32)[None, :]
        return w.to(dtype)
    if dt in (torch.float8_e4m3fn, torch.int8, torch.uint8):
        raise ValueError(f"a {dt} weight without the scales its format needs (has: {sorted(c) or 'none'})")
    return weight.to(dtype)


def activation_scales(root: str | Path, *, mode: str | None = None) -> dict[str, float]:
    """Static FP8 input scales: module name (HF naming) -> scale. NVFP4 input scales are not FP8 and are left out."""
    mode = mode or mode_of_checkpoint(root)
    out: dict[str, float] = {}
    if mode not in ("fp8-tensor", "w4afp8"):
        return out
    with TensorReader(root) as r:
        for name in r.names:
            if not name.endswith(".input_scale"):
                continue
            m = _W4A8_SCALE.match(name)
            if m:
                out[f"{m.group(1)}.{_W_TO_PROJ[m.group(2)]}"] = float(r.read(name).reshape(-1)[0])
            else:
                out[name[: -len(".input_scale")]] = float(r.read(name).reshape(-1)[0])
    return out

