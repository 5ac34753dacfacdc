"""Communication and roofline time of one layout: decode step, prefill throughput, pipeline bubble.

Decode is modelled per pipeline stage and micro-batch: the bytes a rank reads from HBM (weights it holds that the
step touches — every routed expert only if some token selects it — plus the KV cache its attention reads) over
HBM bandwidth, against the FLOPs it does over peak; whichever is larger, plus the collectives it waits for, which
TensorRT-LLM does not overlap with compute in decode. Prefill is FLOP-bound (a chunk of up to 8192 tokens reuses
each weight thousands of times) plus its collectives' bandwidth term.

Collectives (FACTS §5): ring all-reduce ``S/B · 2(n-1)/n``, all-gather and all-to-all ``S/B · (n-1)/n``, each plus
the link's latency; a group inside one node uses the scale-up link (NVLink, or PCIe where there is none), a group
spanning nodes the network NIC of each GPU. EP dispatch per token per selected expert ``H + 4H/128 + 16`` bytes
(FP8 values, scales, routing metadata), combine ``2H`` (bf16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from builder.model.config import ModelConfig
from builder.plan.hardware import GPU, Cluster
from builder.plan.memory import MAX_NUM_TOKENS, RankWeights
from builder.shard.rules import mlp_tp
from builder.layout import Layout

ACT_BYTES = 2  # bf16 activations on the wire


@dataclass(frozen=True)
class Link:
    kind: str  # "nvlink" | "pcie" | "shm" | the network's name | "none"
    gb_s: float
    latency_us: float
    efficiency: float

    def seconds(self, nbytes: float, *, factor: float = 1.0, steps: int = 1) -> float:
        if self.kind == "none":
            return 0.0
        return steps * self.latency_us * 1e-6 + nbytes * factor / (self.gb_s * 1e9 * self.efficiency)


NO_LINK = Link("none", 1.0, 0.0, 1.0)


def group_link(cluster: Cluster, ranks: list[int]) -> Link:
    """The slowest link a collective over these global ranks crosses."""
    if len(ranks) <= 1:
        return NO_LINK
    g, net = cluster.gpu, cluster.network
    nodes = {cluster.node_of(r) for r in ranks}
    if len(nodes) == 1:
        return Link(g.scale_up, g.scale_up_gb_s, g.scale_up_latency_us, g.link_efficiency)
    # NCCL goes hierarchical: the inter-node part runs at the NIC's rate and adds a network round trip per level.
    levels = max(1, math.ceil(math.log2(len(nodes))))
    return Link(net.name, min(net.gb_s, g.scale_up_gb_s), g.scale_up_latency_us + 2 * levels * net.latency_us,
                net.efficiency)


@dataclass
class CommItem:
    bytes: float = 0.0  # per rank, per decode step (or per prefill token)
    ms: float = 0.0
    link: str = "none"

    def add(self, nbytes: float, seconds: float, link: Link) -> None:
        self.bytes += nbytes
        self.ms += seconds * 1e3
        if link.kind != "none":
            self.link = link.kind

    def as_dict(self) -> dict:
        return {"bytes": round(self.bytes), "ms": round(self.ms, 4), "link": self.link}


@dataclass
class Comm:
    tp_allreduce: CommItem = field(default_factory=CommItem)
    ep_dispatch_combine: CommItem = field(default_factory=CommItem)
    pp_p2p: CommItem = field(default_factory=CommItem)
    vocab: CommItem = field(default_factory=CommItem)  # embedding all-reduce + logits all-gather

    @property
    def ms(self) -> float:
        return self.tp_allreduce.ms + self.ep_dispatch_combine.ms + self.pp_p2p.ms + self.vocab.ms

    def as_dict(self) -> dict:
        return {"tp_allreduce": self.tp_allreduce.as_dict(), "ep_dispatch_combine": self.ep_dispatch_combine.as_dict(),
                "pp_p2p": self.pp_p2p.as_dict(), "vocab": self.vocab.as_dict(), "total_ms": round(self.ms, 4)}


@dataclass(frozen=True)
class Placement:
    """Links of one replica's groups (replica 0 starts at global rank ``offset``)."""

    tp: Link
    pp: list[Link]  # between stage s and s+1

    @classmethod
    def of(cls, cluster: Cluster, layout: Layout, offset: int = 0) -> "Placement":
        tp_links = [group_link(cluster, [offset + s * layout.tp + t for t in range(layout.tp)]) for s in range(layout.pp)]
        worst = min(tp_links, key=lambda link: (link.kind != "none", -link.latency_us, link.gb_s))
        pp = [group_link(cluster, [offset + s * layout.tp, offset + (s + 1) * layout.tp]) for s in range(layout.pp - 1)]
        return cls(worst, pp)


