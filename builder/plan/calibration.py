"""Published TensorRT-LLM DeepSeek results (``builder/data/calibration/trtllm_deepseek_published.yaml``) and the
planner's prediction of each: what the efficiency parameters are fitted to and the accuracy is checked against."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from builder.model.config import preset
from builder.plan.hardware import EFFICIENCY_FIELDS, HardwareTable, load_hardware
from builder.plan.memory import MAX_NUM_TOKENS
from builder.plan.result import LayoutPlan
from builder.plan.search import plan_cluster

PUBLISHED = Path(__file__).resolve().parent.parent / "data" / "calibration" / "trtllm_deepseek_published.yaml"
DEFAULT_BAND = (0.8, 1.25)
GIB = 1 << 30

# What each metric reads off a planned layout (units as the rows give them).
METRICS = {
    "output_tokens_per_s_per_gpu": lambda lp: lp.tokens_per_s_per_gpu,
    "output_tokens_per_s_per_user_with_ttft": lambda lp: lp.tokens_per_s_per_user_with_ttft,
    "output_tokens_per_s_per_user": lambda lp: lp.tokens_per_s_per_user,
    "ttft_ms": lambda lp: lp.prefill.ttft_ms if lp.prefill else 0.0,
    "weights_plus_activations_gib_per_gpu": lambda lp: (max(lp.weights_per_stage) + lp.activations) / GIB,
}


@dataclass(frozen=True)
class Row:
    id: str
    group: str
    model: str
    gpu: str
    gpus: int
    tp: int
    ep: int
    attention_dp: bool
    quant: str
    kv_cache_dtype: str
    draft_len: int
    acceptance: float | None
    isl: int
    osl: int
    concurrency: int | None
    max_batch_size: int | None
    max_num_tokens: int | None
    free_gpu_memory_fraction: float
    metric: str
    value: float
    source: dict[str, str]
    tpot_limit_ms: float | None = None
    decode_context: float | None = None
    band: tuple[float, float] = DEFAULT_BAND
    band_reason: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Row":
        lay = d["layout"]
        return cls(d["id"], d["group"], d["model"], d["gpu"], d["gpus"], lay["tp"], lay["ep"], lay["attention_dp"],
                   d["quant"], d["kv_cache_dtype"], d["draft_len"], d["acceptance"], d["isl"], d["osl"],
                   d["concurrency"], d["max_batch_size"], d["max_num_tokens"], d["free_gpu_memory_fraction"],
                   d["metric"], float(d["value"]), dict(d["source"]), d.get("tpot_limit_ms"), d.get("decode_context"),
                   tuple(d.get("band", DEFAULT_BAND)), d.get("band_reason", ""), d)


def load_rows(path: Path = PUBLISHED) -> list[Row]:
    return [Row.from_dict(d) for d in yaml.safe_load(path.read_text(encoding="utf-8"))["rows"]]


@dataclass(frozen=True)
class Prediction:
    row: Row
    value: float
    plan: LayoutPlan

    @property
    def ratio(self) -> float:
        return self.value / self.row.value

    @property
    def within_band(self) -> bool:
        return self.row.band[0] <= self.ratio <= self.row.band[1]


def predict(row: Row, *, hardware: HardwareTable | None = None) -> Prediction:
    """The planner's figure for the row's exact setup (a settings the source left open: TensorRT-LLM's default)."""
    table = hardware or load_hardware()
    per_node = min(row.gpus, table.gpu(row.gpu).gpus_per_node)
    result = plan_cluster(
        model=preset(row.model), gpu=row.gpu, nodes=max(1, row.gpus // per_node), gpus_per_node=per_node,
        hardware=table, quant=row.quant, kv_cache_dtype=row.kv_cache_dtype, isl=row.isl, osl=row.osl,
        concurrency=row.concurrency, tpot_ms=row.tpot_limit_ms, tp=row.tp, pp=1, ep=row.ep,
        attention_dp=row.attention_dp, draft_len=row.draft_len, acceptance=row.acceptance,
        max_batch_size=row.max_batch_size, max_num_tokens=row.max_num_tokens or MAX_NUM_TOKENS,
        free_gpu_memory_fraction=row.free_gpu_memory_fraction, decode_context=row.decode_context)
    (lp,) = result.layouts
    value = METRICS[row.metric](lp) if lp.feasible or row.metric.startswith("weights") else 0.0
    return Prediction(row, value, lp)


def with_efficiency(table: HardwareTable, arch: str, values: dict[str, float]) -> HardwareTable:
    """The table with every GPU of generation ``arch`` taking these efficiency parameters."""
    unknown = set(values) - set(EFFICIENCY_FIELDS)
    if unknown:
        raise ValueError(f"not efficiency parameters: {sorted(unknown)}")
    gpus = {n: (replace(g, **values) if g.arch == arch else g) for n, g in table.gpus.items()}
    return HardwareTable(gpus, table.networks)
