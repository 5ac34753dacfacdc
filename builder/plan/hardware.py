"""GPUs, networks and clusters the planner knows, and user YAML files that override them.

Peak numbers are vendor datasheet values (dense, no sparsity; docs/choosing-a-layout.md, Sources). Memory is what
``nvidia-smi`` reports as total (a little under the marketing GB: H200 "141 GB" is 143771 MiB). GB200 is one GPU of
an NVL72 rack: its "node" here is the NVLink domain (72 GPUs), so a layout inside the rack uses NVLink.

How close TensorRT-LLM gets to those peaks is a small set of efficiency parameters per GPU generation, fitted to
published TensorRT-LLM results (``builder/data/calibration/trtllm_deepseek_published.yaml``) by
``benchmarks/fit_planner.py``, which writes ``builder/data/calibration/efficiency.yaml``; every built-in GPU of a
generation takes them (Ampere and Ada, with no published DeepSeek results, take Hopper's: unverified). The
parameters, their values and where each comes from are in docs/choosing-a-layout.md; a hardware YAML may override
any of them per GPU:

* ``hbm_efficiency``: achieved share of HBM bandwidth when a kernel streams weights or KV cache;
* ``compute_efficiency``: achieved share of peak tensor FLOPs in a large GEMM (dense or one expert's of a grouped
  MoE GEMM), each at the peak of the dtype it runs in;
* ``gemm_half_rows``: token rows at which a GEMM reaches half that share: a GEMM of M rows takes as long as
  M + ``gemm_half_rows`` rows at the large-GEMM rate (tile padding, pipeline fill and drain, partial waves), so a
  decode step's grouped MoE GEMM with a few tokens per expert runs far below the rate of a prefill chunk's;
* ``attention_efficiency``: achieved share of peak tensor FLOPs in the MLA/DSA decode attention kernels;
* ``context_attention_efficiency``: the same in prefill attention (R1/V3's dense FMHA, V3.2's sparse MQA), whose
  many query rows per key keep the tensor cores far busier than decode's;
* ``layer_overhead_us``: time per decoder layer and forward that its many small kernels take beyond their bytes
  and FLOPs (norms, RoPE, routing, quantize, launch gaps);
* ``draft_overhead_us``: the same for one MTP draft step (sampling, input preparation) beyond its layer's kernels.

A hardware YAML looks like::

    gpus:
      h100-sxm: {hbm_efficiency: 0.75}          # partial override of a built-in entry
      my-gpu: {memory_gib: 96, hbm_tb_s: 4.0, bf16_tflops: 989, fp8_tflops: 1979, arch: hopper,
               scale_up: nvlink, scale_up_gb_s: 450}
    networks:
      my-ib: {gb_s: 50, latency_us: 6}
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from builder.errors import SpecError, did_you_mean
from builder.safeio import parse_yaml, read_bounded
from quantize import registry as quant_formats

Arch = Literal["ampere", "ada", "hopper", "blackwell", "cpu"]
ScaleUp = Literal["nvlink", "pcie", "shm"]

MIB = 1 << 20
EFFICIENCY_FILE = Path(__file__).resolve().parent.parent / "data" / "calibration" / "efficiency.yaml"
EFFICIENCY_FIELDS = ("hbm_efficiency", "compute_efficiency", "gemm_half_rows", "attention_efficiency",
                     "context_attention_efficiency", "layer_overhead_us", "draft_overhead_us")
MAX_HARDWARE_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class GPU:
    name: str
    arch: Arch
    memory_gib: float
    hbm_tb_s: float
    bf16_tflops: float
    fp8_tflops: float  # 0: no FP8 tensor cores
    fp4_tflops: float  # 0: no FP4 tensor cores
    scale_up: ScaleUp  # the link between GPUs of one node
    scale_up_gb_s: float  # per GPU, per direction
    scale_up_latency_us: float  # one small collective over it (NCCL / custom all-reduce)
    sms: int = 132  # streaming multiprocessors
    gpus_per_node: int = 8
    hbm_efficiency: float = 0.8
    compute_efficiency: float = 0.6
    gemm_half_rows: float = 64.0
    attention_efficiency: float = 0.5
    context_attention_efficiency: float = 0.5
    link_efficiency: float = 0.8
    runtime_reserve_gib: float = 2.0  # CUDA context, cuBLAS/DeepGEMM workspaces, NCCL buffers, CUDA-graph pool
    layer_overhead_us: float = 0.0
    draft_overhead_us: float = 0.0

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * (1 << 30))

    @property
    def blackwell(self) -> bool:
        return self.arch == "blackwell"

    def peak_tflops(self, compute_dtype: str) -> float:
        """Peak for the GEMM dtype; falls back to the widest available (an FP8 model on Ampere runs in BF16)."""
        if compute_dtype == "fp4" and self.fp4_tflops:
            return self.fp4_tflops
        if compute_dtype in ("fp4", "fp8") and self.fp8_tflops:
            return self.fp8_tflops
        return self.bf16_tflops


@dataclass(frozen=True)
class Network:
    name: str
    gb_s: float  # per GPU (one NIC per GPU), per direction
    latency_us: float  # one small collective step across nodes
    efficiency: float = 0.8


def load_efficiency(path: Path = EFFICIENCY_FILE) -> dict[str, dict[str, float]]:
    """Fitted efficiency parameters per GPU generation (``benchmarks/fit_planner.py`` writes the file)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    out = {arch: {k: float(v[k]) for k in EFFICIENCY_FIELDS} for arch, v in data["generations"].items()}
    for arch, like in (("ampere", "hopper"), ("ada", "hopper")):
        out.setdefault(arch, out[like])
    return out


