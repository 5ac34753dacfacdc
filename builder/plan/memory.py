"""Memory per GPU: weights (from the sharding rules), KV cache, activations/workspace, runtime reserve.

Weights per rank come from ``builder.shard.rules.plan_ranks`` over the stored tensors of the weight format
(``quantize.formats.quantized_catalog``), never from a parameter count. Running it over all ~92 000 tensors of
DeepSeek-V3.2 for every candidate layout would take seconds each, so :func:`stage_weights` runs it once per
(TP, EP, attention-DP) over a *representative* catalogue — the non-layer tensors, the first dense layer, the first
MoE layer and the MTP layers of the model reduced to those two layers (same tensor shapes), each MoE layer keeping
routed expert 0 only — and scales: every dense layer holds the same pieces as the dense one, every MoE layer as
the MoE one, and every expert the same pieces as expert 0 at the same MoE-TP rank. Tests check the result against ``plan_ranks`` over the full catalogue and
against the bytes the build stage writes to each ``rank{N}.safetensors``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

from builder.model.catalog import Kind, TensorSpec
from builder.model.config import ModelConfig
from builder.shard.rules import RULES, Stage, check_layout, plan_ranks
from builder.layout import Layout

GIB = 1 << 30
EXPERT_KINDS = frozenset({Kind.EXPERT_GATE, Kind.EXPERT_UP, Kind.EXPERT_DOWN})
# TensorRT-LLM defaults (llm_args.py, 1.2): prefill chunk / scheduler token budget, KV page size, and the share of
# memory left after weights and activations that the KV pool takes.
MAX_NUM_TOKENS = 8192
TOKENS_PER_BLOCK = 32
FREE_GPU_MEMORY_FRACTION = 0.9
KV_DTYPE_BYTES = {"fp8": 1, "bf16": 2, "auto": 2}  # 'auto' keeps the model's activation dtype (bf16)


@dataclass(frozen=True)
class RankWeights:
    """Bytes one rank holds, split by what decode reads of them."""

    total: int
    routed_experts: int  # read only for the experts a step's tokens select
    embedding: int  # read only for the rows of the step's tokens

    @property
    def dense(self) -> int:
        """Read in full every step (attention, dense MLPs, shared experts, norms, router, LM head)."""
        return self.total - self.routed_experts - self.embedding


@dataclass(frozen=True)
class _LayerClassBytes:
    total: int
    experts: int


@dataclass(frozen=True, eq=False)  # hashed by identity: the per-layout cache below keys on it
class WeightCatalog:
    """The stored tensors of one weight format, reduced for fast planning (see module docstring)."""

    cfg: ModelConfig  # the real model
    specs: tuple[TensorSpec, ...]  # catalogue of the reduced model: <= 1 dense layer, <= 1 MoE layer, MTP
    logical_shapes: dict[str, tuple[int, ...]]
    dense_layer: int | None  # index of the dense layer in the reduced catalogue (None: no dense layers)
    moe_layer: int | None
    mtp_layers: frozenset[int]

    @property
    def total_bytes(self) -> int:
        """The whole checkpoint in this format (every layer, every expert)."""
        cfg = self.cfg
        n_dense = cfg.first_k_dense_replace
        n_moe = cfg.num_hidden_layers - n_dense
        total = 0
        for s in self.specs:
            if s.layer == self.dense_layer and s.layer is not None:
                total += s.nbytes * n_dense
            elif s.layer == self.moe_layer and s.layer is not None:
                total += s.nbytes * n_moe
            else:
                total += s.nbytes
        return total


@functools.lru_cache(maxsize=64)
def weight_catalog(cfg: ModelConfig, quant: str, *, include_mtp: bool = True) -> WeightCatalog:
    """The format's catalogue (``quantized_catalog``) of a model reduced to one dense and one MoE layer: every
    decoder layer of a kind has the same tensors, so the real model's bytes are these scaled by layer counts."""
    from quantize.formats import quantized_catalog

    k = min(cfg.first_k_dense_replace, 1)
    has_moe = cfg.first_k_dense_replace < cfg.num_hidden_layers
    reduced = replace(cfg, num_hidden_layers=k + (1 if has_moe else 0), first_k_dense_replace=k)
    qc = quantized_catalog(reduced, quant, include_mtp=include_mtp)
    return WeightCatalog(cfg, tuple(qc.specs), dict(qc.logical_shapes), 0 if k else None, k if has_moe else None,
                         frozenset(reduced.mtp_layers) if include_mtp else frozenset())


def _where(cat: WeightCatalog, spec: TensorSpec) -> str:
    if spec.layer is None:
        return "first" if RULES[spec.kind].stage is Stage.FIRST else "last"
    if spec.layer in cat.mtp_layers:
        return "mtp"
    return "dense" if spec.layer == cat.dense_layer else "moe"


def _shared_pieces(cat: WeightCatalog, tp: int, attention_dp: bool, ep: int) -> list[dict[str, list[int]]]:
    """Per TP rank, bytes of everything but routed experts: [total, embedding] per place. The sharding rules
    split these by TP and attention-DP only, so the first result for a (TP, attention-DP) serves every EP."""
    key = (cat, tp, attention_dp)
    if key in _SHARED:
        return _SHARED[key]
    specs = [s for s in cat.specs if s.kind not in EXPERT_KINDS]
    by_name = {s.name: s for s in specs}
    out = []
    for plan in plan_ranks(cat.cfg, Layout(tp=tp, pp=1, ep=ep, attention_dp=attention_dp), specs,
                           weight_shapes=cat.logical_shapes):
        acc = {k: [0, 0] for k in PLACES}
        for piece in plan.pieces:
            spec = by_name[piece.name]
            slot = acc[_where(cat, spec)]
            slot[0] += piece.nbytes
            if spec.kind is Kind.EMBED or spec.kind is Kind.MTP_EMBED:
                slot[1] += piece.nbytes
        out.append(acc)
    if len(_SHARED) > 4096:
        _SHARED.clear()
    _SHARED[key] = out
    return out


