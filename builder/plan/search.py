"""Evaluate parallel layouts on a cluster and rank them: ``plan_cluster`` is the planner's Python API.

A layout is TP x PP (one model replica on ``tp * pp`` GPUs), EP inside each TP group, attention-DP on or off, and
as many replicas (plain data parallelism) as the cluster holds. Dimensions the caller fixes are kept; the others
are searched over every value whose product divides the cluster's GPU count.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.errors import LayoutError, SpecError
from builder.model.config import ModelConfig
from builder.plan import memory as mem
from builder.plan.hardware import FP8_KV_ARCHS, Cluster, HardwareTable, load_hardware
from builder.plan.perf import DecodeEstimate, Placement, PrefillEstimate, decode_step, prefill
from builder.layout import Layout
from quantize import registry as quant_formats

GIB = 1 << 30


@dataclass(frozen=True)
class Workload:
    isl: int = 1024
    osl: int = 1024
    concurrency: int = 64  # whole deployment
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    mtp: bool = False  # MTP speculative decoding on: the MTP layer's KV cache counts too

    @property
    def seq_len(self) -> int:
        return self.isl + self.osl

    @property
    def decode_context(self) -> float:
        """Mean context length over a request's decode steps."""
        return self.isl + self.osl / 2


@dataclass(eq=False)  # identity: plans are keys of dicts (table/plot grouping)
class LayoutPlan:
    layout: Layout
    replicas: int
    requested: bool = False
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    weights_per_stage: list[int] = field(default_factory=list)  # max over the stage's TP ranks
    weights_per_rank: list[int] = field(default_factory=list)  # global rank order: pp_rank * tp + tp_rank
    stage_layer_counts: list[int] = field(default_factory=list)
    activations: int = 0
    reserve: int = 0
    kv_pool: int = 0
    kv_bytes_per_token: int = 0  # on the fullest stage's GPU
    kv_used: int = 0
    max_seqs_replica: int = 0
    batch: int = 0
    decode: DecodeEstimate | None = None
    prefill: PrefillEstimate | None = None
    meets_slo: bool = True
    links: dict[str, str] = field(default_factory=dict)
    capacity: int = 0

    @property
    def feasible(self) -> bool:
        return not self.reasons

    @property
    def gpus_per_replica(self) -> int:
        return self.layout.world_size

    @property
    def gpus(self) -> int:
        return self.gpus_per_replica * self.replicas

    @property
    def name(self) -> str:
        return self.layout.name + (f"x{self.replicas}" if self.replicas > 1 else "")

    @property
    def tokens_per_s_replica(self) -> float:
        """Output tokens/s of one replica serving ``batch`` requests continuously: each request costs its share of
        decode steps plus its prefill, which stalls the batch while it runs (in-flight batching)."""
        if not self.decode or not self.prefill or not self.batch:
            return 0.0
        wl = self._workload
        step = self.decode.step_ms / 1e3
        return self.batch * wl.osl / (wl.osl * step + self.batch * wl.isl / self.prefill.tokens_per_s)

    _workload: Workload = field(default_factory=Workload, repr=False)

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_s_replica / self.gpus_per_replica

    @property
    def tokens_per_s_per_user(self) -> float:
        return 1e3 / self.decode.step_ms if self.decode else 0.0

    def sort_key(self) -> tuple:
        """Feasible first, then meeting the latency limits, throughput per GPU, speed per user, simplicity;
        infeasible layouts by how close they come (fewest weight bytes per GPU)."""
        if not self.feasible:
            return (True, len(self.weights_per_stage) == 0, max(self.weights_per_stage or [0]), self.layout.tp,
                    self.layout.pp)
        return (False, not self.meets_slo, -round(self.tokens_per_s_per_gpu, 6),
                -round(self.tokens_per_s_per_user, 6), self.layout.pp, self.layout.tp, self.layout.attention_dp,
                -self.layout.ep)

    def to_dict(self) -> dict[str, Any]:
        lay = self.layout
        worst = max(range(len(self.weights_per_stage)), key=lambda s: self.weights_per_stage[s]) \
            if self.weights_per_stage else None
        weights = self.weights_per_stage[worst] if worst is not None else 0
        memory = None
        if self.weights_per_stage:
            memory = {k: round(v / GIB, 3) for k, v in (
                ("weights", weights), ("kv_cache", self.kv_used), ("activations", self.activations),
                ("reserve", self.reserve), ("total", weights + self.kv_used + self.activations + self.reserve),
                ("kv_pool", self.kv_pool), ("capacity", self.capacity))}
        d = self.decode
        out: dict[str, Any] = {
            "name": self.name, "tp": lay.tp, "pp": lay.pp, "ep": lay.ep, "moe_tp": lay.moe_tp,
            "attention_dp": lay.attention_dp, "replicas": self.replicas, "gpus": self.gpus,
            "gpus_per_replica": self.gpus_per_replica, "requested": self.requested, "feasible": self.feasible,
            "reasons": list(self.reasons), "warnings": list(self.warnings), "meets_slo": self.meets_slo,
            "memory_per_gpu_gib": memory,
            "weights_per_stage_gib": [round(w / GIB, 3) for w in self.weights_per_stage],
            "weights_per_rank_bytes": list(self.weights_per_rank),
            "stage_layers": self.stage_layer_counts,
            "kv_bytes_per_token_per_gpu": self.kv_bytes_per_token,
            "max_concurrent_sequences": self.max_seqs_replica * self.replicas,
            "max_concurrent_sequences_per_replica": self.max_seqs_replica,
            "batch_per_replica": self.batch,
            "decode_step_ms": round(d.step_ms, 4) if d else None,
            "ttft_ms": round(self.prefill.ttft_ms, 3) if self.prefill else None,
            "tokens_per_s_per_gpu": round(self.tokens_per_s_per_gpu, 3),
            "tokens_per_s_per_user": round(self.tokens_per_s_per_user, 3),
            "tokens_per_s": round(self.tokens_per_s_replica * self.replicas, 3),
            "decode_tokens_per_s_per_gpu": round(self.batch / (d.step_ms / 1e3) / self.gpus_per_replica, 3) if d else 0.0,
            "prefill_tokens_per_s_per_gpu": round(self.prefill.tokens_per_s / self.gpus_per_replica, 3)
            if self.prefill else None,
            "bound": d.bound if d else None,
            "decode_breakdown_ms": _breakdown(d) if d else None,
            "pipeline_bubble": {"prefill": round(self.prefill.bubble, 4) if self.prefill else None,
                                "decode": round(d.bubble, 4) if d else None},
            "comm": {"decode_step": d.comm.as_dict() if d else None,
                     "prefill_token": self.prefill.comm_per_token.as_dict() if self.prefill else None},
            "links": dict(self.links),
        }
        return out


