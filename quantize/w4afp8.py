"""``w4afp8``: TensorRT-LLM's INT4-experts format for DeepSeek on Hopper (W4A8: INT4 weights, FP8 activations).

Layout, as TensorRT-LLM's ``examples/quantization/quantize_mixed_precision_moe.py`` writes it and
``_torch/modules/fused_moe/quantization.py::WInt4AFP8FusedMoEMethod`` (``MoEWeightLoadingMode.W4A8_CUSTOM``) loads it:
- every routed expert's ``{gate,up,down}_proj.weight``: the block-FP8 weight dequantized, rounded to BF16, quantized
  to symmetric INT4 in groups of 128 inputs (``amax / 7``), packed two per byte along the input dimension (int8
  ``[out, in/2]``, low nibble = even input; ``pack_int8_tensor_to_packed_int4``);
- its ``weight_scale_inv`` replaced by the float32 group scales ``[out, in/128]``;
- ``model.layers.L.mlp.experts.E.w{1,2,3}.input_scale`` float32 ``[1]`` = calibrated input amax / 448 (w1 gate, w2
  down, w3 up; gate and up share one input, so w1 and w3 get the same value);
- everything else unchanged block FP8; ``config.json`` without ``quantization_config``; ``hf_quant_config.json``
  ``{"quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": ...}}`` and ``quant_cfg.json`` with
  ``quantized_layers`` naming **every FP8 linear by its exact TensorRT-LLM module name** (a Linear takes a per-layer
  config only on an exact name match, docs/tensorrt-llm-contract.md#C-QCFG-1): attention
  (``kv_a_proj_with_mqa`` = the fused q_a/kv_a projection, ``q_b_proj``, ``kv_b_proj``, ``o_proj``), the V3.2
  indexer's ``wq_b`` and ``wk``, shared experts and dense MLPs (``gate_up_proj``, ``down_proj``)
  ``FP8_BLOCK_SCALES``; ``mlp.experts`` ``W4A8_AWQ``.

Beyond the upstream script (C-W4A8SCRIPT-3): the MTP layer is kept (its experts stay block FP8 and are listed as
``FP8_BLOCK_SCALES``, so MTP speculative decoding still loads; upstream silently drops the layer), and the V3.2 DSA
indexer's ``wq_b`` and ``wk`` are listed: TensorRT-LLM copies ``wk`` into the fused projection and asserts the two
have one dtype (C-DSV3-1), so an unlisted ``wk`` (BF16 module, FP8 bytes) fails to load. ``weights_proj`` and the
MTP layer's ``eh_proj`` are not FP8 in the checkpoint and stay unlisted.

The weight conversion streams tensor by tensor (no calibration needed). The activation scales need a forward pass:
transformers' ``DeepseekV32ForCausalLM`` on the dequantized model with every expert run on every token of its layer
during calibration (as ModelOpt calibrates MoE), amax recorded by hooks on each expert's linears. That needs the
model in memory; for the full model use ``gpu_commands``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from builder.errors import QuantizationError
from builder.model.catalog import Dtype, Kind, build_catalog, is_mtp_tensor
from builder.model.config import ModelConfig
from builder.model.safetensors_io import read_header
from quantize import int4
from quantize.formats import EXPERT_KINDS, W4A8_EXPERT_NAMES, quantized_catalog
from quantize.fp8_tensor import FP8_MAX
from quantize.hf_experts import PerExpertExperts
from quantize.stream import Planned, TensorReader, computed, passthrough, source_shards

def expected_act_scales(cfg: ModelConfig) -> list[str]:
    """The ``w{1,2,3}.input_scale`` names the W4A8 loader reads: every routed expert of every main layer."""
    return [s.name for s in quantized_catalog(cfg, "w4afp8").specs if s.kind is Kind.EXPERT_ACT_SCALE]


def read_act_scales(path: str | Path, cfg: ModelConfig) -> dict[str, float]:
    """Precomputed expert input scales (the GPU-node script's safetensors file): exactly the expected names, each
    float32 ``[1]``, finite and positive. Header checked before any value is read."""
    path = Path(path)
    header = read_header(path)
    want = expected_act_scales(cfg)
    missing = [n for n in want if n not in header.tensors]
    extra = sorted(set(header.tensors) - set(want))
    if missing or extra:
        raise QuantizationError(f"{path} does not fit this model's {len(want)} expert input scales: "
                                + (f"{len(missing)} missing (e.g. {missing[0]!r})" if missing else "")
                                + ("; " if missing and extra else "")
                                + (f"{len(extra)} unexpected (e.g. {extra[0]!r})" if extra else ""))
    for name in want:
        t = header.tensors[name]
        if t.dtype.value != "F32" or t.shape != (1,):
            raise QuantizationError(f"{path}: {name!r} is {t.dtype.value} {list(t.shape)}, expected F32 [1]")
    out: dict[str, float] = {}
    with safe_open(str(path), framework="pt") as fh:
        for name in want:
            value = float(fh.get_tensor(name)[0])
            if not (value > 0 and value < float("inf")):
                raise QuantizationError(f"{path}: {name!r} is {value}, not a finite positive scale")
            out[name] = value
    return out


def int4_expert(reader: TensorReader, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Upstream rounds the dequantized weight to BF16 before taking group amax; do the same so scales agree.
    w = reader.dequantized(name, dtype=torch.bfloat16).to(torch.float32)
    q, s = int4.quantize(w)
    return int4.pack(q, along="in"), s


def plan_shards(reader: TensorReader, cfg: ModelConfig, act_scales: dict[str, float]) -> list[list[Planned]]:
    """Output shards mirroring the source's; each routed expert weight replaced in place by its INT4 form."""
    kinds = {s.name: s for s in build_catalog(cfg)}
    shards: list[list[Planned]] = []
    for names in source_shards(reader):
        entries: list[Planned] = []
        for name in names:
            spec = kinds.get(name)
            main_expert = spec is not None and spec.kind in EXPERT_KINDS and not is_mtp_tensor(name, cfg)
            if not main_expert:
                entries.append(passthrough(reader, name))
                continue
            if spec.is_scale:
                continue  # written right after its weight
            rows, cols = reader.shape(name)
            cache: dict[str, torch.Tensor] = {}

            def weight(name=name, cache=cache):
                cache["packed"], cache["scale"] = int4_expert(reader, name)
                yield cache.pop("packed")

            def scale(cache=cache):
                yield cache.pop("scale")
            entries.append(computed(name, _dt("I8"), (rows, cols // 2), weight))
            entries.append(computed(name[: -len("weight")] + "weight_scale_inv", _dt("F32"),
                                    (rows, cols // int4.GROUP), scale))
            prefix = name.rsplit(".", 2)[0]
            scale_name = f"{prefix}.{W4A8_EXPERT_NAMES[spec.kind]}.input_scale"
            value = torch.tensor([act_scales[scale_name]], dtype=torch.float32)
            entries.append(computed(scale_name, _dt("F32"), (1,), lambda v=value: [v]))
        shards.append(entries)
    return shards


def _dt(name: str):
    return Dtype(name)


@torch.no_grad()
def calibrate_expert_inputs(model, tokens: torch.Tensor, cfg: ModelConfig, *,
                            progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """``w{1,2,3}.input_scale`` of every routed expert of the main model: input amax / 448 over the prompts, each
    expert seeing every token of its layer (an expert no prompt routes to still gets a representative scale)."""

    amax: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, PerExpertExperts):
            module.calibrate_all = True
            for e, expert in enumerate(module):
                prefix = f"{name}.{e}"
                for proj, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                    key = f"{prefix}.{w}.input_scale"

                    def hook(_m, args, key=key):
                        amax[key] = max(amax.get(key, 0.0), float(args[0].abs().amax()))
                    handles.append(getattr(expert, proj).register_forward_pre_hook(hook))
    try:
        for i in range(len(tokens)):
            model(tokens[i: i + 1])
            if progress:
                progress(i + 1)
    finally:
        for h in handles:
            h.remove()
        for module in model.modules():
            if isinstance(module, PerExpertExperts):
                module.calibrate_all = False
    return {k: max(v, 1e-12) / FP8_MAX for k, v in amax.items()}
