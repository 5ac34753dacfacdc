"""Memory per GPU: weights (from the sharding rules, and as TensorRT-LLM holds them), KV cache, activations, reserve.

Two weight figures per rank:

* **rank files** — the bytes of the pieces the build stage writes to ``engines/rank{N}.safetensors`` (what the CPU
  reference engine holds). They come from ``builder.shard.rules.plan_ranks`` over the stored tensors of the weight
  format (``quantize.formats.quantized_catalog``), never from a parameter count. Running it over all ~92 000 tensors
  of DeepSeek-V3.2 for every candidate layout would take seconds each, so :func:`stage_weights` runs it once per
  (TP, EP, attention-DP) over a *representative* catalogue — the non-layer tensors, the first dense layer, the
  first MoE layer and the MTP layers of the model reduced to those two layers (same tensor shapes), each MoE layer
  keeping routed expert 0 only — and scales: every dense layer holds the same pieces as the dense one, every MoE
  layer as the MoE one, and every expert the same pieces as expert 0 at the same MoE-TP rank. Tests check the
  result against ``plan_ranks`` over the full catalogue and against the bytes the build writes to each rank file.
* **TensorRT-LLM** — what the GPU flavour holds after loading the same checkpoint
  (:func:`trtllm_rank_bytes`): the rank-file bytes with the differences TensorRT-LLM's DeepSeek loader makes,
  each recorded with its upstream source in docs/choosing-a-layout.md ("Sources"): the main embedding is built
  without a tensor-parallel mapping (whole on every rank of the first stage); the MTP layer is built only when MTP
  speculative decoding runs and then reuses the main model's embedding and LM head (its own copies are not
  loaded) and splits ``eh_proj`` by rows over TP except under attention-DP; every MLA layer keeps a transposed copy
  of the key half of ``kv_b_proj`` (``k_b_proj_trans``), in FP8 for block-FP8 checkpoints and BF16 otherwise,
  plus BF16 copies of both halves on Blackwell for block-FP8 checkpoints. Feasibility on a GPU follows this figure.

The KV pool is what TensorRT-LLM's ``KvCacheCreator`` leaves it: ``free_gpu_memory_fraction`` of the device memory
minus the peak of a profiling forward of ``max_num_tokens`` tokens (weights + activations + runtime).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace

from builder.layout import Layout
from builder.model.catalog import Dtype, Kind, TensorSpec
from builder.model.config import ModelConfig
from builder.shard.rules import RULES, PPStage, check_layout, plan_ranks
from quantize import registry as quant_formats
from quantize.formats import quantized_catalog

GIB = 1 << 30
EXPERT_KINDS = frozenset({Kind.EXPERT_GATE, Kind.EXPERT_UP, Kind.EXPERT_DOWN})
# TensorRT-LLM defaults (llm_args.py, 1.2): prefill chunk / scheduler token budget, max sequences per rank, KV page
# size, and the share of memory left after the profiling forward that the KV pool takes.
MAX_NUM_TOKENS = 8192
MAX_BATCH_SIZE = 2048
TOKENS_PER_BLOCK = 32
FREE_GPU_MEMORY_FRACTION = 0.9
KV_DTYPE_BYTES = {"fp8": 1, "bf16": 2, "auto": 2}  # 'auto' keeps the model's activation dtype (bf16)

# What each stored tensor is for, as the speed model reads it.
CATEGORY: dict[Kind, str] = {
    **{k: "attention" for k in (Kind.Q_A, Kind.Q_B, Kind.KV_A, Kind.KV_B, Kind.O_PROJ, Kind.IDX_WQ_B, Kind.IDX_WK,
                                Kind.IDX_K_NORM, Kind.IDX_WEIGHTS, Kind.NORM, Kind.MTP_NORM)},
    **{k: "mlp" for k in (Kind.DENSE_GATE, Kind.DENSE_UP, Kind.DENSE_DOWN, Kind.SHARED_GATE, Kind.SHARED_UP,
                          Kind.SHARED_DOWN, Kind.ROUTER, Kind.ROUTER_BIAS, Kind.EXPERT_ACT_SCALE)},
    **{k: "experts" for k in EXPERT_KINDS},
    Kind.EMBED: "embed", Kind.LM_HEAD: "head", Kind.FINAL_NORM: "head",
    Kind.MTP_EMBED: "mtp_embed", Kind.MTP_HEAD: "mtp_head", Kind.MTP_EH_PROJ: "mtp_eh_proj",
}
PLACES = ("first", "last", "dense", "moe", "mtp")
UNQUANTIZED = frozenset({Dtype.BF16, Dtype.F32})


@dataclass(frozen=True)
class PlaceBytes:
    """One rank's bytes of one place (a dense decoder layer, a MoE layer, the MTP module, the first stage's
    embedding, the last stage's head), by what they are for."""

    attention: int = 0
    mlp: int = 0  # dense MLP, shared expert, router
    experts: int = 0  # routed experts this rank owns
    embed: int = 0
    head: int = 0  # LM head and final norm
    mtp_embed: int = 0  # the MTP module's own copies of the embedding and LM head
    mtp_head: int = 0
    mtp_eh_proj: int = 0

    @property
    def total(self) -> int:
        return (self.attention + self.mlp + self.experts + self.embed + self.head + self.mtp_embed + self.mtp_head
                + self.mtp_eh_proj)

    def __add__(self, other: "PlaceBytes") -> "PlaceBytes":
        return PlaceBytes(*(a + b for a, b in zip(astuple_fast(self), astuple_fast(other))))

    def __mul__(self, n: int) -> "PlaceBytes":
        return PlaceBytes(*(a * n for a in astuple_fast(self)))