def _breakdown(d: DecodeEstimate) -> dict[str, float]:
    worst = max(d.stages, key=lambda s: s.ms)
    return {"weights_read": round(worst.weights_ms, 4), "kv_read": round(worst.kv_ms, 4),
            "compute": round(worst.compute_ms, 4), "comm": round(worst.comm.ms, 4),
            "kernel_latency": round(worst.overhead_ms, 4),
            "stage": round(worst.ms, 4), "microbatches": d.microbatches}


@dataclass
class PlanResult:
    model: str
    cfg: ModelConfig
    cluster: Cluster
    quant: str
    kv_cache_dtype: str
    workload: Workload
    layouts: list[LayoutPlan]
    searched: bool
    elapsed_s: float
    fixed: dict[str, Any]

    @property
    def recommended(self) -> LayoutPlan | None:
        best = self.layouts[0] if self.layouts else None
        return best if best is not None and best.feasible else None

    @property
    def requested(self) -> LayoutPlan | None:
        return next((lp for lp in self.layouts if lp.requested), None)

    def to_dict(self) -> dict[str, Any]:
        from builder.plan.explain import rationale

        g, n = self.cluster.gpu, self.cluster.network
        rec = self.recommended
        req = self.requested
        return {
            "model": self.model,
            "hardware": {"gpu": g.name, "arch": g.arch, "memory_gib": round(g.memory_gib, 2), "hbm_tb_s": g.hbm_tb_s,
                         "scale_up": g.scale_up, "scale_up_gb_s": g.scale_up_gb_s, "network": n.name,
                         "network_gb_s": n.gb_s},
            "cluster": {"nodes": self.cluster.nodes, "gpus_per_node": self.cluster.gpus_per_node,
                        "gpus": self.cluster.gpus},
            "quant": self.quant, "kv_cache_dtype": self.kv_cache_dtype,
            "workload": {"isl": self.workload.isl, "osl": self.workload.osl,
                         "concurrency": self.workload.concurrency, "ttft_ms": self.workload.ttft_ms,
                         "tpot_ms": self.workload.tpot_ms},
            "model_weights_gib": round(mem.weight_catalog(self.cfg, self.quant).total_bytes / GIB, 3),
            "fixed": self.fixed, "searched": self.searched,
            "feasible_count": sum(lp.feasible for lp in self.layouts), "elapsed_s": round(self.elapsed_s, 4),
            "layouts": [lp.to_dict() for lp in self.layouts],
            "recommended": rec.to_dict() if rec else None,
            "requested": req.to_dict() if req else None,
            "rationale": rationale(self),
        }


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg: ModelConfig, gpus: int, *, tp: int | None, pp: int | None, ep: int | None,
                      attention_dp: bool | None) -> list[Layout]:
    """Every layout with the fixed dimensions kept and TP x PP dividing the cluster (a fixed TP x PP is taken
    as given, even if it does not fit: the evaluation says why)."""
    if tp is not None and pp is not None:
        tps, pps_of = [tp], (lambda t: [pp])
    else:
        tps = [tp] if tp is not None else _divisors(gpus)
        pps_of = (lambda t: [pp]) if pp is not None else \
            (lambda t: [p for p in _divisors(max(gpus // t, 1)) if p <= cfg.num_hidden_layers] if gpus % t == 0 else [1])
    out = []
    for t in tps:
        for p in pps_of(t):
            for e in ([ep] if ep is not None else _divisors(t)):
                adps = [attention_dp] if attention_dp is not None else ([False, True] if t > 1 else [False])
                out.extend(Layout(tp=t, pp=p, ep=e, attention_dp=a) for a in adps)
    return out


def evaluate_layout(cfg: ModelConfig, layout: Layout, cluster: Cluster, *, quant: str, kv_cache_dtype: str,
                    workload: Workload, catalog: mem.WeightCatalog) -> LayoutPlan:
    gpu = cluster.gpu
    world = layout.world_size
    replicas = max(1, cluster.gpus // world)
    lp = LayoutPlan(layout=layout, replicas=replicas, _workload=workload)
    lp.capacity = gpu.memory_bytes
    refusal = quant_formats.get(quant).refusal(gpu=gpu.name, arch=gpu.arch)
    if refusal:
        lp.reasons.append(refusal)
    if kv_cache_dtype == "fp8" and gpu.arch not in FP8_KV_ARCHS:
        lp.reasons.append(f"an FP8 KV cache needs FP8 support; {gpu.name} ({gpu.arch}) has none (use --kv-cache-dtype bf16)")
    if world > cluster.gpus:
        lp.reasons.append(f"the layout needs {world} GPUs (TP {layout.tp} x PP {layout.pp}); the cluster has "
                          f"{cluster.gpus}")
    elif cluster.gpus % world:
        lp.warnings.append(f"{cluster.gpus % world} of {cluster.gpus} GPUs stay idle ({replicas} replica(s) of {world})")
    try:
        weights = mem.stage_weights(catalog, layout)
    except LayoutError as exc:
        lp.reasons.append(str(exc))
        return lp
    stages = layout.stage_layers(cfg.num_hidden_layers)
    lp.stage_layer_counts = [len(s) + (len(cfg.mtp_layers) if i == layout.pp - 1 and catalog.mtp_layers else 0)
                             for i, s in enumerate(stages)]
    lp.weights_per_stage = [max(r.total for r in row) for row in weights]
    lp.weights_per_rank = [r.total for row in weights for r in row]
    place = Placement.of(cluster, layout)
    lp.links = {"tp": place.tp.kind, "pp": ",".join(sorted({link.kind for link in place.pp})) or "none"}
    if place.tp.kind not in ("none", gpu.scale_up) and not layout.attention_dp:
        lp.warnings.append(f"TP {layout.tp} spans nodes ({cluster.gpus_per_node} GPUs per node): every layer's "
                           f"all-reduces cross {place.tp.kind} — communication-bound")
    elif place.tp.kind not in ("none", gpu.scale_up):
        lp.warnings.append(f"the EP {layout.tp} all-to-all of attention-DP spans nodes over {place.tp.kind}")
    elif place.tp.kind == "pcie" and layout.tp > 2:
        lp.warnings.append(f"TP {layout.tp} over PCIe (no NVLink on {gpu.name}): all-reduces are communication-bound")

    # Memory: the KV pool is what is left after weights, activations and the runtime's own use, of which
    # TensorRT-LLM takes free_gpu_memory_fraction.
    per_layer = mem.kv_bytes_per_token_per_layer(cfg, kv_cache_dtype)
    seq_tokens = mem.tokens_in_cache(workload.seq_len)
    act = mem.activation_bytes(cfg, layout, batch=min(workload.concurrency, 2048), context=workload.isl)
    fixed_reserve = int(gpu.runtime_reserve_gib * GIB)
    lp.activations = act
    seqs = []
    pools = []
    for s, w in enumerate(lp.weights_per_stage):
        free = gpu.memory_bytes - w - act - fixed_reserve
        if free <= 0:
            lp.reasons.append(
                f"out of memory on PP stage {s}: weights {w / GIB:.1f} GiB + activations {act / GIB:.1f} GiB + "
                f"runtime {gpu.runtime_reserve_gib:.1f} GiB exceed the {gpu.memory_gib:.1f} GiB of a {gpu.name}")
            pools.append(0)
            seqs.append(0)
            continue
        pool = int(free * mem.FREE_GPU_MEMORY_FRACTION)
        pools.append(pool)
        layers = len(stages[s]) + (len(cfg.mtp_layers) if workload.mtp and s == layout.pp - 1 else 0)
        per_token = layers * per_layer
        per_rank = pool // (per_token * seq_tokens)
        seqs.append(per_rank * (layout.tp if layout.attention_dp else 1))
    worst = max(range(layout.pp), key=lambda s: lp.weights_per_stage[s])
    lp.kv_pool = pools[worst]
    lp.reserve = fixed_reserve + max(0, gpu.memory_bytes - lp.weights_per_stage[worst] - act - fixed_reserve
                                     - lp.kv_pool)
    lp.kv_bytes_per_token = (len(stages[worst]) + (len(cfg.mtp_layers) if workload.mtp and worst == layout.pp - 1
                                                   else 0)) * per_layer
    lp.max_seqs_replica = min(seqs)
    if lp.feasible and lp.max_seqs_replica < 1:
        need = lp.kv_bytes_per_token * seq_tokens
        lp.reasons.append(f"the KV cache holds no sequence of {workload.seq_len} tokens: a sequence needs "
                          f"{need / GIB:.2f} GiB per GPU, the pool is {min(pools) / GIB:.2f} GiB")
    if not lp.feasible:
        return lp

    compute = quant_formats.get(quant).compute_dtype
    context = workload.decode_context

    def step(batch: int) -> DecodeEstimate:
        return decode_step(cfg, layout, cluster, place, weights, batch=batch, context=context,
                           kv_bytes_per_token_layer=per_layer, compute_dtype=compute)

    target = math.ceil(workload.concurrency / replicas)
    batch = min(target, lp.max_seqs_replica)
    if batch < target:
        lp.warnings.append(f"the KV cache holds {lp.max_seqs_replica} sequences of {workload.seq_len} tokens per "
                           f"replica, fewer than the {target} asked for")
    est = step(batch)
    if workload.tpot_ms is not None and est.step_ms > workload.tpot_ms:
        lo, hi = 1, batch  # the largest batch whose step meets the TPOT limit (step time grows with batch)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if step(mid).step_ms <= workload.tpot_ms:
                lo = mid
            else:
                hi = mid - 1
        batch, est = lo, step(lo)
        if est.step_ms > workload.tpot_ms:
            lp.meets_slo = False
            lp.warnings.append(f"TPOT {est.step_ms:.1f} ms exceeds the {workload.tpot_ms:g} ms limit even at batch 1")
        else:
            lp.warnings.append(f"batch per replica lowered to {batch} to meet TPOT {workload.tpot_ms:g} ms")
    lp.batch = batch
    lp.decode = est
    worst = max(est.stages, key=lambda st: st.ms)
    if worst.comm.ms > 0.3 * worst.ms and not any("communication-bound" in w for w in lp.warnings):
        lp.warnings.append(f"communication-bound: collectives take {worst.comm.ms / worst.ms:.0%} of a decode step")
    lp.kv_used = math.ceil(batch / (layout.tp if layout.attention_dp else 1)) * seq_tokens * lp.kv_bytes_per_token
    lp.prefill = prefill(cfg, layout, cluster, place, weights, isl=workload.isl, compute_dtype=compute)
    if workload.ttft_ms is not None and lp.prefill.ttft_ms > workload.ttft_ms:
        lp.meets_slo = False
        lp.warnings.append(f"TTFT {lp.prefill.ttft_ms:.0f} ms exceeds the {workload.ttft_ms:g} ms limit")
    return lp


def plan_cluster(*, model: str | ModelConfig, gpu: str | None = None, nodes: int = 1,
                 gpus_per_node: int | None = None, network: str = "ib-ndr", hardware_file: str | Path | None = None,
                 hardware: HardwareTable | None = None, quant: str = "fp8", kv_cache_dtype: str = "fp8",
                 isl: int = 1024, osl: int = 1024, concurrency: int = 64, ttft_ms: float | None = None,
                 tpot_ms: float | None = None, tp: int | None = None, pp: int | None = None, ep: int | None = None,
                 attention_dp: bool | None = None, include_mtp: bool = True, mtp: bool = False,
                 requested: Layout | None = None) -> PlanResult:
    """Evaluate and rank the layouts of ``model`` on ``nodes`` x ``gpus_per_node`` ``gpu``s.

    Fixed ``tp``/``pp``/``ep``/``attention_dp`` restrict the search (all four: that one layout). ``requested``
    adds a layout (the one a pipeline run will build) and marks it. ``gpu=None`` is the ``cpu`` profile, whose
    host by default has exactly the ranks of the fixed TP x PP. ``include_mtp``: the MTP module's weights are
    loaded; ``mtp``: MTP speculative decoding runs (its layer's KV cache counts).
    """
    from builder.model.source import resolve_model

    cfg = model if isinstance(model, ModelConfig) else resolve_model(model).config
    t0 = time.perf_counter()  # the search itself (resolving 'tiny' imports torch once)
    name = model if isinstance(model, str) else cfg.model_type
    table = hardware or load_hardware(hardware_file)
    g = table.gpu(gpu or "cpu")
    fixed_world = (tp * pp) if tp is not None and pp is not None else \
        (requested.tp * requested.pp if requested is not None else None)
    per_node = gpus_per_node or (fixed_world if g.arch == "cpu" and fixed_world else g.gpus_per_node)
    cluster = Cluster(g, table.network(network), nodes, per_node)
    for what, v in (("isl", isl), ("osl", osl), ("concurrency", concurrency), ("nodes", nodes)):
        if v < 1:
            raise SpecError(f"{what} must be at least 1, got {v}")
    if kv_cache_dtype not in mem.KV_DTYPE_BYTES:
        raise SpecError(f"unknown KV-cache dtype {kv_cache_dtype!r}; choose one of {sorted(mem.KV_DTYPE_BYTES)}")
    if quant not in quant_formats.FORMATS:
        raise SpecError(f"unknown quantization mode {quant!r}; choose one of {', '.join(quant_formats.NAMES)}")
    workload = Workload(isl, osl, concurrency, ttft_ms, tpot_ms, mtp)
    catalog = mem.weight_catalog(cfg, quant, include_mtp=include_mtp)
    layouts = candidate_layouts(cfg, cluster.gpus, tp=tp, pp=pp, ep=ep, attention_dp=attention_dp)
    if requested is not None and requested not in layouts:
        layouts.append(requested)
    plans = []
    for layout in layouts:
        lp = evaluate_layout(cfg, layout, cluster, quant=quant, kv_cache_dtype=kv_cache_dtype, workload=workload,
                             catalog=catalog)
        lp.requested = requested is not None and layout == requested
        plans.append(lp)
    plans.sort(key=LayoutPlan.sort_key)
    fixed = {k: v for k, v in (("tp", tp), ("pp", pp), ("ep", ep), ("attention_dp", attention_dp)) if v is not None}
    return PlanResult(name, cfg, cluster, quant, kv_cache_dtype, workload, plans, searched=len(fixed) < 4,
                      elapsed_s=time.perf_counter() - t0, fixed=fixed)