def expert_fraction_read(cfg: ModelConfig, tokens: float) -> float:
    """Expected share of a rank's routed experts that at least one of ``tokens`` selects (uniform routing)."""
    if not cfg.n_routed_experts or tokens <= 0:
        return 0.0
    return 1.0 - (1.0 - cfg.num_experts_per_tok / cfg.n_routed_experts) ** tokens


def attended_keys(cfg: ModelConfig, context: float) -> float:
    """Keys MLA attends per query: all of them, or the DSA indexer's top-k."""
    return min(context, cfg.index_topk) if cfg.has_indexer else context


def _layer_flops(cfg: ModelConfig, layout: Layout, *, tokens: float, context: float, moe: bool,
                 prefill: bool) -> float:
    """FLOPs one rank does for one layer on ``tokens`` tokens of its TP group (all of them are the rank's own
    under attention-TP; under attention-DP ``tokens`` are the rank's own requests')."""
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    split = 1 if layout.attention_dp else layout.tp
    heads = nh / split
    rep = h * cfg.q_lora_rank + h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    if cfg.has_indexer:
        rep += cfg.q_lora_rank * cfg.index_n_heads * cfg.index_head_dim + h * cfg.index_head_dim + h * cfg.index_n_heads
    sharded = (cfg.q_lora_rank * nh * cfg.qk_head_dim + cfg.kv_lora_rank * nh * (cfg.qk_nope_head_dim + cfg.v_head_dim)
               + nh * cfg.v_head_dim * h) / split
    if prefill:  # a query at position p sees p keys: mean over the prompt
        keys = context / 2 if not cfg.has_indexer or context <= cfg.index_topk else \
            cfg.index_topk - cfg.index_topk ** 2 / (2 * context)
        index_keys = context / 2
    else:
        keys, index_keys = attended_keys(cfg, context), context
    lat = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    core = heads * keys * (lat + cfg.kv_lora_rank)
    if cfg.has_indexer:
        core += cfg.index_n_heads * cfg.index_head_dim * index_keys
    if not moe:
        mlp = 3 * h * cfg.intermediate_size / mlp_tp(cfg.intermediate_size, layout)
        group_mlp = 0.0
    else:
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts
        mlp = h * cfg.n_routed_experts + (3 * h * shared / mlp_tp(shared, layout) if shared else 0)
        # Routed experts: the TP group's tokens (all ranks' under attention-DP) spread over its tp ranks.
        group_mlp = cfg.num_experts_per_tok * 3 * h * cfg.moe_intermediate_size / layout.tp
    group_tokens = tokens * (layout.tp if layout.attention_dp else 1)
    return 2 * (tokens * (rep + sharded + core + mlp) + group_tokens * group_mlp)


@dataclass
class StageTime:
    weights_ms: float
    kv_ms: float
    compute_ms: float
    comm: Comm
    overhead_ms: float = 0.0  # latency-bound small kernels (GPU.layer_overhead_us per layer)

    @property
    def memory_ms(self) -> float:
        return self.weights_ms + self.kv_ms

    @property
    def ms(self) -> float:
        return max(self.memory_ms, self.compute_ms) + self.overhead_ms + self.comm.ms - self.comm.pp_p2p.ms


