"""Time of one layout's decode step, prefill and MTP drafts, kernel by kernel, as TensorRT-LLM runs DeepSeek.

Every decoder layer of a step is a short list of kernels; each kernel takes the longer of its bytes over the GPU's
achieved HBM bandwidth and its FLOPs over its achieved tensor throughput (``hbm_efficiency``,
``compute_efficiency`` with ``gemm_half_rows``, ``attention_efficiency``, ``context_attention_efficiency`` of the GPU
generation, fitted to published TensorRT-LLM results); a GEMM runs at the peak of the dtype its weight is stored in
(BF16 where the format leaves a linear unquantized, e.g. nvfp4's MLA projections and every MTP linear). Per layer,
on the busiest rank (under attention-DP the one with the most sequences, which the MoE waits for):

* attention projections (``q_a``/``kv_a`` and the DSA indexer's replicated everywhere, ``q_b``/``kv_b``/``o`` split
  by heads unless attention-DP) on the rank's query tokens;
* MLA attention over the KV cache: absorbed MQA in the 512+64 latent for decode (and for DSA prefill), the latent
  of every attended key read once per sequence; DSA attends ``index_topk`` keys (in prefill too, each query token
  gathering its own), its indexer scores every key and a top-k of one CTA per query row selects them;
  R1/V3 prefill runs MHA over the up-projected keys;
* the MoE: the routed experts of the rank (each read only when a token of the step selects it, FLOPs for the
  tokens routed to it, i.e. grouped GEMMs whose size per expert grows with the batch), the shared expert, the
  router; the dense MLP in the first layers;
* collectives on the link they cross: two all-reduces per layer under attention-TP, the MoE dispatch/combine
  under attention-DP, the PP hand-off; each a latency plus its bytes at the link's bandwidth;
* ``layer_overhead_us`` per layer and forward for everything latency-bound (norms, RoPE, routing, quantize and
  launch gaps); the LM head at the end.

Speculative decoding (MTP): a step verifies ``draft_len + 1`` tokens per sequence through the main model, then
runs the MTP layer ``draft_len`` times (one token per sequence each, plus the LM head and ``draft_overhead_us``),
and yields ``acceptance`` tokens per sequence on average (published defaults per draft length below), so
TPOT = step / acceptance.

Collectives (docs/choosing-a-layout.md, Sources): ring all-reduce ``S/B · 2(n-1)/n``, all-gather and all-to-all
``S/B · (n-1)/n``, each plus the link's latency; a group inside one node uses the scale-up link (NVLink, or PCIe
where there is none), a group spanning nodes the network NIC of each GPU. EP dispatch per token per selected expert
``H + 4H/128 + 16`` bytes (FP8 values, scales, routing metadata), combine ``2H`` (bf16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from builder.layout import Layout
from builder.model.catalog import Kind
from builder.model.config import ModelConfig
from builder.plan.hardware import GPU, Cluster
from builder.plan.memory import PlaceBytes, RankWeights
from builder.shard.rules import mlp_tp
from quantize import registry as quant_formats

ACT_BYTES = 2  # bf16 activations on the wire
# Mean tokens accepted per step for each MTP draft length: DeepSeek-R1 on a real dataset (tech blog 1, strict
# acceptance; docs/choosing-a-layout.md, Sources). Longer drafts accept no more than 5 did.
DEFAULT_ACCEPTANCE = {0: 1.0, 1: 1.92, 2: 2.58, 3: 2.82, 4: 2.99, 5: 3.01}
# DSA's top-k selection is a radix select per query row, one CTA per row, not FLOPs: a row of N scores takes
# TOPK_ROW_S + N * TOPK_S_PER_SCORE on a B200 (tech blog 19's single-row production radix kernel: 21.98 us at
# N = 16,384, 76.13 us at N = 131,072; blog 15's 64 rows of 9295 in 14.3 us agree), rows run one per SM at once.
# No Hopper figure is published: the same per-SM figures are assumed.
TOPK_ROW_S = 14.27e-6
TOPK_S_PER_SCORE = (76.128e-6 - 21.984e-6) / (131072 - 16384)


def default_acceptance(draft_len: int) -> float:
    return DEFAULT_ACCEPTANCE[min(draft_len, max(DEFAULT_ACCEPTANCE))]


@dataclass(frozen=True)
class Speculation:
    """MTP speculative decoding: ``draft_len`` draft tokens per step (0: off), ``acceptance`` mean tokens accepted
    per step (None: the published default for that draft length)."""

    draft_len: int = 0
    acceptance: float | None = None

    @property
    def tokens_per_step(self) -> float:
        return self.acceptance if self.acceptance is not None else default_acceptance(self.draft_len)


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

    def add(self, nbytes: float, seconds: float, link: Link | str) -> None:
        self.bytes += nbytes
        self.ms += seconds * 1e3
        kind = link if isinstance(link, str) else link.kind
        if kind != "none":
            self.link = kind

    def as_dict(self) -> dict:
        return {"bytes": round(self.bytes), "ms": round(self.ms, 4), "link": self.link}


COMM_ITEMS = ("tp_allreduce", "ep_dispatch_combine", "pp_p2p", "vocab")


@dataclass
class Comm:
    tp_allreduce: CommItem = field(default_factory=CommItem)
    ep_dispatch_combine: CommItem = field(default_factory=CommItem)
    pp_p2p: CommItem = field(default_factory=CommItem)
    vocab: CommItem = field(default_factory=CommItem)  # embedding all-reduce + logits all-gather

    @property
    def ms(self) -> float:
        return sum(getattr(self, name).ms for name in COMM_ITEMS)

    def accumulate(self, other: "Comm", times: float = 1.0) -> None:
        for name in COMM_ITEMS:
            c = getattr(other, name)
            if c.bytes or c.ms:
                getattr(self, name).add(c.bytes * times, c.ms * times / 1e3, c.link)

    def as_dict(self) -> dict:
        return {name: getattr(self, name).as_dict() for name in COMM_ITEMS} | {"total_ms": round(self.ms, 4)}


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


# Every dtype a GEMM can run in: a format's quantized dtype, or BF16 for what it leaves unquantized.
GEMM_DTYPES = frozenset({f.compute_dtype for f in quant_formats.FORMATS.values()} | {"bf16"})


@dataclass(frozen=True)
class Rates:
    """What one GPU achieves on this model: bytes/s, GEMM and attention FLOP/s, fixed latencies (seconds)."""

    hbm: float
    gemm: dict[str, float]  # a large GEMM in each compute dtype (fp4 / fp8 / bf16)
    gemm_half_rows: float  # a GEMM of M token rows takes as long as M + this many at the large-GEMM rate
    attention: float  # MLA decode attention
    context_attention: float  # prefill attention: R1/V3's dense FMHA, V3.2's sparse MQA (in the KV dtype)
    layer_s: float
    draft_s: float
    sms: int  # streaming multiprocessors: kernels of one CTA per row run this many rows at once

    @classmethod
    def of(cls, gpu: GPU, *, kv_cache_dtype: str) -> "Rates":
        attn_dtype = "fp8" if kv_cache_dtype == "fp8" else "bf16"  # FP8 KV runs FP8 MLA kernels (tech blog 3)
        peak = {d: gpu.peak_tflops(d) * 1e12 for d in GEMM_DTYPES}
        gemm = {d: p * gpu.compute_efficiency for d, p in peak.items()}
        return cls(gpu.hbm_tb_s * 1e12 * gpu.hbm_efficiency, gemm, gpu.gemm_half_rows,
                   peak[attn_dtype] * gpu.attention_efficiency,
                   peak[attn_dtype] * gpu.context_attention_efficiency, gpu.layer_overhead_us * 1e-6,
                   gpu.draft_overhead_us * 1e-6, gpu.sms)

    def gemm_seconds(self, params: dict[str, float], rows: float, gemms: float = 1.0) -> float:
        """Tensor-core time of ``gemms`` GEMMs of ``params`` weights each (by compute dtype) with ``rows`` token rows
        in all, each GEMM ``gemm_half_rows`` rows longer than it is (a grouped MoE GEMM with a few tokens per
        expert runs at a small share of the large-GEMM rate)."""
        return sum(2 * n * (rows + self.gemm_half_rows * gemms) / self.gemm[d] for d, n in params.items())


def topk_seconds(rows: float, scores: float, sms: int) -> float:
    """DSA's top-k of ``rows`` query rows of ``scores`` indexer scores each: waves of one row per SM."""
    return math.ceil(rows / sms) * (TOPK_ROW_S + scores * TOPK_S_PER_SCORE)