def astuple_fast(p: PlaceBytes) -> tuple[int, ...]:
    return (p.attention, p.mlp, p.experts, p.embed, p.head, p.mtp_embed, p.mtp_head, p.mtp_eh_proj)


ZERO = PlaceBytes()


@dataclass(frozen=True)
class RankWeights:
    """What one rank of one pipeline stage holds (rank-file bytes), per place, with the stage's layer counts."""

    dense_layer: PlaceBytes
    moe_layer: PlaceBytes
    mtp_layer: PlaceBytes  # ZERO unless the stage holds the MTP module
    first: PlaceBytes  # ZERO except on the first stage
    last: PlaceBytes  # ZERO except on the last stage
    n_dense: int
    n_moe: int

    @functools.cached_property
    def places(self) -> PlaceBytes:
        return (self.dense_layer * self.n_dense + self.moe_layer * self.n_moe + self.mtp_layer + self.first
                + self.last)

    @functools.cached_property
    def total(self) -> int:
        return (self.dense_layer.total * self.n_dense + self.moe_layer.total * self.n_moe + self.mtp_layer.total
                + self.first.total + self.last.total)

    @property
    def routed_experts(self) -> int:
        return self.dense_layer.experts * self.n_dense + self.moe_layer.experts * self.n_moe + self.mtp_layer.experts


@dataclass(frozen=True, eq=False)  # hashed by identity: the per-layout cache below keys on it
class WeightCatalog:
    """The stored tensors of one weight format, reduced for fast planning (see module docstring)."""

    cfg: ModelConfig  # the real model
    specs: tuple[TensorSpec, ...]  # catalogue of the reduced model: <= 1 dense layer, <= 1 MoE layer, MTP
    logical_shapes: dict[str, tuple[int, ...]]
    dense_layer: int | None  # index of the dense layer in the reduced catalogue (None: no dense layers)
    moe_layer: int | None
    mtp_layers: frozenset[int]
    kv_b_block_fp8: bool  # kv_b_proj stored as 128x128 block FP8 (decides TensorRT-LLM's extra MLA copies)
    # What each linear's GEMM runs in ("fp4" | "fp8" | "bf16"): the format's compute dtype where the weight is
    # stored quantized, BF16 where the format leaves it unquantized (nvfp4's MLA projections, every MTP linear).
    compute_dtypes: dict[Kind, str]  # decoder layers, embedding and LM head
    mtp_compute_dtypes: dict[Kind, str]  # the MTP layer

    @functools.cached_property
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
    k = min(cfg.first_k_dense_replace, 1)
    has_moe = cfg.first_k_dense_replace < cfg.num_hidden_layers
    reduced = replace(cfg, num_hidden_layers=k + (1 if has_moe else 0), first_k_dense_replace=k)
    qc = quantized_catalog(reduced, quant, include_mtp=include_mtp)
    block_scaled = {s.scale_of for s in qc.specs if s.kind is Kind.KV_B and s.scale_of
                    and s.name.endswith("weight_scale_inv")}
    kv_b_block_fp8 = any(s.kind is Kind.KV_B and s.dtype is Dtype.F8_E4M3 and s.name in block_scaled
                         for s in qc.specs)
    mtp = frozenset(reduced.mtp_layers) if include_mtp else frozenset()
    quantized_dtype = quant_formats.get(quant).compute_dtype
    layers: dict[Kind, str] = {}
    mtp_layer: dict[Kind, str] = {}
    for s in qc.specs:
        if not s.is_scale and len(s.shape) == 2:
            (mtp_layer if s.layer in mtp else layers)[s.kind] = "bf16" if s.dtype in UNQUANTIZED else quantized_dtype
    return WeightCatalog(cfg, tuple(qc.specs), dict(qc.logical_shapes), 0 if k else None, k if has_moe else None,
                         mtp, kv_b_block_fp8, layers, mtp_layer)


