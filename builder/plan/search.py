"""Evaluate parallel layouts on a cluster and rank them: ``plan_cluster`` is the planner's Python API.

A layout is TP x PP (one model replica on ``tp * pp`` GPUs), EP inside each TP group, attention-DP on or off, and
as many replicas (plain data parallelism) as the cluster holds. Dimensions the caller fixes are kept; the others
are searched over every value whose product divides the cluster's GPU count.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from builder.errors import LayoutError, SpecError
from builder.layout import Layout
from builder.model.config import ModelConfig
from builder.model.source import resolve_model
import builder.plan.memory as mem
from builder.plan.explain import rationale
from builder.plan.hardware import FP8_KV_ARCHS, Cluster, HardwareTable, load_hardware
from builder.plan.perf import DecodeEstimate, Placement, Rates, Speculation, decode_step, prefill
from builder.plan.result import LayoutPlan, PlanResult, Workload
from builder.trtllm.llm_api import max_num_tokens_for
from quantize import registry as quant_formats

GIB = 1 << 30


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


def batch_limits(workload: Workload, layout: Layout, replicas: int) -> tuple[int, int]:
    """(max_batch_size per attention-DP rank, max_num_tokens): the workload's, else what dsbuild's llm_api.yaml
    sets for this concurrency (TensorRT-LLM's default batch limit when the concurrency is open)."""
    dp = layout.tp if layout.attention_dp else 1
    if workload.max_batch_size is not None:
        mbs = workload.max_batch_size
    elif workload.concurrency is not None:
        mbs = max(1, math.ceil(workload.concurrency / replicas / dp))
    else:
        mbs = mem.MAX_BATCH_SIZE
    tokens = workload.max_num_tokens or max_num_tokens_for(isl=workload.isl, max_batch_size=mbs,
                                                           draft_len=workload.speculation.draft_len)
    return mbs, tokens


def evaluate_layout(cfg: ModelConfig, layout: Layout, cluster: Cluster, *, quant: str, kv_cache_dtype: str,
                    workload: Workload, catalog: mem.WeightCatalog, hardware: HardwareTable | None = None) -> LayoutPlan:
    gpu = cluster.gpu
    world = layout.world_size
    replicas = max(1, cluster.gpus // world)
    spec = workload.speculation
    lp = LayoutPlan(layout=layout, replicas=replicas, workload=workload,
                    runtime="reference" if gpu.arch == "cpu" else "tensorrt-llm")
    lp.capacity = gpu.memory_bytes
    refusal = (hardware or load_hardware()).quant_refusal(quant, gpu)
    if refusal:  # the quantize stage refuses it too: no --allow-infeasible makes it buildable
        lp.refuse(refusal, buildable=False)
    if kv_cache_dtype == "fp8" and gpu.arch not in FP8_KV_ARCHS:
        lp.reasons.append(f"an FP8 KV cache needs FP8 support; {gpu.name} ({gpu.arch}) has none (use --kv-cache-dtype bf16)")
    if spec.draft_len and not catalog.mtp_layers:
        lp.reasons.append("MTP decoding needs the model's MTP module, which this plan leaves out (drop --skip-mtp)")
    if world > cluster.gpus:
        lp.reasons.append(f"the layout needs {world} GPUs (TP {layout.tp} x PP {layout.pp}); the cluster has "
                          f"{cluster.gpus}")
    elif cluster.gpus % world:
        lp.warnings.append(f"{cluster.gpus % world} of {cluster.gpus} GPUs stay idle ({replicas} replica(s) of {world})")
    try:
        weights = mem.stage_weights(catalog, layout)
    except LayoutError as exc:  # the sharding rules' own check: the build stage refuses it too
        lp.refuse(str(exc), buildable=False)
        return lp
    stages = layout.stage_layers(cfg.num_hidden_layers)
    mtp_on_last = len(catalog.mtp_layers) if catalog.mtp_layers and (spec.draft_len or lp.runtime == "reference") \
        else 0
    lp.stage_layer_counts = [len(s) + (mtp_on_last if i == layout.pp - 1 else 0) for i, s in enumerate(stages)]
    lp.weights_per_rank = [r.total for row in weights for r in row]
    if lp.runtime == "tensorrt-llm":
        held = [[mem.trtllm_rank_bytes(catalog, layout, r, stage=s, mtp=bool(spec.draft_len), blackwell=gpu.blackwell)
                 for r in row] for s, row in enumerate(weights)]
        lp.runtime_weights_per_rank = [h.total for row in held for h in row]
        fullest = max((h for row in held for h in row), key=lambda h: h.total)
        lp.runtime_weight_detail = fullest.as_dict()
    else:
        lp.runtime_weights_per_rank = list(lp.weights_per_rank)
    lp.weights_per_stage = [max(lp.runtime_weights_per_rank[s * layout.tp:(s + 1) * layout.tp])
                            for s in range(layout.pp)]
    place = Placement.of(cluster, layout)
    lp.links = {"tp": place.tp.kind, "pp": ",".join(sorted({link.kind for link in place.pp})) or "none"}
    if place.tp.kind not in ("none", gpu.scale_up) and not layout.attention_dp:
        lp.warnings.append(f"TP {layout.tp} spans nodes ({cluster.gpus_per_node} GPUs per node): every layer's "
                           f"all-reduces cross {place.tp.kind} — communication-bound")
    elif place.tp.kind not in ("none", gpu.scale_up):
        lp.warnings.append(f"the EP {layout.tp} all-to-all of attention-DP spans nodes over {place.tp.kind}")
    elif place.tp.kind == "pcie" and layout.tp > 2:
        lp.warnings.append(f"TP {layout.tp} over PCIe (no NVLink on {gpu.name}): all-reduces are communication-bound")

    # Memory: TensorRT-LLM's KV pool is free_gpu_memory_fraction of what the profiling forward (weights,
    # activations at max_num_tokens, runtime) leaves.
    lp.max_batch_size, lp.max_num_tokens = batch_limits(workload, layout, replicas)
    dp = layout.tp if layout.attention_dp else 1
    per_layer = mem.kv_bytes_per_token_per_layer(cfg, kv_cache_dtype)
    seq_tokens = mem.tokens_in_cache(workload.seq_len + spec.draft_len)
    act = mem.activation_bytes(cfg, layout, batch=min(lp.max_batch_size, lp.max_num_tokens), context=workload.isl,
                               max_num_tokens=lp.max_num_tokens)
    fixed_reserve = int(gpu.runtime_reserve_gib * GIB)
    lp.activations = act
    kv_layers = [len(stages[s]) + (len(cfg.mtp_layers) if spec.draft_len and s == layout.pp - 1 else 0)
                 for s in range(layout.pp)]
    seqs, pools = [], []
    for s, w in enumerate(lp.weights_per_stage):
        free = gpu.memory_bytes - w - act - fixed_reserve
        if free <= 0:
            lp.reasons.append(
                f"out of memory on PP stage {s}: weights {w / GIB:.1f} GiB + activations {act / GIB:.1f} GiB + "
                f"runtime {gpu.runtime_reserve_gib:.1f} GiB exceed the {gpu.memory_gib:.1f} GiB of a {gpu.name}")
            pools.append(0)
            seqs.append(0)
            continue
        pool = int(free * workload.free_gpu_memory_fraction)
        pools.append(pool)
        seqs.append(pool // (kv_layers[s] * per_layer * seq_tokens) * dp)
    worst = max(range(layout.pp), key=lambda s: lp.weights_per_stage[s])
    lp.kv_pool = pools[worst]
    lp.reserve = fixed_reserve + max(0, gpu.memory_bytes - lp.weights_per_stage[worst] - act - fixed_reserve
                                     - lp.kv_pool)
    lp.kv_bytes_per_token = kv_layers[worst] * per_layer
    lp.max_seqs_replica = min(seqs)
    if lp.feasible and lp.max_seqs_replica < 1:
        need = lp.kv_bytes_per_token * seq_tokens
        lp.reasons.append(f"the KV cache holds no sequence of {workload.seq_len} tokens: a sequence needs "
                          f"{need / GIB:.2f} GiB per GPU, the pool is {min(pools) / GIB:.2f} GiB")
    if not lp.feasible:
        return lp

    rates = Rates.of(gpu, kv_cache_dtype=kv_cache_dtype)
    context = workload.decode_context

    def step(batch: int) -> DecodeEstimate:
        return decode_step(cfg, layout, cluster, place, weights, batch=batch, context=context,
                           kv_bytes_per_token_layer=per_layer, rates=rates, compute_dtypes=catalog.compute_dtypes,
                           mtp_compute_dtypes=catalog.mtp_compute_dtypes, speculation=spec)

    scheduled = lp.max_batch_size * dp
    target = math.ceil(workload.concurrency / replicas) if workload.concurrency is not None else scheduled
    batch = min(target, scheduled, lp.max_seqs_replica)
    if batch < target and (workload.concurrency is not None or batch < scheduled):
        why = f"the KV cache holds {lp.max_seqs_replica} sequences of {workload.seq_len} tokens per replica" \
            if lp.max_seqs_replica < min(target, scheduled) else \
            f"max_batch_size {lp.max_batch_size} per rank schedules {scheduled} sequences per replica"
        lp.warnings.append(f"{why}, fewer than the {target} " + ("asked for" if workload.concurrency is not None
                                                                   else "the scheduler would run"))
    est = step(batch)
    if workload.tpot_ms is not None and est.tpot_ms > workload.tpot_ms:
        lo, hi = 1, batch  # the largest batch whose TPOT meets the limit (step time grows with batch)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if step(mid).tpot_ms <= workload.tpot_ms:
                lo = mid
            else:
                hi = mid - 1
        batch, est = lo, step(lo)
        if est.tpot_ms > workload.tpot_ms:
            lp.meets_slo = False
            lp.warnings.append(f"TPOT {est.tpot_ms:.1f} ms exceeds the {workload.tpot_ms:g} ms limit even at batch 1")
        else:
            lp.warnings.append(f"batch per replica lowered to {batch} to meet TPOT {workload.tpot_ms:g} ms")
    lp.batch = batch
    lp.decode = est
    worst_stage = max(est.stages, key=lambda st: st.ms)
    if worst_stage.comm.ms > 0.3 * worst_stage.ms and not any("communication-bound" in w for w in lp.warnings):
        lp.warnings.append(f"communication-bound: collectives take {worst_stage.comm.ms / worst_stage.ms:.0%} of a "
                           "decode step")
    lp.kv_used = math.ceil(batch / dp) * seq_tokens * lp.kv_bytes_per_token
    lp.prefill = prefill(cfg, layout, cluster, place, weights, isl=workload.isl, max_num_tokens=lp.max_num_tokens,
                         kv_bytes_per_token_layer=per_layer, rates=rates, compute_dtypes=catalog.compute_dtypes)
    if workload.ttft_ms is not None and lp.prefill.ttft_ms > workload.ttft_ms:
        lp.meets_slo = False
        lp.warnings.append(f"TTFT {lp.prefill.ttft_ms:.0f} ms exceeds the {workload.ttft_ms:g} ms limit")
    return lp


def plan_cluster(*, model: str | ModelConfig, gpu: str | None = None, nodes: int = 1,
                 gpus_per_node: int | None = None, network: str = "ib-ndr", hardware_file: str | Path | None = None,
                 hardware: HardwareTable | None = None, quant: str = "fp8", kv_cache_dtype: str = "fp8",
                 isl: int = 1024, osl: int = 1024, concurrency: int | None = 64, ttft_ms: float | None = None,
                 tpot_ms: float | None = None, tp: int | None = None, pp: int | None = None, ep: int | None = None,
                 attention_dp: bool | None = None, include_mtp: bool = True, draft_len: int = 0,
                 acceptance: float | None = None, max_batch_size: int | None = None,
                 max_num_tokens: int | None = None, free_gpu_memory_fraction: float = 0.9,
                 decode_context: float | None = None, requested: Layout | None = None) -> PlanResult:
    """Evaluate and rank the layouts of ``model`` on ``nodes`` x ``gpus_per_node`` ``gpu``s.

    Fixed ``tp``/``pp``/``ep``/``attention_dp`` restrict the search (all four: that one layout). ``requested``
    adds a layout (the one a pipeline run will build) and marks it. ``gpu=None`` is the ``cpu`` profile, whose
    host by default has exactly the ranks of the fixed TP x PP. ``include_mtp``: the checkpoint carries the MTP
    module; ``draft_len`` > 0: MTP speculative decoding runs with that many draft tokens per step, accepting
    ``acceptance`` tokens per step on average (None: the published default). ``concurrency=None``: as many
    sequences as the engines hold (offline max throughput). ``max_batch_size`` (per attention-DP rank),
    ``max_num_tokens`` and ``free_gpu_memory_fraction`` are TensorRT-LLM's settings (None: what dsbuild's
    llm_api.yaml sets for this workload). ``decode_context``: for lengths that vary, the mean context a generated
    token attends (default ``isl + osl / 2``).
    """
    cfg = model if isinstance(model, ModelConfig) else resolve_model(model).config
    t0 = time.perf_counter()  # the search itself (resolving 'tiny' imports torch once)
    name = model if isinstance(model, str) else cfg.model_type
    table = hardware or load_hardware(hardware_file)
    g = table.gpu(gpu or "cpu")
    fixed_world = (tp * pp) if tp is not None and pp is not None else \
        (requested.tp * requested.pp if requested is not None else None)
    per_node = gpus_per_node or (fixed_world if g.arch == "cpu" and fixed_world else g.gpus_per_node)
    cluster = Cluster(g, table.network(network), nodes, per_node)
    for what, v in (("isl", isl), ("osl", osl), ("concurrency", concurrency or 1), ("nodes", nodes),
                    ("max_batch_size", max_batch_size or 1), ("max_num_tokens", max_num_tokens or 1)):
        if v < 1:
            raise SpecError(f"{what} must be at least 1, got {v}")
    if draft_len < 0 or (acceptance is not None and not 1 <= acceptance <= draft_len + 1):
        raise SpecError(f"MTP acceptance must be between 1 and draft_len + 1 = {draft_len + 1} tokens per step, "
                        f"got {acceptance}" if draft_len >= 0 else f"draft_len must not be negative, got {draft_len}")
    if not 0 < free_gpu_memory_fraction <= 1:
        raise SpecError(f"free_gpu_memory_fraction must be in (0, 1], got {free_gpu_memory_fraction}")
    if kv_cache_dtype not in mem.KV_DTYPE_BYTES:
        raise SpecError(f"unknown KV-cache dtype {kv_cache_dtype!r}; choose one of {sorted(mem.KV_DTYPE_BYTES)}")
    if quant not in quant_formats.FORMATS:
        raise SpecError(f"unknown quantization mode {quant!r}; choose one of {', '.join(quant_formats.NAMES)}")
    workload = Workload(isl, osl, concurrency, ttft_ms, tpot_ms, Speculation(draft_len, acceptance), max_batch_size,
                        max_num_tokens, free_gpu_memory_fraction, decode_context)
    catalog = mem.weight_catalog(cfg, quant, include_mtp=include_mtp)
    layouts = candidate_layouts(cfg, cluster.gpus, tp=tp, pp=pp, ep=ep, attention_dp=attention_dp)
    if requested is not None and requested not in layouts:
        layouts.append(requested)
    plans = []
    for layout in layouts:
        lp = evaluate_layout(cfg, layout, cluster, quant=quant, kv_cache_dtype=kv_cache_dtype, workload=workload,
                             catalog=catalog, hardware=table)
        lp.requested = requested is not None and layout == requested
        plans.append(lp)
    plans.sort(key=LayoutPlan.sort_key)
    fixed = {k: v for k, v in (("tp", tp), ("pp", pp), ("ep", ep), ("attention_dp", attention_dp)) if v is not None}
    result = PlanResult(name, cfg, cluster, quant, kv_cache_dtype, workload, plans, searched=len(fixed) < 4,
                        elapsed_s=0.0, fixed=fixed, model_weights_bytes=catalog.total_bytes)
    result.rationale = rationale(result)
    result.elapsed_s = time.perf_counter() - t0
    return result