def expert_fraction_read(cfg: ModelConfig, tokens: float) -> float:
    """Expected share of a rank's routed experts that at least one of ``tokens`` selects (uniform routing)."""
    if not cfg.n_routed_experts or tokens <= 0:
        return 0.0
    return 1.0 - (1.0 - cfg.num_experts_per_tok / cfg.n_routed_experts) ** tokens


def attended_keys(cfg: ModelConfig, context: float) -> float:
    """Keys MLA attends per query: all of them, or the DSA indexer's top-k."""
    return min(context, cfg.index_topk) if cfg.has_indexer else context


def indexed_keys(cfg: ModelConfig, context: float) -> float:
    """Keys the DSA indexer scores per query: none up to ``index_topk`` (TensorRT-LLM's short-sequence fast path
    takes every key without scoring), all of them beyond."""
    return context if cfg.has_indexer and context > cfg.index_topk else 0.0


def mean_prefill_keys(cfg: ModelConfig, start: float, stop: float) -> tuple[float, float]:
    """Mean keys a prompt token at positions [start, stop) attends, and the indexer scores (causal)."""
    mean = (start + stop) / 2
    if not cfg.has_indexer:
        return mean, mean
    k = cfg.index_topk
    if stop <= k:
        return mean, 0.0
    if start >= k:
        return float(k), mean
    below = (start + k) / 2 * (k - start)  # tokens before position k attend their whole prefix, unscored
    return (below + k * (stop - k)) / (stop - start), (k + stop) / 2 * (stop - k) / (stop - start)