FITTED = load_efficiency()


def _gpu(name: str, arch: Arch, memory_mib: int, hbm_tb_s: float, bf16: float, fp8: float, fp4: float,
         scale_up: ScaleUp, scale_up_gb_s: float, latency_us: float, **kw: Any) -> GPU:
    return GPU(name, arch, memory_mib * MIB / (1 << 30), hbm_tb_s, bf16, fp8, fp4, scale_up, scale_up_gb_s,
               latency_us, **(FITTED[arch] | kw))


GPUS: dict[str, GPU] = {g.name: g for g in (
    _gpu("h100-sxm", "hopper", 81559, 3.35, 989, 1979, 0, "nvlink", 450, 6.0, sms=132),
    _gpu("h200-sxm", "hopper", 143771, 4.8, 989, 1979, 0, "nvlink", 450, 6.0, sms=132),
    _gpu("h100-pcie", "hopper", 81559, 2.0, 756, 1513, 0, "pcie", 64, 15.0, sms=114),
    _gpu("a100-sxm-80g", "ampere", 81920, 2.0, 312, 0, 0, "nvlink", 300, 8.0, sms=108),
    _gpu("b200", "blackwell", 183359, 7.7, 2250, 4500, 9000, "nvlink", 900, 5.0, sms=148),
    # One GPU of a GB200 NVL72 rack (186 GB HBM3e as MLPerf lists it): the 72-GPU NVLink domain is its "node".
    _gpu("gb200", "blackwell", 189471, 8.0, 2500, 5000, 10000, "nvlink", 900, 5.0, sms=148,
         gpus_per_node=72),
    _gpu("l40s", "ada", 46068, 0.864, 362, 733, 0, "pcie", 32, 15.0, sms=142),
    # The CPU reference engine (builder/engine): one process per rank on one host, fp32 math on dequantized
    # weights, gloo collectives over shared memory. Sized for a small CI machine so the tiny model's predictions
    # can be compared with measured runs (no tensor-core tiles: a GEMM's rows cost the same at any M); override it
    # with a hardware YAML for a bigger host.
    GPU("cpu", "cpu", 8.0, 0.02, 0.1, 0, 0, "shm", 5, 100.0, sms=4, gpus_per_node=4, hbm_efficiency=0.5,
        compute_efficiency=0.3, gemm_half_rows=0.0, attention_efficiency=0.3, context_attention_efficiency=0.3,
        link_efficiency=0.5,
        runtime_reserve_gib=0.5),
)}

NETWORKS: dict[str, Network] = {n.name: n for n in (
    Network("ib-xdr", 100, 5.0),
    Network("ib-ndr", 50, 5.0),
    Network("ib-hdr", 25, 6.0),
    Network("roce-400g", 50, 8.0, 0.75),
    Network("roce-200g", 25, 8.0, 0.75),
    Network("eth-100g", 12.5, 30.0, 0.6),
)}

FP8_KV_ARCHS = frozenset({"ada", "hopper", "blackwell", "cpu"})


# Every number in a hardware file is finite (pydantic's allow_inf_nan=False) and inside these bounds: the planner
# divides by bandwidths, peaks and memory, so those must be positive; a zero FP8/FP4 peak means "none"; the upper
# bound (1e15) leaves room for "free" resources in what-if files (a test makes HBM 1e9 TB/s to isolate the compute
# term) and stays far from float overflow in the planner's arithmetic.
_Positive = Annotated[float, Field(gt=0, le=1e15)]
_NonNegative = Annotated[float, Field(ge=0, le=1e15)]
_Fraction = Annotated[float, Field(gt=0, le=1)]


