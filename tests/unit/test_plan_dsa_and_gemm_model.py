"""The speed model's DSA costs and its GEMM efficiency against hand computations (docs/choosing-a-layout.md, "What
the model is"): the indexer's top-k as one row per SM at tech blog 19's single-row times, every query token of a
V3.2 prefill gathering its own top-k latents, the busiest attention-DP rank setting the decode step, and a GEMM of
M token rows costing M + ``gemm_half_rows`` rows at the large-GEMM rate."""

from __future__ import annotations

from dataclasses import replace

import pytest

from builder.layout import Layout
from builder.model.config import preset
from builder.plan.hardware import HardwareTable, load_hardware
from builder.plan.memory import PlaceBytes, weight_catalog
from builder.plan.perf import ModelShapes, Rates, StageTime, _layer, mean_prefill_keys, topk_seconds
from builder.plan.search import plan_cluster

V32 = preset("deepseek-v3.2")
B200 = load_hardware().gpu("b200")


def test_topk_reproduces_the_single_row_times_it_is_taken_from():
    # Tech blog 19, Table 1, production radix kernel, one row (one CTA) on a B200: 21,984 ns and 76,128 ns.
    assert topk_seconds(1, 16384, B200.sms) == pytest.approx(21.984e-6, rel=1e-3)
    assert topk_seconds(1, 131072, B200.sms) == pytest.approx(76.128e-6, rel=1e-3)
    # Tech blog 15: 64 rows of 9295 scores in 14.3 us on average; the line through the long rows gives 18.7 us.
    assert topk_seconds(64, 9295, B200.sms) == pytest.approx(14.327e-6, rel=0.35)
    # Rows beyond the SM count take another wave; rows below it run at once.
    one = topk_seconds(1, 65536, B200.sms)
    assert topk_seconds(B200.sms, 65536, B200.sms) == one
    assert topk_seconds(B200.sms + 1, 65536, B200.sms) == 2 * one


def test_v32_prefill_gathers_every_query_tokens_own_topk_latents():
    """Sparse MLA shares no key among a tile of queries: the kernel reads own x top-k latents from memory. With
    tensor cores made free, the attention kernel's time is exactly those bytes over the achieved bandwidth."""
    layout = Layout(tp=4, pp=1, ep=1, attention_dp=False)
    rates = Rates.of(B200, kv_cache_dtype="fp8")
    free = replace(rates, gemm={d: 1e30 for d in rates.gemm}, attention=1e30, context_attention=1e30, layer_s=0.0,
                   draft_s=0.0)
    shapes = ModelShapes(V32, layout, weight_catalog(V32, "nvfp4").compute_dtypes)
    latent = V32.kv_lora_rank + V32.qk_rope_head_dim  # FP8 KV: one byte per element
    cache = latent + V32.indexer_cache_bytes_per_token_per_layer  # what a token of the layer's cache holds
    own = 8192
    keys, scored = mean_prefill_keys(V32, 0, own)
    t = StageTime()
    _layer(t, shapes, free, PlaceBytes(), moe=False, tokens=own, own=own, seqs=0, keys=keys, scored=scored,
           kv_bytes_per_token_layer=cache, prefill=True)
    assert keys < V32.index_topk  # positions below top-k attend their whole prefix
    assert t.kv_ms == pytest.approx(own * keys * latent / free.hbm * 1e3, rel=1e-12)
    # R1/V3's dense prefill (MHA over up-projected keys) reads no latents per query.
    r1 = preset("deepseek-v3")
    t = StageTime()
    _layer(t, ModelShapes(r1, layout, weight_catalog(r1, "nvfp4").compute_dtypes), free, PlaceBytes(), moe=False,
           tokens=own, own=own, seqs=0, keys=own / 2, scored=0, kv_bytes_per_token_layer=latent, prefill=True)
    assert t.kv_ms == 0


def test_a_lone_request_under_attention_dp_costs_a_whole_rank():
    """Batch 1 at attention-DP 8: one rank runs the request's attention while seven wait in the MoE, so its decode
    step reads one whole sequence's cache, as batch 8 (one per rank) does -- not an eighth of it."""
    table = load_hardware()  # tensor cores made (nearly) free: attention is its cache reads alone
    fast = replace(table.gpu("b200"), bf16_tflops=1e9, fp8_tflops=1e9, fp4_tflops=1e9)
    table = HardwareTable(table.gpus | {"b200": fast}, table.networks)

    def kv_read(concurrency: int) -> float:
        plan = plan_cluster(model="deepseek-v3", gpu="b200", hardware=table, tp=8, pp=1, ep=8, attention_dp=True,
                            quant="nvfp4", isl=65536, osl=1024, concurrency=concurrency)
        (lp,) = plan.layouts
        return lp.to_dict()["decode_breakdown_ms"]["kv_read"]

    one, eight = kv_read(1), kv_read(8)
    assert one > 0
    assert one == pytest.approx(eight, rel=1e-9)


def test_a_gemm_costs_its_rows_plus_gemm_half_rows_at_the_large_gemm_rate():
    rates = Rates.of(B200, kv_cache_dtype="fp8")
    n = {"fp4": 44e6}
    large = rates.gemm_seconds(n, 1e6)
    assert large == pytest.approx(2 * 44e6 * (1e6 + B200.gemm_half_rows) / rates.gemm["fp4"], rel=1e-12)
    # 256 experts with 16 tokens each: far below the rate of one expert with 4096 tokens.
    grouped = rates.gemm_seconds(n, 256 * 16, 256)
    assert grouped / (256 * 16) > 3 * rates.gemm_seconds(n, 4096) / 4096
    assert 1 <= B200.gemm_half_rows <= 1024