def _where(cat: WeightCatalog, spec: TensorSpec) -> str:
    if spec.layer is None:
        return "first" if RULES[spec.kind].stage is PPStage.FIRST else "last"
    if spec.layer in cat.mtp_layers:
        return "mtp"
    return "dense" if spec.layer == cat.dense_layer else "moe"


def _place_bytes(acc: dict[str, int]) -> PlaceBytes:
    return PlaceBytes(**acc)


@functools.lru_cache(maxsize=512)
def _shared_pieces(cat: WeightCatalog, tp: int, attention_dp: bool) -> tuple[dict[str, PlaceBytes], ...]:
    """Per TP rank, its bytes of everything but routed experts, per place. The sharding rules split these by TP
    and attention-DP only (not by EP), so one result serves every EP."""
    specs = [s for s in cat.specs if s.kind not in EXPERT_KINDS]
    by_name = {s.name: s for s in specs}
    out = []
    for plan in plan_ranks(cat.cfg, Layout(tp=tp, pp=1, ep=1, attention_dp=attention_dp), specs,
                           weight_shapes=cat.logical_shapes):
        acc: dict[str, dict[str, int]] = {p: {} for p in PLACES}
        for piece in plan.pieces:
            spec = by_name[piece.name]
            slot = acc[_where(cat, spec)]
            cat_name = CATEGORY[spec.kind]
            slot[cat_name] = slot.get(cat_name, 0) + piece.nbytes
        out.append({p: _place_bytes(v) for p, v in acc.items()})
    return tuple(out)


@functools.lru_cache(maxsize=512)
def _expert_pieces(cat: WeightCatalog, tp: int, ep: int) -> tuple[dict[str, int], ...]:
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
    return tuple(per_moe_tp[layout.moe_coords(t)[1]] for t in range(tp))


@functools.lru_cache(maxsize=512)
def _rank_places(cat: WeightCatalog, tp: int, attention_dp: bool, ep: int) -> tuple[dict[str, PlaceBytes], ...]:
    """Per TP rank, everything it holds per place (routed experts included)."""
    return tuple({p: sh[p] + PlaceBytes(experts=ex[p]) for p in PLACES}
                 for sh, ex in zip(_shared_pieces(cat, tp, attention_dp), _expert_pieces(cat, tp, ep)))


def stage_weights(cat: WeightCatalog, layout: Layout) -> list[list[RankWeights]]:
    """``[pp_rank][tp_rank]`` -> the rank-file weights of that rank (raises LayoutError for an impossible layout).
    The MTP module counts when the catalogue has it (on the last stage, as the build places it)."""
    cfg = cat.cfg
    check_layout(cfg, layout)
    ranks = _rank_places(cat, layout.tp, layout.attention_dp, layout.ep)
    stages = layout.stage_layers(cfg.num_hidden_layers)
    out = []
    for s, layers in enumerate(stages):
        n_dense = sum(1 for i in layers if not cfg.is_moe_layer(i))
        first, last = s == 0, s == layout.pp - 1
        out.append([RankWeights(p["dense"], p["moe"], p["mtp"] if last else ZERO, p["first"] if first else ZERO,
                                p["last"] if last else ZERO, n_dense, len(layers) - n_dense) for p in ranks])
    return out


