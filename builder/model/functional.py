"""DeepSeek-V3.2's math that the reference engine (``builder.engine``) and the trainable tiny model
(``builder.train.model``) share, one definition each, matching transformers 5.14.1 ``DeepseekV32ForCausalLM`` bit
for bit in fp32: RMSNorm, the rotary embeddings and the ``noaux_tc`` router.

RoPE: one frequency table over ``qk_rope_head_dim`` (default RoPE, or YaRN from ``rope_scaling``/
``rope_parameters``) serves both MLA, which rotates **interleaved** pairs of the last 64 dims, and the DSA indexer,
which rotates the **first** 64 dims **half-split** (docs/upstream-facts.md, transformers as the oracle). YaRN also
scales cos/sin by its attention factor and the softmax scale by ``mscale(factor, mscale_all_dim)**2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from builder.model.config import ModelConfig


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    raw = cfg.raw
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    return params


@dataclass
class RopeTable:
    inv_freq: torch.Tensor  # [rope_dim / 2] float32
    attention_factor: float
    softmax_scale: float  # MLA's, YaRN-corrected

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "RopeTable":
        p = rope_parameters(cfg)
        dim, base = cfg.qk_rope_head_dim, float(p["rope_theta"])
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim)
        scale = cfg.qk_head_dim ** -0.5
        if p["rope_type"] in ("default", None):
            return cls(1.0 / pos_freqs, 1.0, scale)
        if p["rope_type"] != "yarn":
            raise NotImplementedError(f"rope type {p['rope_type']!r} is not supported by the reference engine")
        # transformers' _compute_yarn_parameters (modeling_rope_utils.py, 5.14.1), re-derived.
        factor = p.get("factor")
        original = p.get("original_max_position_embeddings", cfg.max_position_embeddings)
        if factor is None:
            factor = cfg.max_position_embeddings / original
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        attention_factor = p.get("attention_factor")
        if attention_factor is None:
            attention_factor = (_mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
                                if mscale and mscale_all_dim else _mscale(factor))
        beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        if mscale_all_dim:
            scale = scale * _mscale(factor, mscale_all_dim) ** 2
        return cls(inv_freq, float(attention_factor), scale)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair angles for ``positions`` [B, S]: cos, sin of shape [B, S, rope_dim / 2]."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        return (freqs.cos() * self.attention_factor).to(dtype), (freqs.sin() * self.attention_factor).to(dtype)


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """MLA: pairs (x0, x1), (x2, x3)...; output laid out as [all even results, all odd results] like transformers
    (q and k get the same layout, so their dot products are those of the interleaved rotation)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rotate_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Indexer: non-interleaved RoPE on the whole of ``x`` (the caller passes the first rope_dim dims): the first
    half of the dims pairs with the second half, each pair turned by its angle (``cos``/``sin`` per pair)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def noaux_tc_route(cfg: ModelConfig, scores: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's ``noaux_tc`` selection from sigmoid ``scores`` [tokens, experts] (float32): choose by scores +
    ``bias`` within the best ``topk_group`` groups (group score = sum of its top-2 biased scores); weight by the
    unbiased scores, normalised, times ``routed_scaling_factor``. Returns (expert ids, weights), each [tokens, k].
    The bias steers the choice only: it is added to detached scores, so training's gradients reach the chosen
    experts' weights and never the bias (which the trainer updates from load counts)."""
    n, g = cfg.n_routed_experts, cfg.n_group
    choice = scores.detach() + bias
    group_scores = choice.view(-1, g, n // g).topk(2, dim=-1).values.sum(dim=-1)
    groups = group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices
    keep = torch.zeros_like(group_scores).scatter(1, groups, 1.0).bool()
    choice = choice.masked_fill(~keep[:, :, None].expand(-1, g, n // g).reshape(-1, n), float("-inf"))
    idx = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices
    weights = scores.gather(1, idx)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, weights * cfg.routed_scaling_factor
