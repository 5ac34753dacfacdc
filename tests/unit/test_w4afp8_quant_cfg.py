"""``quant_cfg.json`` of ``--quant w4afp8`` lists every FP8 linear of every layer (MTP included) by the exact module
name TensorRT-LLM gives it (issue 17 item 3). The expected list is derived here from the tensor catalogue of the
w4afp8 checkpoint and the module-name rules of docs/tensorrt-llm-contract.md (C-QCFG-1, C-DSV3-1, C-DSV3-4) — not from
the writer."""

from __future__ import annotations

import pytest

from builder.model.catalog import Dtype, Kind
from builder.model.config import preset, tiny_config
from quantize.formats import quantized_catalog
from quantize.w4afp8_config import quant_cfg

# Catalogue kind -> TensorRT-LLM module (relative to model.layers.L). q_a and kv_a are one fused Linear named
# kv_a_proj_with_mqa (C-DSV3-1); gate and up are one fused gate_up_proj (C-QCFG-1); the routed experts are one
# MoE module looked up as model.layers.L.mlp.experts (C-DSV3-4).
MODULE_OF_KIND = {
    Kind.Q_A: "self_attn.kv_a_proj_with_mqa", Kind.KV_A: "self_attn.kv_a_proj_with_mqa",
    Kind.Q_B: "self_attn.q_b_proj", Kind.KV_B: "self_attn.kv_b_proj", Kind.O_PROJ: "self_attn.o_proj",
    Kind.IDX_WQ_B: "self_attn.indexer.wq_b", Kind.IDX_WK: "self_attn.indexer.wk",
    Kind.DENSE_GATE: "mlp.gate_up_proj", Kind.DENSE_UP: "mlp.gate_up_proj", Kind.DENSE_DOWN: "mlp.down_proj",
    Kind.SHARED_GATE: "mlp.shared_experts.gate_up_proj", Kind.SHARED_UP: "mlp.shared_experts.gate_up_proj",
    Kind.SHARED_DOWN: "mlp.shared_experts.down_proj",
    Kind.EXPERT_GATE: "mlp.experts", Kind.EXPERT_UP: "mlp.experts", Kind.EXPERT_DOWN: "mlp.experts",
}
ALGO_OF_DTYPE = {Dtype.F8_E4M3: "FP8_BLOCK_SCALES", Dtype.I8: "W4A8_AWQ"}


def expected_layers(cfg) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for spec in quantized_catalog(cfg, "w4afp8").specs:
        if spec.is_scale or spec.dtype not in ALGO_OF_DTYPE:
            continue  # unquantized (norms, router, weights_proj, embeddings, MTP eh_proj/head): no entry
        name = f"model.layers.{spec.layer}.{MODULE_OF_KIND[spec.kind]}"
        algo = {"quant_algo": ALGO_OF_DTYPE[spec.dtype]}
        assert out.setdefault(name, algo) == algo, f"{name}: one module, one quant config"
    return out


@pytest.mark.parametrize("cfg", [preset("deepseek-v3.2"), tiny_config()], ids=["deepseek-v3.2", "tiny"])
def test_every_fp8_linear_is_listed_by_its_exact_module_name(cfg):
    written = quant_cfg(cfg, "FP8")
    assert written["quant_algo"] == "MIXED_PRECISION" and written["kv_cache_quant_algo"] == "FP8"
    assert written["quantized_layers"] == expected_layers(cfg)


def test_real_model_counts_and_the_indexer_wk_rule():
    cfg = preset("deepseek-v3.2")
    layers = quant_cfg(cfg, None)["quantized_layers"]
    every_layer = range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers)  # 0..61, the MTP layer included
    for i in every_layer:
        fused = layers[f"model.layers.{i}.self_attn.kv_a_proj_with_mqa"]
        # TensorRT-LLM copies indexer.wk into the fused projection and asserts equal dtypes (C-DSV3-1).
        assert layers[f"model.layers.{i}.self_attn.indexer.wk"] == fused == {"quant_algo": "FP8_BLOCK_SCALES"}
        assert layers[f"model.layers.{i}.self_attn.indexer.wq_b"] == fused
    experts = {k: v["quant_algo"] for k, v in layers.items() if k.endswith(".mlp.experts")}
    assert len(experts) == 58 + 1  # 58 MoE layers + the MTP layer
    assert experts["model.layers.61.mlp.experts"] == "FP8_BLOCK_SCALES"  # MTP experts stay block FP8
    assert sum(v == "W4A8_AWQ" for v in experts.values()) == 58
    assert not any("fused_a" in k or "weights_proj" in k or "eh_proj" in k for k in layers)
    assert len(layers) == 62 * 6 + 3 * 2 + 59 * 3  # 4 attention + 2 indexer; dense MLP 2; shared 2 + experts
