"""Per-tensor FP8 (e4m3): ModelOpt's ``FP8_DEFAULT_CFG`` weight format.

``W = float(Wq) * weight_scale`` with a float32 scalar ``weight_scale = amax(W) / 448``; activations get a static
``input_scale = amax(x) / 448`` from calibration (ModelOpt's ``export_hf_checkpoint``, checked against its output on
the tiny model in tests/integration/test_quantize_modes.py).
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = w.to(torch.float32).abs().amax().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (w.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if scale.numel() != 1:
        raise ValueError(f"a per-tensor FP8 scale has one element, got shape {tuple(scale.shape)}")
    return (q.to(torch.float32) * scale.to(torch.float32).reshape(())).to(dtype)