class _GPUOverride(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    arch: Arch | None = None
    memory_gib: _Positive | None = None
    hbm_tb_s: _Positive | None = None
    bf16_tflops: _Positive | None = None
    fp8_tflops: _NonNegative | None = None
    fp4_tflops: _NonNegative | None = None
    scale_up: ScaleUp | None = None
    scale_up_gb_s: _Positive | None = None
    scale_up_latency_us: _NonNegative | None = None
    sms: Annotated[int, Field(ge=1, le=4096)] | None = None
    gpus_per_node: Annotated[int, Field(ge=1, le=1024)] | None = None
    hbm_efficiency: _Fraction | None = None
    compute_efficiency: _Fraction | None = None
    gemm_half_rows: _NonNegative | None = None
    attention_efficiency: _Fraction | None = None
    context_attention_efficiency: _Fraction | None = None
    link_efficiency: _Fraction | None = None
    runtime_reserve_gib: _NonNegative | None = None
    layer_overhead_us: _NonNegative | None = None
    draft_overhead_us: _NonNegative | None = None


class _NetworkOverride(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    gb_s: _Positive | None = None
    latency_us: _NonNegative | None = None
    efficiency: _Fraction | None = None


class _HardwareFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gpus: dict[str, _GPUOverride] = {}
    networks: dict[str, _NetworkOverride] = {}


@dataclass(frozen=True)
class HardwareTable:
    gpus: dict[str, GPU]
    networks: dict[str, Network]

    def gpu(self, name: str) -> GPU:
        if name not in self.gpus:
            raise SpecError(f"unknown GPU {name!r}{did_you_mean(name, self.gpus)}; known: {', '.join(sorted(self.gpus))} "
                            "(or add it in --hardware-file)", option="gpu")
        return self.gpus[name]

    def quant_refusal(self, quant: str, gpu: GPU) -> str | None:
        """Why ``gpu`` cannot take weight format ``quant`` (the planner's and the quantize stage's one check),
        naming the GPUs of this table that can; None when it can."""
        fmt = quant_formats.get(quant)
        able = tuple(sorted(g.name for g in self.gpus.values() if g.arch != "cpu" and fmt.runs_on(g.arch)))
        return fmt.refusal(gpu=gpu.name, arch=gpu.arch, gpus=able)

    def network(self, name: str) -> Network:
        if name not in self.networks:
            raise SpecError(f"unknown network {name!r}{did_you_mean(name, self.networks)}; known: "
                            f"{', '.join(sorted(self.networks))} (or add it in --hardware-file)", option="network")
        return self.networks[name]


def load_hardware(path: str | Path | None = None) -> HardwareTable:
    """The built-in table, overridden entry by entry (field by field) by a user YAML file."""
    gpus, networks = dict(GPUS), dict(NETWORKS)
    if path is None:
        return HardwareTable(gpus, networks)
    path = Path(path)
    raw = parse_yaml(read_bounded(path, limit=MAX_HARDWARE_FILE_BYTES, what="hardware file", error=SpecError),
                     source=f"hardware file {path}", error=SpecError) or {}
    try:
        data = _HardwareFile.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise SpecError(f"hardware file {path}: {where}: {err['msg']}") from None
    for name, over in data.gpus.items():
        values = over.model_dump(exclude_none=True)
        if name in gpus:
            gpus[name] = replace(gpus[name], **values)
        else:
            missing = [m for m in ("arch", "memory_gib", "hbm_tb_s", "bf16_tflops", "scale_up", "scale_up_gb_s")
                       if m not in values]
            if missing:
                raise SpecError(f"hardware file {path}: new GPU {name!r} needs {', '.join(missing)}")
            values.setdefault("fp8_tflops", 0.0)
            values.setdefault("fp4_tflops", 0.0)
            values.setdefault("scale_up_latency_us", 10.0)
            gpus[name] = GPU(name=name, **(FITTED.get(values["arch"], {}) | values))
    for name, over in data.networks.items():
        values = over.model_dump(exclude_none=True)
        if name in networks:
            networks[name] = replace(networks[name], **values)
        elif "gb_s" not in values:
            raise SpecError(f"hardware file {path}: new network {name!r} needs gb_s")
        else:
            values.setdefault("latency_us", 10.0)
            networks[name] = Network(name=name, **values)
    return HardwareTable(gpus, networks)


@dataclass(frozen=True)
class Cluster:
    gpu: GPU
    network: Network
    nodes: int
    gpus_per_node: int

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node
