"""The planner's records: the workload asked for, each evaluated layout, the ranked result, and their JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from builder.layout import Layout
from builder.model.config import ModelConfig
from builder.plan.hardware import Cluster
from builder.plan.perf import DecodeEstimate, PrefillEstimate, Speculation

GIB = 1 << 30


@dataclass(frozen=True)
class Workload:
    isl: int = 1024
    osl: int = 1024
    concurrency: int | None = 64  # whole deployment; None: as many as the engines hold (offline max throughput)
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    speculation: Speculation = Speculation()  # MTP decoding: its layer's weights and KV count, drafts cost time
    max_batch_size: int | None = None  # per attention-DP rank (None: the deployment's, see search.batch_limits)
    max_num_tokens: int | None = None  # per forward (None: the deployment's)
    free_gpu_memory_fraction: float = 0.9
    mean_decode_context: float | None = None  # lengths that vary: the token-weighted mean (default isl + osl/2)

    @property
    def seq_len(self) -> int:
        return self.isl + self.osl

    @property
    def decode_context(self) -> float:
        """Mean context a generated token attends."""
        return self.mean_decode_context if self.mean_decode_context is not None else self.isl + self.osl / 2


@dataclass(eq=False)  # identity: plans are keys of dicts (table/plot grouping)
class LayoutPlan:
    layout: Layout
    replicas: int
    workload: Workload = field(default_factory=Workload, repr=False)
    runtime: str = "tensorrt-llm"  # what holds the weights: "tensorrt-llm" (GPU flavour) or "reference" (CPU)
    requested: bool = False
    reasons: list[str] = field(default_factory=list)  # why it is infeasible (none: feasible)
    unbuildable: list[str] = field(default_factory=list)  # those reasons that a later stage refuses as well
    warnings: list[str] = field(default_factory=list)
    weights_per_stage: list[int] = field(default_factory=list)  # what the runtime holds, max over the stage's ranks
    weights_per_rank: list[int] = field(default_factory=list)  # rank-file bytes, global rank order pp*tp + tp_rank
    runtime_weights_per_rank: list[int] = field(default_factory=list)  # what the runtime holds, same order
    runtime_weight_detail: dict[str, int] = field(default_factory=dict)  # the fullest GPU's TensorRT-LLM terms
    stage_layer_counts: list[int] = field(default_factory=list)
    activations: int = 0
    reserve: int = 0
    kv_pool: int = 0
    kv_bytes_per_token: int = 0  # on the fullest stage's GPU
    kv_used: int = 0
    max_seqs_replica: int = 0
    max_batch_size: int = 0  # per attention-DP rank, as planned
    max_num_tokens: int = 0
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
    def buildable(self) -> bool:
        """The pipeline can write it (--allow-infeasible builds an infeasible but buildable layout)."""
        return not self.unbuildable

    def refuse(self, reason: str, *, buildable: bool = True) -> None:
        self.reasons.append(reason)
        if not buildable:
            self.unbuildable.append(reason)

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
        decode steps (``osl / accepted tokens per step``) plus its prefill, which stalls the batch while it runs
        (in-flight batching)."""
        if not self.decode or not self.prefill or not self.batch:
            return 0.0
        wl = self.workload
        steps = wl.osl / self.decode.tokens_per_step
        return self.batch * wl.osl / (steps * self.decode.step_ms / 1e3 + self.batch * wl.isl
                                      / self.prefill.tokens_per_s)

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_s_replica / self.gpus_per_replica

    @property
    def tokens_per_s_per_user(self) -> float:
        """1 / TPOT: a user's output rate once its first token is out."""
        return 1e3 / self.decode.tpot_ms if self.decode else 0.0

    @property
    def tokens_per_s_per_user_with_ttft(self) -> float:
        """A user's output tokens over its whole request latency (TTFT on an idle replica included)."""
        if not self.decode or not self.prefill:
            return 0.0
        wl = self.workload
        return wl.osl / ((self.prefill.ttft_ms + wl.osl * self.decode.tpot_ms) / 1e3)

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
                ("kv_pool", self.kv_pool), ("capacity", self.capacity),
                ("rank_files", max(self.weights_per_rank)))}
        d = self.decode
        out: dict[str, Any] = {
            "name": self.name, "tp": lay.tp, "pp": lay.pp, "ep": lay.ep, "moe_tp": lay.moe_tp,
            "attention_dp": lay.attention_dp, "replicas": self.replicas, "gpus": self.gpus,
            "gpus_per_replica": self.gpus_per_replica, "requested": self.requested, "feasible": self.feasible,
            "buildable": self.buildable, "reasons": list(self.reasons), "warnings": list(self.warnings), "meets_slo": self.meets_slo,
            "runtime": self.runtime,
            "memory_per_gpu_gib": memory,
            "weights_per_stage_gib": [round(w / GIB, 3) for w in self.weights_per_stage],
            "weights_per_rank_bytes": list(self.weights_per_rank),
            "runtime_weights_per_rank_bytes": list(self.runtime_weights_per_rank),
            "runtime_weight_terms_bytes": dict(self.runtime_weight_detail),
            "stage_layers": self.stage_layer_counts,
            "kv_bytes_per_token_per_gpu": self.kv_bytes_per_token,
            "max_concurrent_sequences": self.max_seqs_replica * self.replicas,
            "max_concurrent_sequences_per_replica": self.max_seqs_replica,
            "max_batch_size": self.max_batch_size, "max_num_tokens": self.max_num_tokens,
            "batch_per_replica": self.batch,
            "draft_len": self.workload.speculation.draft_len,
            "accepted_tokens_per_step": round(d.tokens_per_step, 4) if d else None,
            "decode_step_ms": round(d.step_ms, 4) if d else None,
            "tpot_ms": round(d.tpot_ms, 4) if d else None,
            "ttft_ms": round(self.prefill.ttft_ms, 3) if self.prefill else None,
            "tokens_per_s_per_gpu": round(self.tokens_per_s_per_gpu, 3),
            "tokens_per_s_per_user": round(self.tokens_per_s_per_user, 3),
            "tokens_per_s_per_user_with_ttft": round(self.tokens_per_s_per_user_with_ttft, 3),
            "tokens_per_s": round(self.tokens_per_s_replica * self.replicas, 3),
            "decode_tokens_per_s_per_gpu": round(self.batch * d.tokens_per_step / (d.step_ms / 1e3)
                                                 / self.gpus_per_replica, 3) if d else 0.0,
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
            "kernel_latency": round(worst.overhead_ms, 4), "mtp_drafts": round(worst.draft_ms, 4),
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
    model_weights_bytes: int
    rationale: str = ""

    @property
    def recommended(self) -> LayoutPlan | None:
        best = self.layouts[0] if self.layouts else None
        return best if best is not None and best.feasible else None

    @property
    def requested(self) -> LayoutPlan | None:
        return next((lp for lp in self.layouts if lp.requested), None)

    def to_dict(self) -> dict[str, Any]:
        g, n = self.cluster.gpu, self.cluster.network
        rec = self.recommended
        req = self.requested
        wl = self.workload
        return {
            "model": self.model,
            "hardware": {"gpu": g.name, "arch": g.arch, "memory_gib": round(g.memory_gib, 2), "hbm_tb_s": g.hbm_tb_s,
                         "scale_up": g.scale_up, "scale_up_gb_s": g.scale_up_gb_s, "network": n.name,
                         "network_gb_s": n.gb_s},
            "cluster": {"nodes": self.cluster.nodes, "gpus_per_node": self.cluster.gpus_per_node,
                        "gpus": self.cluster.gpus},
            "quant": self.quant, "kv_cache_dtype": self.kv_cache_dtype,
            "workload": {"isl": wl.isl, "osl": wl.osl, "concurrency": wl.concurrency, "ttft_ms": wl.ttft_ms,
                         "tpot_ms": wl.tpot_ms, "draft_len": wl.speculation.draft_len,
                         "acceptance": wl.speculation.tokens_per_step, "max_batch_size": wl.max_batch_size,
                         "max_num_tokens": wl.max_num_tokens,
                         "free_gpu_memory_fraction": wl.free_gpu_memory_fraction},
            "model_weights_gib": round(self.model_weights_bytes / GIB, 3),
            "fixed": self.fixed, "searched": self.searched,
            "feasible_count": sum(lp.feasible for lp in self.layouts), "elapsed_s": round(self.elapsed_s, 4),
            "layouts": [lp.to_dict() for lp in self.layouts],
            "recommended": rec.to_dict() if rec else None,
            "requested": req.to_dict() if req else None,
            "rationale": self.rationale,
        }
