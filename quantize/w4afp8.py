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
  ``quantized_layers``: attention (``fused_a``, ``q_b_proj``, ``kv_b_proj``, ``o_proj``), shared experts and dense
  MLPs (``gate_up_proj``, ``down_proj``) ``FP8_BLOCK_SCALES``; ``mlp.experts`` ``W4A8_AWQ``.

Beyond the upstream script: the MTP layer is kept (its experts stay block FP8 and are listed as
``FP8_BLOCK_SCALES``, so MTP speculative decoding still loads; upstream silently drops the layer), and the V3.2 DSA
indexer's ``wq_b`` is listed (its ``wk`` is fused into ``fused_a`` by TensorRT-LLM; ``weights_proj`` stays fp32).

The weight conversion streams tensor by tensor (no calibration needed). The activation scales need a forward pass:
transformers' ``DeepseekV32ForCausalLM`` on the dequantized model with every expert run on every token of its layer
during calibration (as ModelOpt calibrates MoE), amax recorded by hooks on each expert's linears. That needs the
model in memory; for the full model use ``gpu_commands``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from builder.model.catalog import build_catalog, is_mtp_tensor
from builder.model.config import ModelConfig
from quantize import int4
from quantize.formats import EXPERT_KINDS, W4A8_EXPERT_NAMES
from quantize.fp8_tensor import FP8_MAX
from quantize.stream import Planned, TensorReader, computed, passthrough, source_shards

ATTN_LAYERS = ("fused_a", "q_b_proj", "kv_b_proj", "o_proj")
MLP_LAYERS = ("gate_up_proj", "down_proj")


def quant_cfg(cfg: ModelConfig, kv_cache_quant_algo: str | None) -> dict[str, Any]:
    fp8 = {"quant_algo": "FP8_BLOCK_SCALES"}
    layers: dict[str, Any] = {}
    for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
        p = f"model.layers.{i}"
        for n in ATTN_LAYERS:
            layers[f"{p}.self_attn.{n}"] = fp8
        if cfg.has_indexer:
            layers[f"{p}.self_attn.indexer.wq_b"] = fp8
        if not cfg.is_moe_layer(i):
            for n in MLP_LAYERS:
                layers[f"{p}.mlp.{n}"] = fp8
            continue
        for n in MLP_LAYERS:
            layers[f"{p}.mlp.shared_experts.{n}"] = fp8
        layers[f"{p}.mlp.experts"] = fp8 if i >= cfg.num_hidden_layers else {"quant_algo": "W4A8_AWQ"}
    return {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": kv_cache_quant_algo, "quantized_layers": layers}


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
    from builder.model.catalog import Dtype

    return Dtype(name)


@torch.no_grad()
def calibrate_expert_inputs(model, tokens: torch.Tensor, cfg: ModelConfig, *,
                            progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """``w{1,2,3}.input_scale`` of every routed expert of the main model: input amax / 448 over the prompts, each
    expert seeing every token of its layer (an expert no prompt routes to still gets a representative scale)."""
    from quantize.hf_experts import PerExpertExperts

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