@dataclass
class DecodeEstimate:
    step_ms: float  # time for every sequence in flight to gain one token (TPOT)
    stages: list[StageTime]
    microbatches: int
    bubble: float  # share of the step a stage waits (PP with fewer micro-batches than stages)
    comm: Comm  # summed over stages, per step

    @property
    def bound(self) -> str:
        worst = max(self.stages, key=lambda s: s.ms)
        parts = {"memory": worst.memory_ms, "compute": worst.compute_ms,
                 "communication": worst.comm.ms, "kernel latency": worst.overhead_ms}
        return max(parts, key=parts.get)


def _stage_comm(cfg: ModelConfig, layout: Layout, place: Placement, *, tokens: float, n_layers: int, n_moe: int,
                first: bool, last: bool, per_token: bool) -> Comm:
    """Collectives of one stage for ``tokens`` tokens of a TP group (per rank under attention-DP: tokens/tp).
    ``per_token``: prefill, where chunks amortize latency away."""
    comm = Comm()
    h, tp, link = cfg.hidden_size, layout.tp, place.tp
    steps = 0 if per_token else 1
    if tp > 1 and not layout.attention_dp:
        s = tokens * h * ACT_BYTES
        n_ar = 2 * n_layers
        comm.tp_allreduce.add(n_ar * s, n_ar * link.seconds(s, factor=2 * (tp - 1) / tp, steps=steps), link)
        if first:
            comm.vocab.add(s, link.seconds(s, factor=2 * (tp - 1) / tp, steps=steps), link)
        if last:
            g = tokens * cfg.vocab_size * ACT_BYTES
            comm.vocab.add(g, link.seconds(g, factor=(tp - 1) / tp, steps=steps), link)
    elif tp > 1 and n_moe:
        local = tokens / tp
        per = local * cfg.num_experts_per_tok * ((h + 4 * h / 128 + 16) + 2 * h) * (tp - 1) / tp
        comm.ep_dispatch_combine.add(n_moe * per, n_moe * link.seconds(per, steps=2 * steps), link)
    return comm


def decode_step(cfg: ModelConfig, layout: Layout, cluster: Cluster, place: Placement,
                weights: list[list[RankWeights]], *, batch: int, context: float, kv_bytes_per_token_layer: int,
                compute_dtype: str) -> DecodeEstimate:
    gpu: GPU = cluster.gpu
    m = max(1, min(batch, layout.pp))
    b = math.ceil(batch / m)
    stages = layout.stage_layers(cfg.num_hidden_layers)
    hbm = gpu.hbm_tb_s * 1e12 * gpu.hbm_efficiency
    peak = gpu.peak_tflops(compute_dtype) * 1e12 * gpu.compute_efficiency
    seqs_per_rank = b / layout.tp if layout.attention_dp else b
    kv_per_seq_layer = attended_keys(cfg, context) * (kv_bytes_per_token_layer - cfg.indexer_cache_bytes_per_token_per_layer) \
        + context * cfg.indexer_cache_bytes_per_token_per_layer
    out: list[StageTime] = []
    total = Comm()
    frac = expert_fraction_read(cfg, b)
    for s, layers in enumerate(stages):
        w = max(weights[s], key=lambda r: r.total)
        n_moe = sum(1 for i in layers if cfg.is_moe_layer(i))
        read = w.dense + w.routed_experts * frac
        kv = seqs_per_rank * len(layers) * kv_per_seq_layer
        flops = sum(n * _layer_flops(cfg, layout, tokens=seqs_per_rank, context=context, moe=moe, prefill=False)
                    for moe, n in ((False, len(layers) - n_moe), (True, n_moe)) if n)
        if s == layout.pp - 1:
            flops += 2 * seqs_per_rank * cfg.hidden_size * cfg.vocab_size / (1 if layout.attention_dp else layout.tp)
        comm = _stage_comm(cfg, layout, place, tokens=b, n_layers=len(layers), n_moe=n_moe, first=s == 0,
                           last=s == layout.pp - 1, per_token=False)
        if s < layout.pp - 1:
            p2p = b * cfg.hidden_size * ACT_BYTES * 2  # hidden states and residual
            comm.pp_p2p.add(p2p, place.pp[s].seconds(p2p), place.pp[s])
        out.append(StageTime(read / hbm * 1e3, kv / hbm * 1e3, flops / peak * 1e3, comm,
                             len(layers) * gpu.layer_overhead_us / 1e3))
        for name in ("tp_allreduce", "ep_dispatch_combine", "pp_p2p", "vocab"):
            a, c = getattr(total, name), getattr(comm, name)
            a.add(c.bytes * m, c.ms * m / 1e3, Link(c.link, 1, 0, 1))
    t_max = max(st.ms for st in out)
    chain = sum(st.ms for st in out) + sum(st.comm.pp_p2p.ms for st in out)
    step = max(m * t_max, chain)
    bubble = 1 - (m * sum(st.ms for st in out) / layout.pp) / step if layout.pp > 1 else 0.0
    return DecodeEstimate(step, out, m, max(0.0, bubble), total)


