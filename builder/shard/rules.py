"""The one table of sharding rules, and the per-rank plan derived from it.

For each tensor kind: which parallel group splits it and along which dimension (or replicated), who owns it under
expert parallelism, and on which pipeline stage it lives. Scale tensors follow their weight in proportion (a 128x128
block-scale grid splits with the weight, an INT4 group-scale grid likewise); a split that would cut a block or a
packed byte is refused with the reason. The planner sums these pieces (predicted bytes per GPU) and the build
writes exactly these pieces (bytes on disk), so the two agree by construction.

The rules follow TensorRT-LLM's PyTorch-backend loader for DeepSeek (``modeling_deepseekv3.py``, 1.2.x):
``q_a_proj``/``kv_a_proj_with_mqa`` and the DSA indexer replicated; ``q_b_proj``/``kv_b_proj`` split by heads and
``o_proj`` by its input (all three replicated under attention-DP); dense and shared-expert MLPs split over
``gcd(intermediate / 128, tp)`` ranks (1 under attention-DP) and replicated over the rest; routed experts assigned
to EP ranks in contiguous blocks and split by ``moe_tp = tp / ep`` inside; embedding and LM head vocab-parallel;
norms and the router replicated; the MTP module on the last pipeline stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from builder.errors import LayoutError
from builder.layout import Layout
from builder.model.catalog import Dtype, Kind, TensorSpec
from builder.model.config import FP8_BLOCK, ModelConfig


class Split(str, Enum):
    REPLICATED = "replicated"
    HEADS = "heads"  # attention TP (by heads); replicated under attention-DP
    VOCAB = "vocab"  # vocab-parallel over TP; replicated under attention-DP
    MLP = "mlp"  # dense / shared MLP over gcd(intermediate/128, tp) ranks
    MOE = "moe"  # routed expert: owned by one EP rank, split over moe_tp inside it


class PPStage(str, Enum):
    """Which pipeline-parallel stage holds a tensor."""

    LAYER = "layer"  # the stage that holds the tensor's layer (MTP layers: the last stage)
    FIRST = "first"
    LAST = "last"


@dataclass(frozen=True)
class Rule:
    split: Split
    dim: int | None  # dimension of the (logical) weight that splits
    stage: PPStage = PPStage.LAYER


RULES: dict[Kind, Rule] = {
    Kind.EMBED: Rule(Split.VOCAB, 0, PPStage.FIRST),
    Kind.LM_HEAD: Rule(Split.VOCAB, 0, PPStage.LAST),
    Kind.FINAL_NORM: Rule(Split.REPLICATED, None, PPStage.LAST),
    Kind.NORM: Rule(Split.REPLICATED, None),
    Kind.Q_A: Rule(Split.REPLICATED, None),
    Kind.KV_A: Rule(Split.REPLICATED, None),
    Kind.Q_B: Rule(Split.HEADS, 0),
    Kind.KV_B: Rule(Split.HEADS, 0),
    Kind.O_PROJ: Rule(Split.HEADS, 1),
    Kind.IDX_WQ_B: Rule(Split.REPLICATED, None),
    Kind.IDX_WK: Rule(Split.REPLICATED, None),
    Kind.IDX_K_NORM: Rule(Split.REPLICATED, None),
    Kind.IDX_WEIGHTS: Rule(Split.REPLICATED, None),
    Kind.DENSE_GATE: Rule(Split.MLP, 0),
    Kind.DENSE_UP: Rule(Split.MLP, 0),
    Kind.DENSE_DOWN: Rule(Split.MLP, 1),
    Kind.SHARED_GATE: Rule(Split.MLP, 0),
    Kind.SHARED_UP: Rule(Split.MLP, 0),
    Kind.SHARED_DOWN: Rule(Split.MLP, 1),
    Kind.ROUTER: Rule(Split.REPLICATED, None),
    Kind.ROUTER_BIAS: Rule(Split.REPLICATED, None),
    Kind.EXPERT_GATE: Rule(Split.MOE, 0),
    Kind.EXPERT_UP: Rule(Split.MOE, 0),
    Kind.EXPERT_DOWN: Rule(Split.MOE, 1),
    Kind.EXPERT_ACT_SCALE: Rule(Split.REPLICATED, None),
    Kind.MTP_EMBED: Rule(Split.VOCAB, 0),
    Kind.MTP_NORM: Rule(Split.REPLICATED, None),
    Kind.MTP_EH_PROJ: Rule(Split.REPLICATED, None),
    Kind.MTP_HEAD: Rule(Split.VOCAB, 0),
}


@dataclass(frozen=True)
class Piece:
    """The part of one checkpoint tensor a rank holds: rows/cols ``[start, stop)`` of ``dim``, or all of it."""

    name: str
    shape: tuple[int, ...]  # stored shape of the piece
    nbytes: int
    dim: int | None = None
    start: int = 0
    stop: int = 0

    @property
    def whole(self) -> bool:
        return self.dim is None


@dataclass
class RankPlan:
    rank: int
    tp_rank: int
    pp_rank: int
    layers: list[int]
    experts: list[int]
    pieces: list[Piece] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


def mlp_tp(intermediate: int, layout: Layout) -> int:
    """TensorRT-LLM splits a dense/shared MLP over gcd(intermediate/128, tp) ranks so every piece is whole blocks."""
    if layout.attention_dp:
        return 1
    return math.gcd(max(intermediate // FP8_BLOCK, 1), layout.tp)


def check_layout(cfg: ModelConfig, layout: Layout) -> None:
    """Divisibility rules of a layout for this model; raises LayoutError naming the first that fails."""
    for name, v in (("TP", layout.tp), ("PP", layout.pp), ("EP", layout.ep)):
        if v < 1:
            raise LayoutError(f"{name} must be at least 1, got {v}")
    if layout.pp > cfg.num_hidden_layers:
        raise LayoutError(f"PP {layout.pp} is larger than the model's {cfg.num_hidden_layers} layers")
    if not layout.attention_dp and cfg.num_attention_heads % layout.tp:
        raise LayoutError(f"TP {layout.tp} does not divide the {cfg.num_attention_heads} attention heads")
    if layout.tp % layout.ep:
        raise LayoutError(f"EP {layout.ep} must divide TP {layout.tp} (MoE uses EP x TP/EP ranks of each TP group)")
    if cfg.n_routed_experts % layout.ep:
        raise LayoutError(f"EP {layout.ep} does not divide the {cfg.n_routed_experts} routed experts")
    if cfg.moe_intermediate_size % layout.moe_tp:
        raise LayoutError(f"TP/EP = {layout.moe_tp} does not divide moe_intermediate_size {cfg.moe_intermediate_size}")
    if not layout.attention_dp and cfg.vocab_size % layout.tp:
        raise LayoutError(f"TP {layout.tp} does not divide the vocabulary of {cfg.vocab_size}")


def _split_count(rule: Rule, cfg: ModelConfig, layout: Layout, kind: Kind) -> int:
    if rule.split is Split.REPLICATED:
        return 1
    if rule.split in (Split.HEADS, Split.VOCAB):
        return 1 if layout.attention_dp else layout.tp
    if rule.split is Split.MLP:
        inter = cfg.intermediate_size if kind in (Kind.DENSE_GATE, Kind.DENSE_UP, Kind.DENSE_DOWN) \
            else cfg.moe_intermediate_size * cfg.n_shared_experts
        return mlp_tp(inter, layout)
    if rule.split is Split.MOE:
        return layout.moe_tp
    raise AssertionError(rule)


def _piece(spec: TensorSpec, weight: TensorSpec, weight_shape: tuple[int, ...], dim: int | None, index: int,
           parts: int) -> Piece:
    """Slice ``spec``: a weight, or a scale/packed tensor mapped onto its weight's logical (unpacked) shape.

    Block-FP8 weights and their ``weight_scale_inv`` may only split on 128 boundaries (the last block of a
    dimension may be partial, as in the 576-row ``kv_a_proj_with_mqa``); other stored forms (INT4 group scales,
    packed nibbles) split in proportion and must land on whole elements."""
    if spec.follows is not None and dim is not None:
        dim = spec.follows.index(dim) if dim in spec.follows else None
        weight_shape = tuple(weight_shape[d] for d in spec.follows)
    if dim is None or parts == 1 or len(spec.shape) == 0:
        return Piece(spec.name, spec.shape, spec.nbytes)
    logical = weight_shape[dim]
    if logical % parts:
        raise LayoutError(f"{spec.name}: dimension {dim} of size {logical} does not split {parts} ways")
    size = logical // parts
    w_start, w_stop = index * size, (index + 1) * size
    stored = spec.shape[dim]
    if weight.dtype is Dtype.F8_E4M3:
        if w_start % FP8_BLOCK or (w_stop % FP8_BLOCK and w_stop != logical):
            raise LayoutError(
                f"{weight.name}: a {parts}-way split leaves {size} along dimension {dim}, which cuts its 128x128 FP8 "
                f"blocks (each rank's scales would no longer describe its weights); use a smaller TP or a larger EP")
        if spec.scale_of is not None:
            start, stop = w_start // FP8_BLOCK, -(-w_stop // FP8_BLOCK)
        else:
            start, stop = w_start, w_stop
    else:
        start_num, stop_num = w_start * stored, w_stop * stored
        if start_num % logical or stop_num % logical:
            raise LayoutError(
                f"{spec.name}: a {parts}-way split of dimension {dim} ({logical}) does not fall on the boundaries of "
                f"its stored form ({stored}); it would cut a scale group or a packed byte")
        start, stop = start_num // logical, stop_num // logical
    shape = tuple(stop - start if d == dim else n for d, n in enumerate(spec.shape))
    return Piece(spec.name, shape, math.prod(shape) * spec.dtype.itemsize, dim, start, stop)


def plan_ranks(cfg: ModelConfig, layout: Layout, specs: list[TensorSpec], *,
               weight_shapes: dict[str, tuple[int, ...]] | None = None) -> list[RankPlan]:
    """What every rank holds. ``weight_shapes`` maps a stored weight to its logical (unpacked) shape where they
    differ (INT4 packing); scales map onto their weight through ``scale_of``."""
    check_layout(cfg, layout)
    by_name = {s.name: s for s in specs}
    logical = {s.name: tuple((weight_shapes or {}).get(s.name, s.shape)) for s in specs}
    stages = layout.stage_layers(cfg.num_hidden_layers)
    experts_per_ep = cfg.n_routed_experts // layout.ep
    plans = []
    for rank in range(layout.world_size):
        tp_rank, pp_rank = layout.coords(rank)
        ep_rank, moe_tp_rank = layout.moe_coords(tp_rank)
        layers = list(stages[pp_rank]) + (cfg.mtp_layers if pp_rank == layout.pp - 1 else [])
        experts = list(range(ep_rank * experts_per_ep, (ep_rank + 1) * experts_per_ep))
        plan = RankPlan(rank, tp_rank, pp_rank, layers, experts)
        layer_set, expert_set = set(layers), set(experts)  # membership per tensor: sets keep the search fast
        for spec in specs:
            rule = RULES[spec.kind]
            if not _on_stage(spec, rule, pp_rank, layout.pp, layer_set):
                continue
            if rule.split is Split.MOE and spec.expert not in expert_set:
                continue
            parts = _split_count(rule, cfg, layout, spec.kind)
            if rule.split is Split.MOE:
                index = moe_tp_rank
            elif rule.split is Split.MLP:
                index = tp_rank % parts
            else:
                index = tp_rank if parts > 1 else 0
            if rule.split is Split.REPLICATED:  # whole on every rank of its stage: nothing to map onto its weight
                plan.pieces.append(Piece(spec.name, spec.shape, spec.nbytes))
                continue
            weight = by_name[spec.scale_of] if spec.scale_of else spec
            plan.pieces.append(_piece(spec, weight, logical[weight.name], rule.dim, index, parts))
        plans.append(plan)
    return plans


def _on_stage(spec: TensorSpec, rule: Rule, pp_rank: int, pp: int, layers: set[int]) -> bool:
    if rule.stage is PPStage.FIRST:
        return pp_rank == 0
    if rule.stage is PPStage.LAST:
        return pp_rank == pp - 1
    return spec.layer in layers
