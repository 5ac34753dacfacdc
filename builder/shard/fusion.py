"""Build-time kernel fusion of a rank's tensors, and its inverse for loading.

Every fused tensor is a concatenation (or a stack) of the rank's planned pieces, scale grids included, so a rank
file holds exactly the bytes ``builder.shard.rules.plan_ranks`` predicts; only names and shapes change:

- ``fuse_qkv_a``: ``self_attn.fused_a`` = rows of ``q_a_proj`` ‖ ``kv_a_proj_with_mqa`` ‖ ``indexer.wk`` (V3.2),
  one GEMM on the hidden state (TensorRT-LLM's ``fused_a``, which for V3.2 also appends the indexer's ``wk`` rows).
- ``fuse_gate_up``: ``gate_up_proj`` = rows of ``gate_proj`` ‖ ``up_proj`` (dense MLP, shared and routed experts).
- ``stack_experts``: the rank's routed experts stacked into 3-D ``mlp.experts.{gate_up,gate,up,down}_proj``
  tensors (leading dim = the rank's experts in ascending order) for one batched GEMM.

Every format's companions fuse with their weight: row-aligned scale grids (block FP8, W4A8 and AWQ group scales,
NVFP4 block scales) are concatenated, per-projection values (per-tensor FP8 and NVFP4 global scales, input scales,
AWQ's per-input ``pre_quant_scale``) are stacked one per part, since a fused GEMM of such formats keeps each part's
own scale. A block-FP8 scale grid is concatenated part by part: the 576-row ``kv_a_proj_with_mqa`` ends in a partial
block, so the fused grid is not the grid of the fused weight; ``fused_parts`` says where each part's rows begin, and
``unfuse_dequantize`` dequantizes part by part.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from builder.model.config import FP8_BLOCK, ModelConfig
from quantize.dequant import COMPANIONS, dequantize

SCALE = "weight_scale_inv"
_PER_PART = ("weight_scale_2", "pre_quant_scale", "input_scale")


def _per_part(suffix: str, t: torch.Tensor, *, fused: bool) -> bool:
    """Whether a companion (of one projection, or of a fused tensor) holds one entry per projection, stacked on
    fusion, rather than a grid over the weight's rows, concatenated: the named per-projection kinds, and per-tensor
    scalars (a 0-d ``weight_scale``, 1-d once stacked). Row grids are always 2-d."""
    return suffix in _PER_PART or t.dim() == (1 if fused else 0)


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


# Which fusions are on by default, per device the bundle is built for, chosen by measurement (the file says how).
DEVICE_DEFAULTS = Path(__file__).resolve().parent.parent / "data" / "fusion" / "defaults.yaml"


@functools.cache
def device_defaults(device: str) -> FusionOptions:
    """The fusions a bundle built for ``device`` ("cpu" or "cuda") gets unless a flag says otherwise."""
    table = yaml.safe_load(DEVICE_DEFAULTS.read_text(encoding="utf-8"))
    if set(table[device]) != set(FusionOptions.__dataclass_fields__):
        raise ValueError(f"{DEVICE_DEFAULTS} must set exactly {sorted(FusionOptions.__dataclass_fields__)} "
                         f"for {device}")
    return FusionOptions(**{name: bool(on) for name, on in table[device].items()})


def fused_a_parts(cfg: ModelConfig) -> list[tuple[str, int]]:
    """(source suffix, rows) of ``fused_a`` in order."""
    parts = [("q_a_proj", cfg.q_lora_rank), ("kv_a_proj_with_mqa", cfg.kv_lora_rank + cfg.qk_rope_head_dim)]
    if cfg.has_indexer:
        parts.append(("indexer.wk", cfg.index_head_dim))
    return parts


def _cat(tensors: dict[str, torch.Tensor], names: list[str], out: str, *, stack: bool = False) -> None:
    """Replace ``names`` (weights and their companions) by one concatenated (``stack``: stacked) tensor each."""
    tensors[out + ".weight"] = (torch.stack if stack else torch.cat)([tensors.pop(n + ".weight") for n in names])
    for suffix in COMPANIONS:
        have = [n for n in names if f"{n}.{suffix}" in tensors]
        if not have:
            continue
        if len(have) != len(names):
            raise ValueError(f"cannot fuse {names} into {out}: only {have} have a {suffix}")
        parts = [tensors.pop(f"{n}.{suffix}") for n in names]
        per_part = _per_part(suffix, parts[0], fused=False)
        if not stack and not per_part and parts[0].dim() != 2:
            raise ValueError(f"cannot fuse {names} into {out}: their {suffix} is neither per-tensor nor a row grid")
        tensors[f"{out}.{suffix}"] = torch.stack(parts) if stack or per_part else torch.cat(parts)


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


def unfuse_dequantize(name: str, weight: torch.Tensor, companions: dict[str, torch.Tensor], cfg: ModelConfig, *,
                      dtype: torch.dtype) -> torch.Tensor:
    """A (possibly fused, possibly stacked) stored weight in ``dtype``, dequantized part by part from its
    companions (suffix -> tensor; an unquantized weight has none)."""
    if weight.dim() == 3:
        return torch.stack([unfuse_dequantize(name, w, {k: v[e] for k, v in companions.items()}, cfg, dtype=dtype)
                            for e, w in enumerate(weight)])
    parts = fused_parts(name, cfg, weight.shape[0])
    if parts is None:
        return dequantize(weight, companions, dtype=dtype)
    total, out = sum(parts), []
    row = {k: 0 for k in companions}
    w_row = 0
    for i, logical in enumerate(parts):
        w_rows = _rows_of(name, weight.shape[0], logical, total)
        mine = {}
        for k, v in companions.items():
            if _per_part(k, v, fused=True):
                mine[k] = v[i]
                continue
            n = -(-logical // FP8_BLOCK) if (k == SCALE and weight.dtype == torch.float8_e4m3fn) \
                else _rows_of(name, v.shape[0], logical, total)
            mine[k] = v[row[k]:row[k] + n]
            row[k] += n
        out.append(dequantize(weight[w_row:w_row + w_rows], mine, dtype=dtype))
        w_row += w_rows
    uncovered = [k for k, v in companions.items() if not _per_part(k, v, fused=True) and row[k] != v.shape[0]]
    if w_row != weight.shape[0] or uncovered:
        raise ValueError(f"{name}: parts {parts} do not cover its {weight.shape[0]} rows and its scales' rows")
    return torch.cat(out)


def _rows_of(name: str, stored: int, logical: int, total: int) -> int:
    """Stored rows of a part with ``logical`` of the fused tensor's ``total`` rows (packed formats store fewer)."""
    if (stored * logical) % total:
        raise ValueError(f"{name}: a part of {logical} of {total} rows does not fall on a stored row of {stored}")
    return stored * logical // total