@dataclass(frozen=True)
class TrtllmBytes:
    """One rank's weights as TensorRT-LLM holds them: the rank-file bytes plus each documented difference."""

    rank_files: int
    embedding_replicated: int = 0  # the whole main embedding instead of this rank's vocabulary slice
    mtp_dropped: int = 0  # MTP module not built (no MTP decoding), or its own embedding / LM head copies
    eh_proj_split: int = 0  # eh_proj row-split over TP (no attention-DP)
    mla_copies: int = 0  # k_b_proj_trans (+ BF16 dequantized k/v halves on Blackwell with block FP8)

    @property
    def total(self) -> int:
        return (self.rank_files + self.embedding_replicated - self.mtp_dropped - self.eh_proj_split
                + self.mla_copies)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"total": self.total}


def mla_copy_bytes_per_layer(cat: WeightCatalog, layout: Layout, *, blackwell: bool) -> int:
    """TensorRT-LLM's extra per-layer MLA weights: ``k_b_proj_trans`` [heads, kv_lora, qk_nope] (FP8 with its
    [heads, kv_lora/128, qk_nope/128] fp32 scales for block-FP8 ``kv_b_proj``, else BF16) and, on Blackwell with
    block FP8, BF16 ``k_b_proj_trans_dequant`` and ``v_b_proj_dequant`` [heads, v_head, kv_lora]."""
    cfg = cat.cfg
    heads = cfg.num_attention_heads if layout.attention_dp else cfg.num_attention_heads // layout.tp
    k_half = heads * cfg.kv_lora_rank * cfg.qk_nope_head_dim
    if not cat.kv_b_block_fp8:
        return 2 * k_half
    scales = heads * math.ceil(cfg.kv_lora_rank / 128) * math.ceil(cfg.qk_nope_head_dim / 128) * 4
    dequant = 2 * (k_half + heads * cfg.v_head_dim * cfg.kv_lora_rank) if blackwell else 0
    return k_half + scales + dequant


def trtllm_rank_bytes(cat: WeightCatalog, layout: Layout, w: RankWeights, *, stage: int, mtp: bool,
                      blackwell: bool) -> TrtllmBytes:
    embedding = 0
    if stage == 0:
        embed_spec = next(s for s in cat.specs if s.kind is Kind.EMBED)
        embedding = embed_spec.nbytes - w.first.embed
    holds_mtp = w.mtp_layer.total > 0
    if holds_mtp and not mtp:
        dropped, eh_split, mtp_layers = w.mtp_layer.total, 0, 0
    else:
        dropped = w.mtp_layer.mtp_embed + w.mtp_layer.mtp_head
        eh_split = 0 if layout.attention_dp else w.mtp_layer.mtp_eh_proj - w.mtp_layer.mtp_eh_proj // layout.tp
        mtp_layers = len(cat.mtp_layers) if holds_mtp else 0
    layers = w.n_dense + w.n_moe + mtp_layers
    return TrtllmBytes(w.total, embedding, dropped, eh_split,
                       layers * mla_copy_bytes_per_layer(cat, layout, blackwell=blackwell))


def kv_bytes_per_token_per_layer(cfg: ModelConfig, kv_cache_dtype: str) -> int:
    """MLA latent + RoPE key (576 elements for DeepSeek) in the KV dtype, plus the DSA indexer's FP8 key and
    scale (132 B) for V3.2 (docs/choosing-a-layout.md, Sources)."""
    return cfg.kv_cache_elems_per_token_per_layer * KV_DTYPE_BYTES[kv_cache_dtype] \
        + cfg.indexer_cache_bytes_per_token_per_layer


def tokens_in_cache(seq_len: int) -> int:
    """A sequence occupies whole KV pages."""
    return math.ceil(seq_len / TOKENS_PER_BLOCK) * TOKENS_PER_BLOCK


def activation_bytes(cfg: ModelConfig, layout: Layout, *, batch: int, context: int,
                     max_num_tokens: int = MAX_NUM_TOKENS) -> int:
    """Peak activation/workspace of one rank for a forward of ``max_num_tokens`` tokens (TensorRT-LLM's profiling
    forward before it sizes the KV pool).

    Counted: the residual stream and three bf16 hidden-size temporaries, the rank's query heads and the
    up-projected keys/values MLA builds for prefill, the MoE permutation workspace (every token to top-k experts:
    FP8 input plus bf16 gate/up/down intermediates of the rank's slice), the DSA indexer's queries and fp32 score
    rows over the context, and fp32 logits of the rank's vocabulary slice for the decode batch.
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
    _shared_pieces.cache_clear()
    _rank_places.cache_clear()
