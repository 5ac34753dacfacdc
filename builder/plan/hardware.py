"""GPUs, networks and clusters the planner knows, and user YAML files that override them.

Peak numbers are vendor datasheet values (dense, no sparsity; ../shared/FACTS.md §5). Memory is what
``nvidia-smi`` reports as total (a little under the marketing GB: H200 "141 GB" is 143771 MiB). The efficiency
fractions say how much of a peak real kernels reach (memory-bound GEMV/attention ~80 % of HBM bandwidth, large FP8
GEMMs ~60 % of peak, NCCL bus bandwidth ~80 % of the link); they and ``layer_overhead_us`` are the planner's only tuning knobs
and a hardware YAML may override them per GPU. ``layer_overhead_us`` (65 us on Hopper) is calibrated on
aiconfigurator 0.12's silicon measurements of TensorRT-LLM 1.3: DeepSeek-V3's MLA block on 8xH200 at decode
batch 64 takes 78 us per layer where its bytes and FLOPs account for 13 us; other architectures are scaled
from it by their kernel-launch/latency generation, not measured.

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
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from builder.errors import SpecError
from builder.safeio import parse_yaml, read_bounded

Arch = Literal["ampere", "ada", "hopper", "blackwell", "cpu"]
ScaleUp = Literal["nvlink", "pcie", "shm"]

MIB = 1 << 20
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
    gpus_per_node: int = 8
    hbm_efficiency: float = 0.8
    compute_efficiency: float = 0.6
    link_efficiency: float = 0.8
    runtime_reserve_gib: float = 2.0  # CUDA context, cuBLAS/DeepGEMM workspaces, NCCL buffers, CUDA-graph pool
    # Per decoder layer and decode step, the time its many small kernels (norms, RoPE, MLA's batched GEMMs, the
    # router, quantize/dequantize) take beyond their bytes and FLOPs: latency-bound at decode batch sizes.
    layer_overhead_us: float = 0.0

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * (1 << 30))

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


GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("h100-sxm", "hopper", 81559 * MIB / (1 << 30), 3.35, 989, 1979, 0, "nvlink", 450, 6.0, layer_overhead_us=65.0),
    GPU("h200-sxm", "hopper", 143771 * MIB / (1 << 30), 4.8, 989, 1979, 0, "nvlink", 450, 6.0, layer_overhead_us=65.0),
    GPU("h100-pcie", "hopper", 81559 * MIB / (1 << 30), 2.0, 756, 1513, 0, "pcie", 64, 15.0, layer_overhead_us=70.0),
    GPU("a100-sxm-80g", "ampere", 81920 * MIB / (1 << 30), 2.0, 312, 0, 0, "nvlink", 300, 8.0, layer_overhead_us=90.0),
    GPU("b200", "blackwell", 183359 * MIB / (1 << 30), 7.7, 2250, 4500, 9000, "nvlink", 900, 5.0, layer_overhead_us=50.0),
    GPU("l40s", "ada", 46068 * MIB / (1 << 30), 0.864, 362, 733, 0, "pcie", 32, 15.0, layer_overhead_us=80.0),
    # The CPU reference engine (builder/engine): one process per rank on one host, fp32 math on dequantized
    # weights, gloo collectives over shared memory. Sized for a small CI machine so the tiny model's predictions
    # can be compared with measured runs; override it with a hardware YAML for a bigger host.
    GPU("cpu", "cpu", 8.0, 0.02, 0.1, 0, 0, "shm", 5, 100.0, gpus_per_node=4, hbm_efficiency=0.5,
        compute_efficiency=0.3, link_efficiency=0.5, runtime_reserve_gib=0.5),
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
# bounds are ~100x today's largest part, far from float overflow in the planner's arithmetic.
_Positive = Annotated[float, Field(gt=0, le=1e6)]
_NonNegative = Annotated[float, Field(ge=0, le=1e6)]
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
    gpus_per_node: Annotated[int, Field(ge=1, le=1024)] | None = None
    hbm_efficiency: _Fraction | None = None
    compute_efficiency: _Fraction | None = None
    link_efficiency: _Fraction | None = None
    runtime_reserve_gib: _NonNegative | None = None
    layer_overhead_us: _NonNegative | None = None


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
            raise SpecError(f"unknown GPU {name!r}; known: {', '.join(sorted(self.gpus))} (or add it in --hardware-file)")
        return self.gpus[name]

    def network(self, name: str) -> Network:
        if name not in self.networks:
            raise SpecError(f"unknown network {name!r}; known: {', '.join(sorted(self.networks))} "
                            "(or add it in --hardware-file)")
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
            gpus[name] = GPU(name=name, **values)
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