@functools.lru_cache(maxsize=512)
def _expert_pieces(cat: WeightCatalog, tp: int, ep: int) -> list[dict[str, int]]:
    """Per TP rank, bytes of the routed experts it holds per place. Only expert 0 is planned: every expert has the
    same tensors, so a rank holds ``n_routed_experts / ep`` copies of the piece expert 0 has on the rank of EP
    rank 0 with the same MoE-TP rank. The rules split experts by EP and MoE-TP only (not by attention-DP)."""
    cfg = cat.cfg
    layout = Layout(tp=tp, pp=1, ep=ep)
    specs = [s for s in cat.specs if s.kind in EXPERT_KINDS and s.expert == 0]
    by_name = {s.name: s for s in specs}
    per_moe_tp: dict[int, dict[str, int]] = {}
    for plan in plan_ranks(cfg, layout, specs, weight_shapes=cat.logical_shapes):
        ep_rank, moe_tp_rank = layout.moe_coords(plan.tp_rank)
        if ep_rank == 0:
            acc = {k: 0 for k in PLACES}
            for piece in plan.pieces:
                acc[_where(cat, by_name[piece.name])] += piece.nbytes * (cfg.n_routed_experts // ep)
            per_moe_tp[moe_tp_rank] = acc
    return [per_moe_tp[layout.moe_coords(t)[1]] for t in range(tp)]


PLACES = ("first", "last", "dense", "moe", "mtp")
_SHARED: dict[tuple[WeightCatalog, int, bool], list[dict[str, list[int]]]] = {}


def stage_weights(cat: WeightCatalog, layout: Layout) -> list[list[RankWeights]]:
    """``[pp_rank][tp_rank]`` -> the weights that rank holds (raises LayoutError for an impossible layout).
    The MTP module counts when the catalogue has it (on the last stage, as the build places it)."""
    cfg = cat.cfg
    check_layout(cfg, layout)
    shared = _shared_pieces(cat, layout.tp, layout.attention_dp, layout.ep)
    experts = _expert_pieces(cat, layout.tp, layout.ep)
    stages = layout.stage_layers(cfg.num_hidden_layers)
    out = []
    for s, layers in enumerate(stages):
        n_dense = sum(1 for i in layers if not cfg.is_moe_layer(i))
        counts = {"dense": n_dense, "moe": len(layers) - n_dense, "first": int(s == 0),
                  "last": int(s == layout.pp - 1), "mtp": int(s == layout.pp - 1)}
        row = []
        for sh, ex in zip(shared, experts):
            total = sum((sh[k][0] + ex[k]) * n for k, n in counts.items())
            routed = sum(ex[k] * n for k, n in counts.items())
            embed = sum(sh[k][1] * n for k, n in counts.items())
            row.append(RankWeights(total, routed, embed))
        out.append(row)
    return out


def kv_bytes_per_token_per_layer(cfg: ModelConfig, kv_cache_dtype: str) -> int:
    """MLA latent + RoPE key (576 elements for DeepSeek) in the KV dtype, plus the DSA indexer's FP8 key and
    scale (132 B) for V3.2 (FACTS §1)."""
    return cfg.kv_cache_elems_per_token_per_layer * KV_DTYPE_BYTES[kv_cache_dtype] \
        + cfg.indexer_cache_bytes_per_token_per_layer


def tokens_in_cache(seq_len: int) -> int:
    """A sequence occupies whole KV pages."""
    return math.ceil(seq_len / TOKENS_PER_BLOCK) * TOKENS_PER_BLOCK


def activation_bytes(cfg: ModelConfig, layout: Layout, *, batch: int, context: int,
                     max_num_tokens: int = MAX_NUM_TOKENS) -> int:
    """Peak activation/workspace of one rank for a forward of ``max_num_tokens`` (a prefill chunk).

    Counted: the residual stream and three bf16 hidden-size temporaries, the rank's query heads and the
    up-projected keys/values MLA builds for prefill, the MoE permutation workspace (every token to top-k experts:
    FP8 input plus bf16 gate/up/down intermediates of the rank's slice), the DSA indexer's queries and fp32 score
    rows over the context, and fp32 logits of the rank's vocabulary slice for the decode batch. TensorRT-LLM sizes
    these by a warm-up forward of the same shape before it sizes the KV pool.
    """
    t = max_num_tokens
    h = cfg.hidden_size
    heads = cfg.num_attention_heads if layout.attention_dp else cfg.num_attention_heads // layout.tp
    hidden = 4 * t * h * 2
    attn = t * heads * (cfg.qk_head_dim + cfg.qk_nope_head_dim + cfg.v_head_dim) * 2
    moe_inter = cfg.moe_intermediate_size // max(layout.moe_tp, 1)
    moe = t * cfg.num_experts_per_tok * (h + 3 * moe_inter * 2) if cfg.n_routed_experts else 0
    index = t * cfg.index_n_heads * (cfg.index_head_dim * 2 + min(context, t) * 4 // max(cfg.index_n_heads, 1)) \
        if cfg.has_indexer else 0
    vocab = cfg.vocab_size if layout.attention_dp else cfg.vocab_size // layout.tp
    logits = max(batch, 1) * vocab * 4
    return hidden + attn + moe + index + logits


def clear_caches() -> None:
    """Forget every cached catalogue and per-layout plan (benchmarks measure cold searches)."""
    weight_catalog.cache_clear()
    _expert_pieces.cache_clear()
    _SHARED.clear()
