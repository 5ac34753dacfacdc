"""Build-time kernel fusion of a rank's tensors, and its inverse for loading.

Every fused tensor is a concatenation (or a stack) of the rank's planned pieces, scale grids included, so a rank
file holds exactly the bytes ``builder.shard.rules.plan_ranks`` predicts; only names and shapes change:

- ``fuse_qkv_a``: ``self_attn.fused_a`` = rows of ``q_a_proj`` ‖ ``kv_a_proj_with_mqa`` ‖ ``indexer.wk`` (V3.2),
  one GEMM on the hidden state (TensorRT-LLM's ``fused_a``, which for V3.2 also appends the indexer's ``wk`` rows).
- ``fuse_gate_up``: ``gate_up_proj`` = rows of ``gate_proj`` ‖ ``up_proj`` (dense MLP, shared and routed experts).
- ``stack_experts``: the rank's routed experts stacked into 3-D ``mlp.experts.{gate_up,gate,up,down}_proj``
  tensors (leading dim = the rank's experts in ascending order) for one batched GEMM.

A block-FP8 scale grid is concatenated part by part: the 576-row ``kv_a_proj_with_mqa`` ends in a partial block,
so the fused grid is not the grid of the fused weight; ``fused_parts`` says where each part's rows and scale rows
begin, and ``unfuse_dequantize`` dequantizes part by part.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

from builder.model.config import FP8_BLOCK, ModelConfig

SCALE = "weight_scale_inv"


@dataclass(frozen=True)
class FusionOptions:
    fuse_gate_up: bool = True
    fuse_qkv_a: bool = True
    stack_experts: bool = True
    absorb_mla: bool = True  # a runtime choice (decode attends in the latent space); recorded with the bundle

    def to_dict(self) -> dict[str, bool]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "FusionOptions":
        data = data or {}
        return cls(**{k: bool(data[k]) for k in cls.__dataclass_fields__ if k in data})

    @classmethod
    def none(cls) -> "FusionOptions":
        return cls(False, False, False, False)


def fused_a_parts(cfg: ModelConfig) -> list[tuple[str, int]]:
    """(source suffix, rows) of ``fused_a`` in order."""
    parts = [("q_a_proj", cfg.q_lora_rank), ("kv_a_proj_with_mqa", cfg.kv_lora_rank + cfg.qk_rope_head_dim)]
    if cfg.has_indexer:
        parts.append(("indexer.wk", cfg.index_head_dim))
    return parts


def _cat(tensors: dict[str, torch.Tensor], names: list[str], out: str, *, stack: bool = False) -> None:
    """Replace ``names`` (weights, and their scales when present) by one concatenated/stacked tensor ``out``."""
    op = torch.stack if stack else torch.cat
    tensors[out + ".weight"] = op([tensors.pop(n + ".weight") for n in names])
    if all(n + "." + SCALE in tensors for n in names):
        tensors[out + "." + SCALE] = op([tensors.pop(n + "." + SCALE) for n in names])


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def fuse_rank_tensors(tensors: dict[str, torch.Tensor], *, cfg: ModelConfig, experts: list[int],
                      options: FusionOptions) -> dict[str, torch.Tensor]:
    """Apply the enabled fusions to one rank's pieces (name -> tensor, checkpoint names)."""
    out = dict(tensors)
    layers = sorted({int(m.group(1)) for n in out if (m := _LAYER.match(n))})
    for i in layers:
        p = f"model.layers.{i}."
        a = p + "self_attn."
        if options.fuse_qkv_a and a + "q_a_proj.weight" in out:
            _cat(out, [a + s for s, _ in fused_a_parts(cfg)], a + "fused_a")
        m = p + "mlp."
        for mlp in (m, m + "shared_experts."):
            if options.fuse_gate_up and mlp + "gate_proj.weight" in out:
                _cat(out, [mlp + "gate_proj", mlp + "up_proj"], mlp + "gate_up_proj")
        local = [e for e in experts if f"{m}experts.{e}.down_proj.weight" in out]
        if not local:
            continue
        if options.fuse_gate_up:
            for e in local:
                _cat(out, [f"{m}experts.{e}.gate_proj", f"{m}experts.{e}.up_proj"], f"{m}experts.{e}.gate_up_proj")
        if options.stack_experts:
            projs = ("gate_up_proj", "down_proj") if options.fuse_gate_up else ("gate_proj", "up_proj", "down_proj")
            for proj in projs:
                _cat(out, [f"{m}experts.{e}.{proj}" for e in local], f"{m}experts.{proj}", stack=True)
    return out


def fused_parts(name: str, cfg: ModelConfig, rows: int) -> list[int] | None:
    """Row counts of the parts of a fused 2-D weight named ``name`` (None: not fused). ``rows`` is its row count."""
    if name.endswith("self_attn.fused_a.weight"):
        return [r for _, r in fused_a_parts(cfg)]
    if name.endswith("gate_up_proj.weight"):
        return [rows // 2, rows // 2]
    return None


def unfuse_dequantize(name: str, weight: torch.Tensor, scale: torch.Tensor | None, cfg: ModelConfig, *,
                      dtype: torch.dtype) -> torch.Tensor:
    """A (possibly fused, possibly stacked) weight in ``dtype``: block-FP8 dequantized part by part."""
    from quantize import fp8_block

    if scale is None:
        return weight.to(dtype)
    if weight.dim() == 3:
        return torch.stack([unfuse_dequantize(name, w, s, cfg, dtype=dtype) for w, s in zip(weight, scale)])
    parts = fused_parts(name, cfg, weight.shape[0]) or [weight.shape[0]]
    out, row, srow = [], 0, 0
    for rows in parts:
        srows = math.ceil(rows / FP8_BLOCK)
        out.append(fp8_block.dequantize(weight[row:row + rows], scale[srow:srow + srows], dtype=dtype))
        row, srow = row + rows, srow + srows
    if row != weight.shape[0] or srow != scale.shape[0]:
        raise ValueError(f"{name}: parts {parts} do not cover its {weight.shape[0]} rows / {scale.shape[0]} scale rows")
    return torch.cat(out) if len(out) > 1 else out[0]
