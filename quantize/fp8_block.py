"""DeepSeek's 128x128 block-scaled FP8 (e4m3), vectorised.

``W[i, j] = float(Wq[i, j]) * S[i // 128, j // 128]`` with ``S = weight_scale_inv`` (float32, shape
``[ceil(rows/128), ceil(cols/128)]``); edge blocks may be partial (e.g. the 576-row ``kv_a_proj_with_mqa``).
Quantizing: per-block amax, ``s = amax / 448`` (``ue8m0``: rounded up to a power of two), ``Wq = clamp(W / s)``.
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0
BLOCK = 128


def _expand(scale: torch.Tensor, rows: int, cols: int, block: int) -> torch.Tensor:
    return scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, *, block: int = BLOCK,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    rows, cols = weight.shape
    want = (math.ceil(rows / block), math.ceil(cols / block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale grid {tuple(scale_inv.shape)} does not fit a {rows}x{cols} weight (want {want})")
    scale = scale_inv.to(torch.float32)
    # Power-of-two (ue8m0) scales times e4m3 values are exact in BF16, so a BF16 result can be computed in BF16
    # (about 1.6x faster on CPU than through float32, bit-identical); other scales go through float32.
    if dtype == torch.bfloat16 and bool((torch.frexp(scale).mantissa == 0.5).all()):
        w, scale = weight.to(torch.bfloat16), scale.to(torch.bfloat16)
    else:
        w = weight.to(torch.float32)
    # Multiply block-wise through a padded view instead of materialising the expanded scale: one pass, no loops.
    pr, pc = want[0] * block, want[1] * block
    if (pr, pc) == (rows, cols):
        out = (w.view(want[0], block, want[1], block) * scale[:, None, :, None]).view(rows, cols)
    else:
        out = w * _expand(scale, rows, cols, block)
    return out.to(dtype)


def block_amax(w: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    rows, cols = w.shape
    br, bc = math.ceil(rows / block), math.ceil(cols / block)
    padded = torch.zeros(br * block, bc * block, dtype=torch.float32)
    padded[:rows, :cols] = w.abs().to(torch.float32)
    return padded.view(br, block, bc, block).amax(dim=(1, 3))


def quantize(w: torch.Tensor, *, block: int = BLOCK, ue8m0: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(fp8 weight, float32 scale_inv)``."""
    if w.dim() != 2:
        raise ValueError(f"block FP8 needs a 2-D weight, got shape {tuple(w.shape)}")
    amax = block_amax(w, block).clamp(min=1e-12)
    scale = amax / FP8_MAX
    if ue8m0:
        scale = torch.pow(2.0, torch.ceil(torch.log2(scale)))
    rows, cols = w.shape
    q = (w.to(torch.float32) / _expand(scale, rows, cols, block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.to(torch.float32)
