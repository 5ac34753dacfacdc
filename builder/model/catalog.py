"""The one catalogue of a DeepSeek-V3/V3.2 checkpoint's tensors, from ``config.json`` alone.

Every stage walks this list: make-tiny writes it, fetch validates against it, quantize transforms it, the planner
sums it, the shard writer splits it and the reference engine loads by it. A tensor's ``kind`` is the key into the
sharding-rule table (``builder.shard.rules``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from builder.model.config import FP8_BLOCK, ModelConfig


class Dtype(str, Enum):
    """Checkpoint dtypes, named as safetensors names them."""

    F8_E4M3 = "F8_E4M3"
    BF16 = "BF16"
    F32 = "F32"
    F16 = "F16"
    I8 = "I8"
    U8 = "U8"
    I32 = "I32"
    I64 = "I64"

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]


_ITEMSIZE = {
    Dtype.F8_E4M3: 1, Dtype.BF16: 2, Dtype.F32: 4, Dtype.F16: 2, Dtype.I8: 1, Dtype.U8: 1, Dtype.I32: 4,
    Dtype.I64: 8,
}


class Kind(str, Enum):
    """What a tensor is. The sharding rules and the planner key on this."""

    EMBED = "embed"
    LM_HEAD = "lm_head"
    FINAL_NORM = "final_norm"
    NORM = "norm"  # input/post-attention layernorms, q_a/kv_a layernorms: replicated everywhere
    Q_A = "q_a"
    Q_B = "q_b"
    KV_A = "kv_a"
    KV_B = "kv_b"
    O_PROJ = "o_proj"
    IDX_WQ_B = "indexer_wq_b"
    IDX_WK = "indexer_wk"
    IDX_K_NORM = "indexer_k_norm"
    IDX_WEIGHTS = "indexer_weights_proj"
    DENSE_GATE = "dense_gate"
    DENSE_UP = "dense_up"
    DENSE_DOWN = "dense_down"
    ROUTER = "router"
    ROUTER_BIAS = "router_bias"
    EXPERT_GATE = "expert_gate"
    EXPERT_UP = "expert_up"
    EXPERT_DOWN = "expert_down"
    # A routed expert's per-tensor activation scale that every rank needs (TensorRT-LLM's W4A8 loader takes the
    # max over all experts of a layer), so it is replicated rather than owned by the expert's EP rank.
    EXPERT_ACT_SCALE = "expert_act_scale"
    SHARED_GATE = "shared_gate"
    SHARED_UP = "shared_up"
    SHARED_DOWN = "shared_down"
    MTP_EMBED = "mtp_embed"
    MTP_NORM = "mtp_norm"  # enorm, hnorm, shared_head.norm
    MTP_EH_PROJ = "mtp_eh_proj"
    MTP_HEAD = "mtp_head"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: Dtype
    kind: Kind
    layer: int | None = None  # decoder layer index; MTP layers are num_hidden_layers + i
    expert: int | None = None
    scale_of: str | None = None  # for a ``weight_scale_inv``: the weight it scales
    # For a scale of lower rank than its weight: which weight dimension each of its dimensions follows
    # (an AWQ ``pre_quant_scale`` of length ``in`` follows dimension 1). None: dimension i follows dimension i.
    follows: tuple[int, ...] | None = None
    # The dtype policy of an unquantized tensor: the dtypes a checkpoint may store it in (``dtype`` is the one the
    # real checkpoint uses, which make-tiny writes). None: exactly ``dtype`` (FP8 weights, their scales, ...).
    accepted: frozenset[Dtype] | None = None

    def accepts(self, dtype: Dtype) -> bool:
        return dtype == self.dtype or (self.accepted is not None and dtype in self.accepted)

    @property
    def dtype_rule(self) -> str:
        """The accepted dtypes in words, for errors and tables."""
        if self.accepted is None:
            return self.dtype.value
        return " or ".join(sorted({self.dtype.value, *(d.value for d in self.accepted)}))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_scale(self) -> bool:
        return self.scale_of is not None

    @property
    def layer_module(self) -> str:
        """A decoder-layer tensor's module path inside its layer (``self_attn.q_a_proj`` for
        ``model.layers.3.self_attn.q_a_proj.weight``)."""
        return self.name.split(".", 3)[3].removesuffix(".weight")


def block_scale_shape(shape: tuple[int, ...], block: int = FP8_BLOCK) -> tuple[int, int]:
    rows, cols = shape
    return (math.ceil(rows / block), math.ceil(cols / block))


# Kinds whose weight is a linear layer stored in block FP8 by DeepSeek (and so has a ``weight_scale_inv``).
FP8_KINDS = frozenset({
    Kind.Q_A, Kind.Q_B, Kind.KV_A, Kind.KV_B, Kind.O_PROJ, Kind.IDX_WQ_B, Kind.IDX_WK,
    Kind.DENSE_GATE, Kind.DENSE_UP, Kind.DENSE_DOWN, Kind.EXPERT_GATE, Kind.EXPERT_UP, Kind.EXPERT_DOWN,
    Kind.SHARED_GATE, Kind.SHARED_UP, Kind.SHARED_DOWN,
})
# The dtype policy (docs/tensorrt-llm-contract.md#C-DSREF-1): tensors DeepSeek keeps unquantized — norms, norm biases,
# the router and its bias, the indexer's weights_proj — may be stored in BF16 or F32. Their in-memory dtype is fixed by
# the consumer (DeepSeek's code holds them in float32, TensorRT-LLM converts on load: C-DSV3-3, C-DSA-4, and the
# reference engine keeps router, bias and weights_proj in float32), so the stored one is not a format property: fetch
# accepts either, records what it found, and every later stage carries those bytes unchanged.
POLICY_DTYPES = frozenset({Dtype.BF16, Dtype.F32})
POLICY_KINDS = frozenset({Kind.NORM, Kind.FINAL_NORM, Kind.MTP_NORM, Kind.IDX_K_NORM, Kind.ROUTER, Kind.ROUTER_BIAS,
                          Kind.IDX_WEIGHTS})
# The real checkpoint's dtypes where DeepSeek states them (what make-tiny writes): weights_proj "stored in bf16" (the
# V3.2 inference code's comment), the router bias float32 (its Gate.bias); everything else BF16 except the indexer's
# LayerNorm, held in float32 by DeepSeek's code (its on-disk dtype is unconfirmed: the policy accepts either).
_STORED_DTYPE = {
    Kind.ROUTER_BIAS: Dtype.F32,
    Kind.IDX_WEIGHTS: Dtype.BF16,
    Kind.IDX_K_NORM: Dtype.F32,
}


def build_catalog(cfg: ModelConfig, *, include_mtp: bool = True) -> list[TensorSpec]:
    """Every tensor of the checkpoint, in a stable order (layer by layer, weights before their scales).

    ``cfg.is_fp8_block`` decides whether linear weights are FP8 with scales or BF16 without.
    """
    fp8 = cfg.is_fp8_block
    out: list[TensorSpec] = []

    def add(name: str, shape: tuple[int, ...], kind: Kind, layer: int | None = None, expert: int | None = None) -> None:
        if kind in FP8_KINDS and fp8:
            out.append(TensorSpec(name, shape, Dtype.F8_E4M3, kind, layer, expert))
            scale_name = name[: -len("weight")] + "weight_scale_inv"
            out.append(TensorSpec(scale_name, block_scale_shape(shape), Dtype.F32, kind, layer, expert, scale_of=name))
        else:
            out.append(TensorSpec(name, shape, _STORED_DTYPE.get(kind, Dtype.BF16), kind, layer, expert,
                                  accepted=POLICY_DTYPES if kind in POLICY_KINDS else None))

    h = cfg.hidden_size
    out.append(TensorSpec("model.embed_tokens.weight", (cfg.vocab_size, h), Dtype.BF16, Kind.EMBED))
    layers = list(range(cfg.num_hidden_layers)) + (cfg.mtp_layers if include_mtp else [])
    for i in layers:
        p = f"model.layers.{i}."
        if i >= cfg.num_hidden_layers:  # the MTP module's own parts, before its decoder layer
            add(p + "embed_tokens.weight", (cfg.vocab_size, h), Kind.MTP_EMBED, i)
            add(p + "enorm.weight", (h,), Kind.MTP_NORM, i)
            add(p + "hnorm.weight", (h,), Kind.MTP_NORM, i)
            add(p + "eh_proj.weight", (h, 2 * h), Kind.MTP_EH_PROJ, i)
            add(p + "shared_head.norm.weight", (h,), Kind.MTP_NORM, i)
            add(p + "shared_head.head.weight", (cfg.vocab_size, h), Kind.MTP_HEAD, i)
        add(p + "input_layernorm.weight", (h,), Kind.NORM, i)
        a = p + "self_attn."
        nh = cfg.num_attention_heads
        add(a + "q_a_proj.weight", (cfg.q_lora_rank, h), Kind.Q_A, i)
        add(a + "q_a_layernorm.weight", (cfg.q_lora_rank,), Kind.NORM, i)
        add(a + "q_b_proj.weight", (nh * cfg.qk_head_dim, cfg.q_lora_rank), Kind.Q_B, i)
        add(a + "kv_a_proj_with_mqa.weight", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h), Kind.KV_A, i)
        add(a + "kv_a_layernorm.weight", (cfg.kv_lora_rank,), Kind.NORM, i)
        add(a + "kv_b_proj.weight", (nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank), Kind.KV_B, i)
        add(a + "o_proj.weight", (h, nh * cfg.v_head_dim), Kind.O_PROJ, i)
        if cfg.has_indexer:
            x = a + "indexer."
            add(x + "wq_b.weight", (cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank), Kind.IDX_WQ_B, i)
            add(x + "wk.weight", (cfg.index_head_dim, h), Kind.IDX_WK, i)
            add(x + "k_norm.weight", (cfg.index_head_dim,), Kind.IDX_K_NORM, i)
            add(x + "k_norm.bias", (cfg.index_head_dim,), Kind.IDX_K_NORM, i)
            add(x + "weights_proj.weight", (cfg.index_n_heads, h), Kind.IDX_WEIGHTS, i)
        add(p + "post_attention_layernorm.weight", (h,), Kind.NORM, i)
        m = p + "mlp."
        if not cfg.is_moe_layer(i):
            add(m + "gate_proj.weight", (cfg.intermediate_size, h), Kind.DENSE_GATE, i)
            add(m + "up_proj.weight", (cfg.intermediate_size, h), Kind.DENSE_UP, i)
            add(m + "down_proj.weight", (h, cfg.intermediate_size), Kind.DENSE_DOWN, i)
        else:
            add(m + "gate.weight", (cfg.n_routed_experts, h), Kind.ROUTER, i)
            add(m + "gate.e_score_correction_bias", (cfg.n_routed_experts,), Kind.ROUTER_BIAS, i)
            mi = cfg.moe_intermediate_size
            for e in range(cfg.n_routed_experts):
                ep = f"{m}experts.{e}."
                add(ep + "gate_proj.weight", (mi, h), Kind.EXPERT_GATE, i, e)
                add(ep + "up_proj.weight", (mi, h), Kind.EXPERT_UP, i, e)
                add(ep + "down_proj.weight", (h, mi), Kind.EXPERT_DOWN, i, e)
            if cfg.n_shared_experts > 0:
                si = mi * cfg.n_shared_experts
                add(m + "shared_experts.gate_proj.weight", (si, h), Kind.SHARED_GATE, i)
                add(m + "shared_experts.up_proj.weight", (si, h), Kind.SHARED_UP, i)
                add(m + "shared_experts.down_proj.weight", (h, si), Kind.SHARED_DOWN, i)
    out.append(TensorSpec("model.norm.weight", (h,), Dtype.BF16, Kind.FINAL_NORM, accepted=POLICY_DTYPES))
    out.append(TensorSpec("lm_head.weight", (cfg.vocab_size, h), Dtype.BF16, Kind.LM_HEAD))
    return out


def policy_dtypes_found(specs, dtype_of) -> dict[str, list[str]]:
    """The stored dtypes of the policy tensors, per kind (``dtype_of(name)`` reads a header): what fetch records and
    later stages carry, e.g. ``{"indexer_weights_proj": ["BF16"], "norm": ["F32"]}``."""
    found: dict[str, set[str]] = {}
    for spec in specs:
        if spec.accepted is not None:
            found.setdefault(spec.kind.value, set()).add(dtype_of(spec.name).value)
    return {k: sorted(v) for k, v in sorted(found.items())}


def catalog_by_name(cfg: ModelConfig, *, include_mtp: bool = True) -> dict[str, TensorSpec]:
    return {t.name: t for t in build_catalog(cfg, include_mtp=include_mtp)}


def is_mtp_tensor(name: str, cfg: ModelConfig) -> bool:
    parts = name.split(".")
    return len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit() \
        and int(parts[2]) >= cfg.num_hidden_layers


def total_bytes(specs: list[TensorSpec]) -> int:
    return sum(t.nbytes for t in specs)
