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

from builder.model.catalog import Dtype
from quantize import fp8_block, fp8_tensor, int4, nvfp4
from quantize.formats import mode_of_checkpoint
from quantize.stream import TensorReader

_SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".weight_scale_2", ".input_scale", ".pre_quant_scale")
# TensorRT-LLM names expert projections w1 (gate), w2 (down), w3 (up).
_W_TO_PROJ = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}
_W4A8_SCALE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.\d+)\.w([123])\.input_scale$")


def iter_float(root: str | Path, *, mode: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    mode = mode or mode_of_checkpoint(root)
    with TensorReader(root) as r:
        names = set(r.names)
        for name in r.names:
            if name.endswith(_SCALE_SUFFIXES):
                continue
            yield name, _weight(r, name, names, mode)


def _weight(r: TensorReader, name: str, names: set[str], mode: str) -> torch.Tensor:
    base = name[: -len("weight")] if name.endswith(".weight") else None
    t = r.read(name)
    if base is None:
        return t.to(torch.float32)
    dt = r.dtype(name)
    if dt is Dtype.F8_E4M3 and base + "weight_scale_inv" in names:
        return fp8_block.dequantize(t, r.read(base + "weight_scale_inv"), dtype=torch.float32)
    if dt is Dtype.I8 and base + "weight_scale_inv" in names:  # TensorRT-LLM W4A8: int4 along the input dim
        return int4.dequantize(int4.unpack(t, along="in"), r.read(base + "weight_scale_inv"))
    if dt is Dtype.F8_E4M3 and base + "weight_scale" in names:
        return fp8_tensor.dequantize(t, r.read(base + "weight_scale"))
    if dt is Dtype.U8 and base + "weight_scale_2" in names:
        return nvfp4.dequantize(t, r.read(base + "weight_scale"), r.read(base + "weight_scale_2"))
    if dt is Dtype.U8 and base + "weight_scale" in names:  # ModelOpt INT4 AWQ: int4 along the output dim
        w = int4.dequantize(int4.unpack(t, along="out"), r.read(base + "weight_scale"))
        if base + "pre_quant_scale" in names:
            w = w * r.read(base + "pre_quant_scale").to(torch.float32)[None, :]
        return w
    return t.to(torch.float32)


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

