"""The stored layout of every weight format: which tensors a quantized checkpoint holds, with dtypes and shapes.

``quantized_catalog(cfg, mode)`` turns the source catalogue (DeepSeek's block FP8) into the catalogue of the
checkpoint that ``dsbuild quantize --quant MODE`` writes, plus each packed weight's logical (unpacked) shape. The
planner sums it for memory per GPU, the sharding rules split it, and the quantize stage's schema tests check its
output against it — one description of each format.

Sources: DeepSeek-V3.2's own checkpoint (fp8), TensorRT-LLM's ``examples/quantization/quantize_mixed_precision_moe.py``
(w4afp8), ModelOpt's unified HF export (fp8-tensor, int4-awq, nvfp4); details in ../shared/FACTS.md §2b and §4.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from builder.errors import QuantizationError
from builder.model.catalog import FP8_KINDS, Dtype, Kind, TensorSpec, build_catalog, is_mtp_tensor
from builder.model.config import ModelConfig

INT4_GROUP = 128
NVFP4_BLOCK = 16

EXPERT_KINDS = frozenset({Kind.EXPERT_GATE, Kind.EXPERT_UP, Kind.EXPERT_DOWN})
# ModelOpt quantizes every nn.Linear except the LM head and the MoE router by default; transformers has no MTP
# module, so ModelOpt-exported checkpoints carry the MTP layer in BF16 (listed in exclude_modules).
MODELOPT_KINDS = FP8_KINDS | {Kind.IDX_WEIGHTS}
# TensorRT-LLM's w4afp8 expert naming: gate -> w1, down -> w2, up -> w3.
W4A8_EXPERT_NAMES = {Kind.EXPERT_GATE: "w1", Kind.EXPERT_DOWN: "w2", Kind.EXPERT_UP: "w3"}


@dataclass(frozen=True)
class QuantizedCatalog:
    specs: list[TensorSpec]
    logical_shapes: dict[str, tuple[int, ...]]  # packed weight -> (out, in) it represents
    quant_algo: str | None  # hf_quant_config.json quant_algo


def _bf16(spec: TensorSpec) -> TensorSpec:
    return replace(spec, dtype=Dtype.BF16)


def _weights(cfg: ModelConfig) -> list[TensorSpec]:
    """The source catalogue without scale tensors (every linear as its logical weight)."""
    return [s for s in build_catalog(cfg) if not s.is_scale]


def quantized_catalog(cfg: ModelConfig, mode: str, *, include_mtp: bool = True) -> QuantizedCatalog:
    if mode == "fp8":
        specs = build_catalog(cfg if cfg.is_fp8_block else _with_fp8(cfg), include_mtp=include_mtp)
        return QuantizedCatalog(specs, {}, "FP8_BLOCK_SCALES")
    weights = [s for s in _weights(cfg) if include_mtp or not is_mtp_tensor(s.name, cfg)]
    out: list[TensorSpec] = []
    logical: dict[str, tuple[int, ...]] = {}
    if mode == "bf16":
        out = [_bf16(s) if s.kind in FP8_KINDS else s for s in weights]
        return QuantizedCatalog(out, {}, None)
    if mode == "w4afp8":
        block = build_catalog(_with_fp8(cfg), include_mtp=include_mtp)
        block_shapes = {s.name: s.shape for s in block}  # a dict, not a scan per scale: 138k tensors for V3.2
        for s in block:
            if s.kind not in EXPERT_KINDS:
                out.append(s)
            elif s.is_scale:
                rows, cols = block_shapes[s.scale_of]
                out.append(replace(s, shape=(rows, cols // INT4_GROUP), dtype=Dtype.F32))
            else:
                rows, cols = s.shape
                out.append(replace(s, shape=(rows, cols // 2), dtype=Dtype.I8))
                logical[s.name] = (rows, cols)
                prefix = s.name.rsplit(".", 2)[0]  # model.layers.L.mlp.experts.E
                out.append(TensorSpec(f"{prefix}.{W4A8_EXPERT_NAMES[s.kind]}.input_scale", (), Dtype.F32, s.kind,
                                      s.layer, s.expert, scale_of=s.name))
        return QuantizedCatalog(out, logical, "MIXED_PRECISION")
    if mode in ("fp8-tensor", "int4-awq", "nvfp4"):
        for s in weights:
            if s.kind not in MODELOPT_KINDS or is_mtp_tensor(s.name, cfg):
                out.append(_bf16(s) if s.kind in FP8_KINDS else s)
                continue
            rows, cols = s.shape
            base = s.name[: -len("weight")]
            if mode == "fp8-tensor":
                out.append(replace(s, dtype=Dtype.F8_E4M3))
                out.append(TensorSpec(base + "weight_scale", (), Dtype.F32, s.kind, s.layer, s.expert, scale_of=s.name))
                out.append(TensorSpec(base + "input_scale", (), Dtype.F32, s.kind, s.layer, s.expert, scale_of=s.name))
            elif mode == "int4-awq":
                # ModelOpt packs two int4 per uint8 along the output dimension; group scales per 128 inputs.
                out.append(replace(s, shape=(rows // 2, cols), dtype=Dtype.U8))
                logical[s.name] = (rows, cols)
                out.append(TensorSpec(base + "weight_scale", (rows, cols // INT4_GROUP), Dtype.BF16, s.kind, s.layer,
                                      s.expert, scale_of=s.name))
                out.append(TensorSpec(base + "pre_quant_scale", (cols,), Dtype.BF16, s.kind, s.layer, s.expert,
                                      scale_of=s.name, follows=(1,)))
            else:  # nvfp4: e2m1 pairs along the input dimension, FP8 block scales per 16 inputs, fp32 global scale
                out.append(replace(s, shape=(rows, cols // 2), dtype=Dtype.U8))
                logical[s.name] = (rows, cols)
                out.append(TensorSpec(base + "weight_scale", (rows, cols // NVFP4_BLOCK), Dtype.F8_E4M3, s.kind,
                                      s.layer, s.expert, scale_of=s.name))
                out.append(TensorSpec(base + "weight_scale_2", (), Dtype.F32, s.kind, s.layer, s.expert, scale_of=s.name))
                out.append(TensorSpec(base + "input_scale", (), Dtype.F32, s.kind, s.layer, s.expert, scale_of=s.name))
        algo = {"fp8-tensor": "FP8", "int4-awq": "W4A16_AWQ", "nvfp4": "NVFP4"}[mode]
        return QuantizedCatalog(out, logical, algo)
    raise QuantizationError(f"unknown quantization mode {mode!r}")


def _with_fp8(cfg: ModelConfig) -> ModelConfig:
    from builder.model.config import QuantizationConfig

    return replace(cfg, quantization=QuantizationConfig())
