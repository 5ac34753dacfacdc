"""``--quant nvfp4`` is the recipe of NVIDIA's FP4 DeepSeek checkpoints (docs/tensorrt-llm-contract.md#C-NVFP4-1):
MLA's query/key-value projections and the DSA indexer stay BF16, o_proj, dense MLPs, shared and routed experts are
NVFP4, the MTP layer BF16. Checked here against hand computations on DeepSeek-V3.2's shapes: the stored catalogue,
the attention bytes of a rank at attention-DP 8 and TP 8, the dtype each GEMM runs in, and its tensor-core time."""

from __future__ import annotations

import pytest

from builder.layout import Layout
from builder.model.catalog import Dtype, Kind
from builder.model.config import preset
from builder.plan.hardware import load_hardware
from builder.plan.memory import stage_weights, weight_catalog
from builder.plan.perf import ModelShapes, Rates
from quantize.formats import quantized_catalog, unquantized_linears

H, Q_LORA, KV_LORA, ROPE, NOPE, V_HEAD, HEADS = 7168, 1536, 512, 64, 128, 128, 128
IDX_HEADS, IDX_DIM = 64, 128
BF16_LINEARS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "indexer.wq_b", "indexer.wk")
CFG = preset("deepseek-v3.2")


def nvfp4_bytes(rows: int, cols: int) -> int:
    """Packed e2m1 pairs, an FP8 scale per 16 inputs, and the F32 weight_scale_2 and input_scale scalars."""
    return rows * cols // 2 + rows * cols // 16 + 4 + 4


def attention_bytes(heads: int) -> int:
    """One decoder layer's attention on a rank holding ``heads`` heads (q_a, kv_a and the indexer replicated)."""
    replicated = 2 * (H * Q_LORA + H * (KV_LORA + ROPE) + Q_LORA * IDX_HEADS * IDX_DIM + H * IDX_DIM
                      + H * IDX_HEADS)  # BF16, weights_proj included (stored BF16)
    norms = 2 * (Q_LORA + KV_LORA + 2 * H + 2 * IDX_DIM)  # q_a/kv_a/input/post norms, k_norm weight and bias
    per_head = 2 * (Q_LORA * (NOPE + ROPE) + KV_LORA * (NOPE + V_HEAD))  # q_b, kv_b in BF16
    return replicated + norms + heads * per_head + nvfp4_bytes(H, heads * V_HEAD)


def test_the_catalogue_keeps_mla_projections_and_the_indexer_bf16():
    cat = quantized_catalog(CFG, "nvfp4")
    layer = [s for s in cat.specs if s.layer == 5 and not s.is_scale and s.expert in (None, 0)]
    dtypes = {s.layer_module: s.dtype for s in layer}
    for name in BF16_LINEARS:
        assert dtypes[f"self_attn.{name}"] is Dtype.BF16, name
    for name in ("self_attn.o_proj", "mlp.shared_experts.gate_proj", "mlp.experts.0.down_proj"):
        assert dtypes[name] is Dtype.U8, name
    mtp = [s for s in cat.specs if s.layer == CFG.num_hidden_layers and not s.is_scale]
    assert mtp and all(s.dtype in (Dtype.BF16, Dtype.F32) for s in mtp)  # the MTP layer is not quantized
    assert unquantized_linears(CFG, "nvfp4") == sorted(f"self_attn.{n}" for n in BF16_LINEARS)
    assert unquantized_linears(CFG, "fp8-tensor") == unquantized_linears(CFG, "int4-awq") == []


@pytest.mark.parametrize("layout,heads", [(Layout(8, 1, 8, True), HEADS), (Layout(8, 1, 8), HEADS // 8)],
                         ids=["attention-dp8", "tp8"])
def test_attention_bytes_of_a_rank_are_the_hand_computation(layout, heads):
    w = stage_weights(weight_catalog(CFG, "nvfp4"), layout)[0][0]
    assert w.moe_layer.attention == attention_bytes(heads)


def test_each_gemm_runs_in_the_dtype_its_weight_is_stored_in():
    cat = weight_catalog(CFG, "nvfp4")
    for kind in (Kind.Q_A, Kind.Q_B, Kind.KV_A, Kind.KV_B, Kind.IDX_WQ_B, Kind.IDX_WK, Kind.LM_HEAD):
        assert cat.compute_dtypes[kind] == "bf16", kind
    for kind in (Kind.O_PROJ, Kind.DENSE_GATE, Kind.SHARED_DOWN, Kind.EXPERT_UP):
        assert cat.compute_dtypes[kind] == "fp4", kind
    assert set(cat.mtp_compute_dtypes.values()) == {"bf16"}
    fp8 = weight_catalog(CFG, "fp8")
    assert {fp8.compute_dtypes[k] for k in (Kind.Q_A, Kind.O_PROJ, Kind.EXPERT_UP)} == {"fp8"}
    assert weight_catalog(CFG, "w4afp8").compute_dtypes[Kind.EXPERT_UP] == "fp8"  # INT4 weights, FP8 activations
    assert weight_catalog(CFG, "int4-awq").compute_dtypes[Kind.EXPERT_UP] == "bf16"  # W4A16


def test_attention_projection_time_is_the_sum_over_dtypes_by_hand():
    b200 = load_hardware().gpu("b200")
    rates = Rates.of(b200, kv_cache_dtype="fp8")
    shapes = ModelShapes(CFG, Layout(8, 1, 8, True), weight_catalog(CFG, "nvfp4").compute_dtypes)
    params = shapes.attention_params
    bf16 = (H * Q_LORA + H * (KV_LORA + ROPE) + HEADS * Q_LORA * (NOPE + ROPE) + HEADS * KV_LORA * (NOPE + V_HEAD)
            + Q_LORA * IDX_HEADS * IDX_DIM + H * IDX_DIM + H * IDX_HEADS)
    assert params == {"bf16": bf16, "fp4": HEADS * V_HEAD * H}
    rows = 4096
    expected = sum(2 * n * (rows + b200.gemm_half_rows) / (b200.peak_tflops(d) * 1e12 * b200.compute_efficiency)
                   for d, n in params.items())
    assert rates.gemm_seconds(params, rows) == pytest.approx(expected, rel=1e-12)
    # A grouped GEMM of 64 experts with gemm_half_rows tokens each runs at half the large-GEMM rate.
    experts, fp4 = 64, {"fp4": 1e8}
    half = rates.gemm_seconds(fp4, experts * b200.gemm_half_rows, experts)
    assert half == pytest.approx(2 * 2 * 1e8 * experts * b200.gemm_half_rows / rates.gemm["fp4"], rel=1e-12)
    # BF16 runs at a quarter of B200's dense FP4 rate: the BF16 projections cost more than o_proj although smaller.
    assert b200.peak_tflops("fp4") == 4 * b200.peak_tflops("bf16")
