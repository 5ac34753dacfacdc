"""The stored layout of every weight format: which tensors a quantized checkpoint holds, with dtypes and shapes.

``quantized_catalog(cfg, mode)`` turns the source catalogue (DeepSeek's block FP8) into the catalogue of the
checkpoint that ``dsbuild quantize --quant MODE`` writes, plus each packed weight's logical (unpacked) shape. The
planner sums it for memory per GPU, the sharding rules split it, the build stage slices by it, and the schema tests
check every mode's real output against it — one description of each format.

Verified against (not just read from documentation):
- fp8: DeepSeek-V3.2's own checkpoint (F8_E4M3 weight + F32 ``weight_scale_inv`` ``[ceil(out/128), ceil(in/128)]``).
- w4afp8: TensorRT-LLM ``examples/quantization/quantize_mixed_precision_moe.py`` (routed experts int8 ``[out, in/2]``
  packed along the input dim, ``weight_scale_inv`` reused as F32 group scales ``[out, in/128]``, per-expert
  ``w{1,2,3}.input_scale`` of shape ``[1]``) and its loader ``_torch/modules/fused_moe/quantization.py``
  (``WInt4AFP8FusedMoEMethod``, ``W4A8_CUSTOM``: weights used as stored, every expert's input scale read on every
  rank). The MTP layer's experts stay block FP8 (the upstream script drops the MTP layer; we keep it loadable).
- fp8-tensor / int4-awq / nvfp4: what ModelOpt 0.47 ``export_hf_checkpoint`` writes for a transformers
  ``DeepseekV32ForCausalLM`` with per-expert linears (tests/integration/test_quantize_modes.py runs the export and
  compares):
  quantized linears get ``weight_scale``/``input_scale`` scalars (FP8), U8 ``[out/2, in]`` + F32
  ``weight_scale [out, in/128]`` (+ BF16 ``pre_quant_scale [in]`` where ModelOpt could not fold it into the
  preceding norm) (INT4 AWQ), U8 ``[out, in/2]`` + F8 ``weight_scale [out, in/16]`` + F32 ``weight_scale_2`` and
  ``input_scale`` scalars (NVFP4). Everything unquantized is BF16 except the router bias (F32). The MTP layer, which
  transformers does not load, is carried through from the source in BF16 and listed in ``exclude_modules``. nvfp4
  leaves MLA's query/key-value projections and the indexer in BF16 (``MODELOPT_KINDS``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from builder.errors import QuantizationError
from builder.model.catalog import FP8_KINDS, Dtype, Kind, TensorSpec, build_catalog, is_mtp_tensor
from builder.model.config import ModelConfig, QuantizationConfig
from quantize import registry

INT4_GROUP = 128
NVFP4_BLOCK = 16

EXPERT_KINDS = frozenset({Kind.EXPERT_GATE, Kind.EXPERT_UP, Kind.EXPERT_DOWN})
# The linears each ModelOpt format quantizes; every other one stays BF16. The LM head and router are excluded by
# ModelOpt itself; the indexer's weights_proj by us (TensorRT-LLM builds it unquantized, fp32). nvfp4 follows
# ModelOpt's own DeepSeek recipe, the one NVIDIA's FP4 checkpoints and TensorRT-LLM's published FP4 results use
# (docs/tensorrt-llm-contract.md#C-NVFP4-1): MLA's query/key-value projections and the DSA indexer stay BF16; o_proj,
# dense MLPs, shared and routed experts go NVFP4.
MLA_INPUT_KINDS = frozenset({Kind.Q_A, Kind.Q_B, Kind.KV_A, Kind.KV_B, Kind.IDX_WQ_B, Kind.IDX_WK})
MODELOPT_KINDS: dict[str, frozenset[Kind]] = {
    "fp8-tensor": FP8_KINDS, "int4-awq": FP8_KINDS, "nvfp4": FP8_KINDS - MLA_INPUT_KINDS}
# ModelOpt folds AWQ's pre_quant_scale into the preceding norm where every consumer of that norm allows it; these
# linears keep theirs (seen in its export of DeepseekV32ForCausalLM: routed experts, every down_proj, kv_b, o_proj).
AWQ_PRE_QUANT_KINDS = frozenset({Kind.EXPERT_GATE, Kind.EXPERT_UP, Kind.EXPERT_DOWN, Kind.SHARED_DOWN,
                                 Kind.DENSE_DOWN, Kind.KV_B, Kind.O_PROJ})
# TensorRT-LLM's w4afp8 expert naming: gate -> w1, down -> w2, up -> w3.
W4A8_EXPERT_NAMES = {Kind.EXPERT_GATE: "w1", Kind.EXPERT_DOWN: "w2", Kind.EXPERT_UP: "w3"}



@dataclass(frozen=True)
class QuantizedCatalog:
    specs: list[TensorSpec]
    logical_shapes: dict[str, tuple[int, ...]]  # packed weight -> (out, in) it represents
    quant_algo: str | None  # hf_quant_config.json quant_algo


def _bf16(spec: TensorSpec) -> TensorSpec:
    return replace(spec, dtype=Dtype.BF16)


def _weights(cfg: ModelConfig, include_mtp: bool) -> list[TensorSpec]:
    """The source catalogue without scale tensors (every linear as its logical weight, source dtypes)."""
    return [s for s in build_catalog(_with_fp8(cfg), include_mtp=include_mtp) if not s.is_scale]


def _scale(base: str, suffix: str, shape: tuple[int, ...], dtype: Dtype, s: TensorSpec, **kw) -> TensorSpec:
    return TensorSpec(base + suffix, shape, dtype, s.kind, s.layer, s.expert, scale_of=s.name, **kw)


def quantized_catalog(cfg: ModelConfig, mode: str, *, include_mtp: bool = True) -> QuantizedCatalog:
    if mode not in registry.FORMATS:
        raise QuantizationError(f"unknown quantization mode {mode!r}")
    algo = registry.FORMATS[mode].quant_algo
    if mode == "fp8":
        return QuantizedCatalog(build_catalog(_with_fp8(cfg), include_mtp=include_mtp), {}, algo)
    out: list[TensorSpec] = []
    logical: dict[str, tuple[int, ...]] = {}
    if mode == "bf16":
        out = [_bf16(s) if s.kind in FP8_KINDS else s for s in _weights(cfg, include_mtp)]
        return QuantizedCatalog(out, {}, algo)
    if mode == "w4afp8":
        for s in build_catalog(_with_fp8(cfg), include_mtp=include_mtp):
            if s.kind not in EXPERT_KINDS or is_mtp_tensor(s.name, cfg):
                out.append(s)
            elif s.is_scale:
                out.append(replace(s, shape=(logical[s.scale_of][0], logical[s.scale_of][1] // INT4_GROUP),
                                   dtype=Dtype.F32))
            else:
                rows, cols = s.shape
                out.append(replace(s, shape=(rows, cols // 2), dtype=Dtype.I8))
                logical[s.name] = (rows, cols)
                prefix = s.name.rsplit(".", 2)[0]  # model.layers.L.mlp.experts.E
                out.append(TensorSpec(f"{prefix}.{W4A8_EXPERT_NAMES[s.kind]}.input_scale", (1,), Dtype.F32,
                                      Kind.EXPERT_ACT_SCALE, s.layer, s.expert, scale_of=s.name, follows=()))
        return QuantizedCatalog(out, logical, algo)
    for s in _weights(cfg, include_mtp):
        if is_mtp_tensor(s.name, cfg):
            out.append(_bf16(s) if s.kind in FP8_KINDS else s)  # carried from the source
            continue
        if s.kind not in MODELOPT_KINDS[mode]:
            out.append(replace(s, dtype=Dtype.F32 if s.kind is Kind.ROUTER_BIAS else Dtype.BF16))
            continue
        rows, cols = s.shape
        base = s.name[: -len("weight")]
        if mode == "fp8-tensor":
            out.append(replace(s, dtype=Dtype.F8_E4M3))
            out.append(_scale(base, "input_scale", (), Dtype.F32, s))
            out.append(_scale(base, "weight_scale", (), Dtype.F32, s))
        elif mode == "int4-awq":
            out.append(replace(s, shape=(rows // 2, cols), dtype=Dtype.U8))
            logical[s.name] = (rows, cols)
            if s.kind in AWQ_PRE_QUANT_KINDS:
                out.append(_scale(base, "pre_quant_scale", (cols,), Dtype.BF16, s, follows=(1,)))
            out.append(_scale(base, "weight_scale", (rows, cols // INT4_GROUP), Dtype.F32, s))
        else:  # nvfp4
            out.append(replace(s, shape=(rows, cols // 2), dtype=Dtype.U8))
            logical[s.name] = (rows, cols)
            out.append(_scale(base, "input_scale", (), Dtype.F32, s))
            out.append(_scale(base, "weight_scale", (rows, cols // NVFP4_BLOCK), Dtype.F8_E4M3, s))
            out.append(_scale(base, "weight_scale_2", (), Dtype.F32, s))
    return QuantizedCatalog(out, logical, algo)


def unquantized_linears(cfg: ModelConfig, mode: str) -> list[str]:
    """Module paths inside a decoder layer (``self_attn.q_a_proj``) of the DeepSeek linears ``mode`` leaves BF16:
    what ModelOpt's quantizers must be switched off for."""
    kept = FP8_KINDS - MODELOPT_KINDS[mode]
    return sorted({s.layer_module for s in _weights(cfg, include_mtp=False) if s.kind in kept and s.layer is not None})


def _with_fp8(cfg: ModelConfig) -> ModelConfig:
    return cfg if cfg.is_fp8_block else replace(cfg, quantization=QuantizationConfig())


def mode_of_quant_config(hf_quant_config: dict | None, cfg: ModelConfig) -> str:
    """The dsbuild mode a checkpoint was written in, from its hf_quant_config.json (None: no such file)."""
    if hf_quant_config is None:
        return "fp8" if cfg.is_fp8_block else "bf16"
    q = hf_quant_config.get("quantization", hf_quant_config)
    algo = q.get("quant_algo") if isinstance(q, dict) else None
    if algo not in registry.FORMAT_OF_ALGO:
        raise QuantizationError(f"hf_quant_config.json names quant_algo {algo!r}, which dsbuild does not write")
    return registry.FORMAT_OF_ALGO[algo].name


def mode_of_checkpoint(root: str | Path) -> str:
    root = Path(root)
    cfg = ModelConfig.from_json_file(root / "config.json")
    path = root / "hf_quant_config.json"
    return mode_of_quant_config(json.loads(path.read_text()) if path.is_file() else None, cfg)
