"""The ``quant_cfg.json`` of a ``w4afp8`` checkpoint: TensorRT-LLM's per-module quantization of every FP8 linear,
by its exact module name (docs/tensorrt-llm-contract.md#C-QCFG-1; the format itself: ``quantize.w4afp8``). Torch-free,
so ``dsbuild check`` can compare a checkpoint's file against it without importing torch."""

from __future__ import annotations

from typing import Any

from builder.model.config import ModelConfig

# TensorRT-LLM module names (the fused q_a/kv_a projection is named kv_a_proj_with_mqa; ``fused_a`` is its legacy key).
ATTN_LAYERS = ("kv_a_proj_with_mqa", "q_b_proj", "kv_b_proj", "o_proj")
INDEXER_LAYERS = ("wq_b", "wk")
MLP_LAYERS = ("gate_up_proj", "down_proj")


def quant_cfg(cfg: ModelConfig, kv_cache_quant_algo: str | None) -> dict[str, Any]:
    fp8 = {"quant_algo": "FP8_BLOCK_SCALES"}
    layers: dict[str, Any] = {}
    for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
        p = f"model.layers.{i}"
        for n in ATTN_LAYERS:
            layers[f"{p}.self_attn.{n}"] = fp8
        if cfg.has_indexer:
            for n in INDEXER_LAYERS:
                layers[f"{p}.self_attn.indexer.{n}"] = fp8
        if not cfg.is_moe_layer(i):
            for n in MLP_LAYERS:
                layers[f"{p}.mlp.{n}"] = fp8
            continue
        for n in MLP_LAYERS:
            layers[f"{p}.mlp.shared_experts.{n}"] = fp8
        layers[f"{p}.mlp.experts"] = fp8 if i >= cfg.num_hidden_layers else {"quant_algo": "W4A8_AWQ"}
    return {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": kv_cache_quant_algo, "quantized_layers": layers}
