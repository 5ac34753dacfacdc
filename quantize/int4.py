"""Symmetric INT4 with one scale per group of 128 inputs, and the two ways checkpoints pack it.

``q = clamp(round(w / s), -8, 7)`` with ``s = amax(group) / 7`` per ``[row, 128 inputs]`` group (TensorRT-LLM's
``quantize_mixed_precision_moe.py`` and ModelOpt's ``INT4_AWQ`` both use amax/7 with the -8 end unused by the
rounding of in-range values).

Packing, two int4 per byte, low nibble first:
- ``along="in"``  (TensorRT-LLM W4A8 / ``W4A8_CUSTOM``): ``[out, in] -> int8 [out, in/2]``; byte ``j`` holds inputs
  ``2j`` (low) and ``2j+1`` (high). Source: ``torch.ops.trtllm.pack_int8_tensor_to_packed_int4`` /
  ``unpack_int4_packed_tensor_to_int8`` in ``cpp/tensorrt_llm/thop/weightOnlyQuantOp.cpp`` (elt_0 = low nibble).
- ``along="out"`` (ModelOpt ``export_hf_checkpoint``, ``pack_int4_in_uint8``): ``[out, in] -> uint8 [out/2, in]``;
  byte ``[i, j]`` holds rows ``2i`` (low) and ``2i+1`` (high) of column ``j``. TensorRT-LLM's VANILLA W4A8 loader
  transposes, unpacks and re-packs exactly this (``fused_moe/quantization.py``, "two int4 elts in output dim").
"""

from __future__ import annotations

import torch

GROUP = 128
QMIN, QMAX = -8, 7


def group_scales(w: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    rows, cols = w.shape
    if cols % group:
        raise ValueError(f"INT4 groups of {group} need the input dimension to be a multiple of {group}, got {cols}")
    return w.to(torch.float32).abs().view(rows, cols // group, group).amax(dim=2) / QMAX


def quantize(w: torch.Tensor, *, group: int = GROUP, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(int8 values in [-8, 7] of w's shape, float32 scales [out, in/group])``."""
    s = group_scales(w, group) if scale is None else scale.to(torch.float32)
    rows, cols = w.shape
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(w.to(torch.float32).view(rows, cols // group, group) / safe[:, :, None]).clamp(QMIN, QMAX)
    return q.to(torch.int8).view(rows, cols), s


def dequantize(q: torch.Tensor, scale: torch.Tensor, *, group: int = GROUP, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = q.shape
    if tuple(scale.shape) != (rows, cols // group):
        raise ValueError(f"INT4 scale shape {tuple(scale.shape)} does not fit a {rows}x{cols} weight in groups of {group}")
    out = q.to(torch.float32).view(rows, cols // group, group) * scale.to(torch.float32)[:, :, None]
    return out.view(rows, cols).to(dtype)


def pack(q: torch.Tensor, *, along: str) -> torch.Tensor:
    if along == "in":
        lo, hi = q[:, 0::2], q[:, 1::2]
        return ((lo & 0x0F) | (hi << 4)).to(torch.int8)
    if along == "out":
        lo, hi = q[0::2, :].to(torch.int16), q[1::2, :].to(torch.int16)
        return ((lo & 0x0F) | ((hi & 0x0F) << 4)).to(torch.uint8)
    raise ValueError(f"pack along 'in' or 'out', not {along!r}")


def unpack(packed: torch.Tensor, *, along: str) -> torch.Tensor:
    """int8 values in [-8, 7] (nibbles sign-extended)."""
    b = packed.view(torch.uint8).to(torch.int16)
    lo = ((b & 0x0F) ^ 0x08) - 0x08
    hi = (((b >> 4) & 0x0F) ^ 0x08) - 0x08
    if along == "in":
        return torch.stack([lo, hi], dim=2).view(packed.shape[0], packed.shape[1] * 2).to(torch.int8)
    if along == "out":
        return torch.stack([lo, hi], dim=1).view(packed.shape[0] * 2, packed.shape[1]).to(torch.int8)
    raise ValueError(f"unpack along 'in' or 'out', not {along!r}")