@dataclass
class StageTime:
    weights_ms: float = 0.0  # kernels bound by reading weights
    kv_ms: float = 0.0  # attention bound by reading the KV cache
    compute_ms: float = 0.0  # kernels bound by tensor-core throughput
    overhead_ms: float = 0.0  # latency-bound small kernels (layer / draft overheads)
    comm: Comm = field(default_factory=Comm)
    draft_ms: float = 0.0  # of the above, the MTP draft steps

    @property
    def memory_ms(self) -> float:
        return self.weights_ms + self.kv_ms

    @property
    def ms(self) -> float:
        return self.weights_ms + self.kv_ms + self.compute_ms + self.overhead_ms + self.comm.ms - self.comm.pp_p2p.ms

    def kernel(self, nbytes: float, compute_s: float, *, bw: float, reads: str = "weights") -> None:
        """A kernel: its bytes over bandwidth or its tensor-core time, whichever is longer."""
        mem, comp = nbytes / bw * 1e3, compute_s * 1e3
        if mem >= comp:
            if reads == "kv":
                self.kv_ms += mem
            else:
                self.weights_ms += mem
        else:
            self.compute_ms += comp


@dataclass(frozen=True)
class ModelShapes:
    """Parameters per rank of each kernel's weight, by the dtype its GEMM runs in (for FLOPs; bytes come from the
    rank's stored pieces). ``compute``: each linear's compute dtype (``WeightCatalog.compute_dtypes``)."""

    cfg: ModelConfig
    layout: Layout
    compute: dict[Kind, str]

    def _by_dtype(self, *parts: tuple[Kind, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, n in parts:
            if n:
                d = self.compute.get(kind, "bf16")
                out[d] = out.get(d, 0.0) + n
        return out

    @property
    def heads(self) -> float:
        return self.cfg.num_attention_heads / (1 if self.layout.attention_dp else self.layout.tp)

    @property
    def attention_params(self) -> dict[str, float]:
        c, h = self.cfg, self.heads
        parts = [(Kind.Q_A, c.hidden_size * c.q_lora_rank), (Kind.KV_A, c.hidden_size * (c.kv_lora_rank
                                                                                        + c.qk_rope_head_dim)),
                 (Kind.Q_B, h * c.q_lora_rank * c.qk_head_dim),
                 (Kind.KV_B, h * c.kv_lora_rank * (c.qk_nope_head_dim + c.v_head_dim)),
                 (Kind.O_PROJ, h * c.v_head_dim * c.hidden_size)]
        if c.has_indexer:
            parts += [(Kind.IDX_WQ_B, c.q_lora_rank * c.index_n_heads * c.index_head_dim),
                      (Kind.IDX_WK, c.hidden_size * c.index_head_dim),
                      (Kind.IDX_WEIGHTS, c.hidden_size * c.index_n_heads)]
        return self._by_dtype(*parts)

    def dense_mlp_params(self) -> dict[str, float]:
        c = self.cfg
        return self._by_dtype((Kind.DENSE_GATE, 3 * c.hidden_size * c.intermediate_size
                               / mlp_tp(c.intermediate_size, self.layout)))

    def shared_params(self) -> dict[str, float]:
        c = self.cfg
        shared = c.moe_intermediate_size * c.n_shared_experts
        return self._by_dtype((Kind.SHARED_GATE, 3 * c.hidden_size * shared / mlp_tp(shared, self.layout)
                               if shared else 0), (Kind.ROUTER, c.hidden_size * c.n_routed_experts))

    def expert_params(self) -> dict[str, float]:
        """One routed expert's parameters on the rank it lives on (split over MoE-TP)."""
        c = self.cfg
        return self._by_dtype((Kind.EXPERT_GATE, 3 * c.hidden_size * c.moe_intermediate_size / self.layout.moe_tp))

    def head_params(self) -> dict[str, float]:
        vocab = self.cfg.vocab_size / (1 if self.layout.attention_dp else self.layout.tp)
        return self._by_dtype((Kind.LM_HEAD, vocab * self.cfg.hidden_size))

    def eh_proj_params(self) -> dict[str, float]:
        return self._by_dtype((Kind.MTP_EH_PROJ, 2 * self.cfg.hidden_size ** 2))


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


def _layer(t: StageTime, shapes: ModelShapes, rates: Rates, place: PlaceBytes, *, moe: bool, tokens: float,
           own: float, seqs: float, keys: float, scored: float, kv_bytes_per_token_layer: float,
           prefill: bool) -> None:
    """One decoder layer on one rank. ``tokens``: query tokens of the TP group this step (every sequence's verified
    tokens, or prefill chunks), which meet in the MoE; ``own``: those through this rank's attention and MLPs (all
    of them under attention-TP); ``seqs``: sequences whose KV the rank reads (decode); ``keys``/``scored``: keys
    attended / scored by the indexer per query token; ``kv_bytes_per_token_layer``: the MLA latent and the DSA
    indexer key of one token in this layer's cache."""
    cfg = shapes.cfg
    idx_token_bytes = cfg.indexer_cache_bytes_per_token_per_layer
    latent_token_bytes = kv_bytes_per_token_layer - idx_token_bytes
    layout = shapes.layout
    bw = rates.hbm
    attn = rates.context_attention if prefill else rates.attention
    t.kernel(place.attention, rates.gemm_seconds(shapes.attention_params, own), bw=bw)
    if prefill and not cfg.has_indexer:  # MHA over up-projected keys (absorbed MQA only in decode)
        core_flops = 2 * own * shapes.heads * keys * (cfg.qk_head_dim + cfg.v_head_dim)
        kv_read = 0.0
    else:
        latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        core_flops = 2 * own * shapes.heads * keys * (latent + cfg.kv_lora_rank)
        # Decode reads each sequence's attended latents once; DSA's prefill gathers every query token's own top-k
        # (no key is shared by a tile of queries).
        kv_read = (own if prefill else seqs) * keys * latent_token_bytes
    if scored:  # the indexer: FP8 MQA logits over every scored key, then top-k selection per query
        core_flops += 2 * own * cfg.index_n_heads * cfg.index_head_dim * scored
        kv_read += 0.0 if prefill else seqs * scored * idx_token_bytes
    t.kernel(kv_read, core_flops / attn, bw=bw, reads="kv")
    if scored:
        t.compute_ms += topk_seconds(own, scored, rates.sms) * 1e3
    if moe:
        t.kernel(place.mlp, rates.gemm_seconds(shapes.shared_params(), own), bw=bw)
        touched = expert_fraction_read(cfg, tokens)
        # The rank's experts (an EP share, each split over MoE-TP) see the group's tokens times top-k over EP.
        pairs = tokens * cfg.num_experts_per_tok / layout.ep
        experts = cfg.n_routed_experts / layout.ep * touched
        t.kernel(place.experts * touched, rates.gemm_seconds(shapes.expert_params(), pairs, experts), bw=bw)
    else:
        t.kernel(place.mlp, rates.gemm_seconds(shapes.dense_mlp_params(), own), bw=bw)
    t.overhead_ms += rates.layer_s * 1e3


def _head(t: StageTime, shapes: ModelShapes, rates: Rates, place: PlaceBytes, *, own: float) -> None:
    t.kernel(place.head, rates.gemm_seconds(shapes.head_params(), own), bw=rates.hbm)


@dataclass
class DecodeEstimate:
    step_ms: float  # one step: every sequence in flight verifies its tokens and drafts the next ones
    stages: list[StageTime]
    microbatches: int
    bubble: float  # share of the step a stage waits (PP with fewer micro-batches than stages)
    comm: Comm  # summed over stages, per step
    tokens_per_step: float = 1.0  # accepted tokens per sequence per step (MTP acceptance; 1 without drafts)

    @property
    def tpot_ms(self) -> float:
        return self.step_ms / self.tokens_per_step

    @property
    def bound(self) -> str:
        worst = max(self.stages, key=lambda s: s.ms)
        parts = {"memory": worst.memory_ms, "compute": worst.compute_ms,
                 "communication": worst.comm.ms, "kernel latency": worst.overhead_ms}
        return max(parts, key=parts.get)


def decode_step(cfg: ModelConfig, layout: Layout, cluster: Cluster, place: Placement,
                weights: list[list[RankWeights]], *, batch: int, context: float, kv_bytes_per_token_layer: int,
                rates: Rates, compute_dtypes: dict[Kind, str], mtp_compute_dtypes: dict[Kind, str],
                speculation: Speculation = Speculation()) -> DecodeEstimate:
    """One decode step of a replica holding ``batch`` sequences at mean ``context`` (PP: ``pp`` micro-batches).
    ``compute_dtypes`` / ``mtp_compute_dtypes``: the GEMM dtype of each linear of the decoder layers / MTP layer."""
    m = max(1, min(batch, layout.pp))
    b = math.ceil(batch / m)
    k = speculation.draft_len
    shapes = ModelShapes(cfg, layout, compute_dtypes)
    mtp_shapes = ModelShapes(cfg, layout, mtp_compute_dtypes)
    stages = layout.stage_layers(cfg.num_hidden_layers)
    # Sequences through the busiest rank's attention: under attention-DP each rank runs its own, and the MoE waits
    # for the rank with the most (a lone request keeps one rank busy while the others wait).
    seqs_rank = math.ceil(b / layout.attention_dp_ranks)
    keys, scored = attended_keys(cfg, context), indexed_keys(cfg, context)
    out: list[StageTime] = []
    total = Comm()
    for s, layers in enumerate(stages):
        w = max(weights[s], key=lambda r: r.total)
        t = StageTime()
        for moe, n, placed in ((False, w.n_dense, w.dense_layer), (True, w.n_moe, w.moe_layer)):
            one = StageTime()
            if n:
                _layer(one, shapes, rates, placed, moe=moe, tokens=b * (k + 1), own=seqs_rank * (k + 1),
                       seqs=seqs_rank, keys=keys, scored=scored,
                       kv_bytes_per_token_layer=kv_bytes_per_token_layer, prefill=False)
            _add(t, one, n)
        last = s == layout.pp - 1
        if last:
            _head(t, shapes, rates, w.last, own=seqs_rank * (k + 1))
            if k:
                draft = StageTime()
                _layer(draft, mtp_shapes, rates, w.mtp_layer, moe=True, tokens=b, own=seqs_rank, seqs=seqs_rank,
                       keys=keys, scored=scored, kv_bytes_per_token_layer=kv_bytes_per_token_layer, prefill=False)
                draft.kernel(w.mtp_layer.mtp_eh_proj, rates.gemm_seconds(mtp_shapes.eh_proj_params(), seqs_rank),
                             bw=rates.hbm)
                _head(draft, shapes, rates, w.last, own=seqs_rank)
                draft.overhead_ms += rates.draft_s * 1e3
                draft.comm = _stage_comm(cfg, layout, place, tokens=b, n_layers=1, n_moe=1, first=False, last=True,
                                         per_token=False)
                _add(t, draft, k)
                t.draft_ms = draft.ms * k
        t.comm.accumulate(_stage_comm(cfg, layout, place, tokens=b * (k + 1), n_layers=len(layers),
                                      n_moe=w.n_moe, first=s == 0, last=last, per_token=False))
        if not last:
            p2p = b * (k + 1) * cfg.hidden_size * ACT_BYTES * 2  # hidden states and residual
            t.comm.pp_p2p.add(p2p, place.pp[s].seconds(p2p), place.pp[s])
        out.append(t)
        total.accumulate(t.comm, m)
    t_max = max(st.ms for st in out)
    chain = sum(st.ms for st in out) + sum(st.comm.pp_p2p.ms for st in out)
    step = max(m * t_max, chain)
    bubble = 1 - (m * sum(st.ms for st in out) / layout.pp) / step if layout.pp > 1 else 0.0
    return DecodeEstimate(step, out, m, max(0.0, bubble), total, speculation.tokens_per_step)


def _add(total: StageTime, part: StageTime, times: float) -> None:
    total.weights_ms += part.weights_ms * times
    total.kv_ms += part.kv_ms * times
    total.compute_ms += part.compute_ms * times
    total.overhead_ms += part.overhead_ms * times
    total.comm.accumulate(part.comm, times)


@dataclass
class PrefillEstimate:
    tokens_per_s: float  # one replica, many requests in flight (stages pipelined across requests)
    ttft_ms: float  # one request of isl tokens on an idle replica
    bubble: float  # (p-1)/(c+p-1) for that request's c chunks
    comm_per_token: Comm


def prefill(cfg: ModelConfig, layout: Layout, cluster: Cluster, place: Placement,
            weights: list[list[RankWeights]], *, isl: int, max_num_tokens: int, kv_bytes_per_token_layer: int,
            rates: Rates, compute_dtypes: dict[Kind, str]) -> PrefillEstimate:
    """Prompts in chunks of up to ``max_num_tokens`` tokens. Throughput: each rank's chunks (every attention-DP
    rank prefills its own requests) as a steady stream; TTFT: one prompt's chunks in order on an idle replica."""
    shapes = ModelShapes(cfg, layout, compute_dtypes)
    stages = layout.stage_layers(cfg.num_hidden_layers)
    chunks = max(1, math.ceil(isl / max_num_tokens))
    chunk = isl / chunks
    share = layout.attention_dp_ranks  # chunks in flight per TP group

    def chunk_times(start: float, group: float, own: float) -> list[StageTime]:
        """Per stage, one chunk position's forward: ``group`` tokens meet in the MoE, ``own`` per rank."""
        keys, scored = mean_prefill_keys(cfg, start, start + chunk)
        out = []
        for s, layers in enumerate(stages):
            w = max(weights[s], key=lambda r: r.total)
            t = StageTime()
            for moe, n, placed in ((False, w.n_dense, w.dense_layer), (True, w.n_moe, w.moe_layer)):
                one = StageTime()
                if n:
                    _layer(one, shapes, rates, placed, moe=moe, tokens=group, own=own, seqs=0, keys=keys,
                           scored=scored, kv_bytes_per_token_layer=kv_bytes_per_token_layer, prefill=True)
                _add(t, one, n)
            t.comm.accumulate(_stage_comm(cfg, layout, place, tokens=group, n_layers=len(layers),
                                          n_moe=w.n_moe, first=s == 0, last=False, per_token=True))
            if s < layout.pp - 1:
                p2p = own * cfg.hidden_size * ACT_BYTES * 2
                t.comm.pp_p2p.add(p2p, place.pp[s].seconds(p2p, steps=0), place.pp[s])
            out.append(t)
        return out

    # Throughput: every rank of the group works on its own chunks; TTFT: one prompt, alone on the replica.
    busy = [chunk_times(i * chunk, chunk * share, chunk) for i in range(chunks)]
    alone = busy if share == 1 else [chunk_times(i * chunk, chunk, chunk) for i in range(chunks)]
    stage_ms = [max(st.ms for st in c) for c in busy]
    ttft = sum(st.ms for st in alone[0]) + sum(max(st.ms for st in c) for c in alone[1:])
    per_token = Comm()
    for c in busy:
        for st in c:
            per_token.accumulate(st.comm, 1 / (isl * share))
    tokens_per_s = isl * share / (sum(stage_ms) / 1e3)
    bubble = (layout.pp - 1) / (chunks + layout.pp - 1)
    return PrefillEstimate(tokens_per_s, ttft, bubble, per_token)
