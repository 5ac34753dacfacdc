"""NVFP4: e2m1 values in blocks of 16 inputs, an FP8 (e4m3) scale per block and one float32 scale per tensor.

``W = e2m1(q) * float(weight_scale[i, j // 16]) * weight_scale_2`` with ``weight_scale_2 = amax(W) / (6 * 448)``
and ``weight_scale = amax(block) / 6 / weight_scale_2`` rounded to e4m3. Two e2m1 codes per byte along the input
dimension, low nibble first: ``uint8 [out, in/2]``. This is the layout ModelOpt 0.47's ``export_hf_checkpoint``
writes for ``NVFP4_DEFAULT_CFG`` (checked against its output in
tests/integration/test_quantize_modes.py) and TensorRT-LLM loads on Blackwell.
"""

from __future__ import annotations

import torch

BLOCK = 16
E2M1_MAX = 6.0
FP8_MAX = 448.0
# e2m1 code (low 3 bits) -> magnitude; bit 3 is the sign.
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def global_scale(w: torch.Tensor) -> torch.Tensor:
    return (w.to(torch.float32).abs().amax() / (E2M1_MAX * FP8_MAX)).clamp(min=1e-12)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(uint8 packed [out, in/2], e4m3 block scales [out, in/16], float32 global scale)``."""
    rows, cols = w.shape
    if cols % BLOCK:
        raise ValueError(f"NVFP4 needs the input dimension to be a multiple of {BLOCK}, got {cols}")
    wf = w.to(torch.float32).view(rows, cols // BLOCK, BLOCK)
    gs = global_scale(w)
    block = (wf.abs().amax(dim=2) / E2M1_MAX / gs).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    step = block.to(torch.float32) * gs
    x = wf / torch.where(step > 0, step, torch.ones_like(step))[:, :, None]
    # Round to the nearest e2m1 magnitude (ties to the lower code, as a nearest search does).
    idx = (x.abs().unsqueeze(-1) - E2M1_VALUES).abs().argmin(dim=-1)
    codes = (idx | ((x < 0).to(torch.int64) << 3)).view(rows, cols).to(torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed, block, gs


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    rows, half = packed.shape
    return torch.stack([packed & 0x0F, packed >> 4], dim=2).view(rows, half * 2)


def dequantize(packed: torch.Tensor, block_scale: torch.Tensor, scale_2: torch.Tensor, *,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    codes = unpack_codes(packed.view(torch.uint8)).to(torch.int64)
    rows, cols = codes.shape
    if tuple(block_scale.shape) != (rows, cols // BLOCK):
        raise ValueError(f"NVFP4 block scales {tuple(block_scale.shape)} do not fit a {rows}x{cols} weight")
    mag = E2M1_VALUES[codes & 0x7]
    vals = torch.where((codes & 0x8) > 0, -mag, mag)
    step = block_scale.to(torch.float32) * scale_2.to(torch.float32).reshape(())
    return (vals.view(rows, cols // BLOCK, BLOCK) * step[:, :, None]).view(rows, cols).to(dtype)
