"""DeepSeek's 128x128 block-scaled FP8 (e4m3), vectorised.

``W[i, j] = float(Wq[i, j]) * S[i // 128, j // 128]`` with ``S = weight_scale_inv`` (float32, shape
``[ceil(rows/128), ceil(cols/128)]``); edge blocks may be partial (e.g. the 576-row ``kv_a_proj_with_mqa``).
Quantizing: per-block amax, ``s = amax / 448`` (``ue8m0``: rounded up to a power of two), ``Wq = clamp(W / s)``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

FP8_MAX = 448.0
BLOCK = 128


def _expand(scale: torch.Tensor, rows: int, cols: int, block: int) -> torch.Tensor:
    return scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]


@functools.cache
def _code_values() -> torch.Tensor:
    """The 256 e4m3fn codes as float32 (NaN codes included), exactly as torch converts them."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, *, block: int = BLOCK,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``float(weight) * scale_inv[i // block, j // block]`` rounded to ``dtype``, bit for bit (CPU tensors).

    A block holds at most 256 distinct codes under one scale, so each block's 256 possible results are computed once
    (the same float32 multiply and rounding an elementwise pass would do) and every element is a table lookup: on
    CPU a numpy ``take`` of 16-bit indices (code | column block << 8) per 128-row band, which releases the GIL and
    runs 4-5x faster than converting FP8 to float32 and multiplying. (NaN codes give NaN; torch's own rounding of
    a float32 NaN yields 0xFFFF or 0x7FC0 depending on the vector lane, so the NaN bit pattern is not a contract.)
    """
    rows, cols = weight.shape
    want = (math.ceil(rows / block), math.ceil(cols / block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale grid {tuple(scale_inv.shape)} does not fit a {rows}x{cols} weight (want {want})")
    tables = (scale_inv.to(torch.float32)[:, :, None] * _code_values()).to(dtype)
    bits = _BITS[tables.element_size()]
    tables = tables.view(bits).reshape(want[0], want[1] * 256)
    index_dtype = np.uint16 if want[1] * 256 <= 1 << 16 else np.int32
    column_block = (np.arange(cols) // block * 256).astype(index_dtype)
    out = torch.empty((rows, cols), dtype=bits)
    src, dst, tab = weight.view(torch.uint8).numpy(), out.numpy(), tables.numpy()
    for rb in range(want[0]):
        band = slice(rb * block, min(rows, (rb + 1) * block))
        index = src[band].astype(index_dtype)
        index |= column_block
        np.take(tab[rb], index, out=dst[band], mode="clip")  # mode="clip": unbuffered (indices are in range)
    return out.view(dtype)


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