@dataclass
class PrefillEstimate:
    tokens_per_s: float  # one replica, many requests in flight (stages pipelined across requests)
    ttft_ms: float  # one request of isl tokens on an idle replica
    bubble: float  # (p-1)/(c+p-1) for that request's c chunks
    comm_per_token: Comm


def prefill(cfg: ModelConfig, layout: Layout, cluster: Cluster, place: Placement,
            weights: list[list[RankWeights]], *, isl: int, compute_dtype: str) -> PrefillEstimate:
    """Chunks of up to ``MAX_NUM_TOKENS`` tokens: each stage's chunk time is its FLOPs over peak or its weights
    over HBM bandwidth (short prompts touch every expert but reuse each only a few times), plus collectives."""
    gpu = cluster.gpu
    peak = gpu.peak_tflops(compute_dtype) * 1e12 * gpu.compute_efficiency
    hbm = gpu.hbm_tb_s * 1e12 * gpu.hbm_efficiency
    stages = layout.stage_layers(cfg.num_hidden_layers)
    chunks = max(1, math.ceil(isl / MAX_NUM_TOKENS))
    chunk = isl / chunks
    chunk_s: list[float] = []
    total = Comm()
    # Under attention-DP each rank prefills its own requests; the group works on tp chunks at once.
    share = layout.tp if layout.attention_dp else 1
    frac = expert_fraction_read(cfg, chunk * share)
    for s, layers in enumerate(stages):
        n_moe = sum(1 for i in layers if cfg.is_moe_layer(i))
        flops = sum(n * _layer_flops(cfg, layout, tokens=1, context=isl, moe=moe, prefill=True)
                    for moe, n in ((False, len(layers) - n_moe), (True, n_moe)) if n)
        comm = _stage_comm(cfg, layout, place, tokens=1, n_layers=len(layers), n_moe=n_moe, first=s == 0, last=False,
                           per_token=True)
        if s < layout.pp - 1:
            p2p = cfg.hidden_size * ACT_BYTES * 2
            comm.pp_p2p.add(p2p, place.pp[s].seconds(p2p, steps=0), place.pp[s])
        w = max(weights[s], key=lambda r: r.total)
        read = (w.dense + w.routed_experts * frac) / hbm
        chunk_s.append(max(chunk * flops / peak, read) + chunk * comm.ms / 1e3 + len(layers) * gpu.layer_overhead_us / 1e6)
        for name in ("tp_allreduce", "ep_dispatch_combine", "pp_p2p", "vocab"):
            a, c = getattr(total, name), getattr(comm, name)
            a.add(c.bytes, c.ms / 1e3, Link(c.link, 1, 0, 1))
    ttft = (sum(chunk_s) + (chunks - 1) * max(chunk_s)) * 1e3
    bubble = (layout.pp - 1) / (chunks + layout.pp - 1)
    return PrefillEstimate(share * chunk / max(chunk_s), ttft, bubble, total)
