"""Planner memory arithmetic: weights per rank against plan_ranks over the full catalogue, KV per token against
DeepSeek's published cache layout, KV capacity against the memory left on the GPU."""

from __future__ import annotations

import pytest

from builder.errors import LayoutError
from builder.layout import Layout
from builder.model.config import preset, tiny_config
from builder.plan.memory import FREE_GPU_MEMORY_FRACTION, kv_bytes_per_token_per_layer, stage_weights, weight_catalog
from builder.plan.search import plan_cluster
from builder.shard.rules import plan_ranks
from quantize.formats import quantized_catalog

GIB = 1 << 30
MODES = ("fp8", "bf16", "w4afp8", "int4-awq", "nvfp4", "fp8-tensor")
TINY_LAYOUTS = [Layout(t, p, e, a) for t in (1, 2, 4, 8) for p in (1, 2, 4) for e in (1, 2, 4, 8)
                for a in (False, True) if e <= t]


def _full(cfg, mode, layout):
    qc = quantized_catalog(cfg, mode)
    return [r.nbytes for r in plan_ranks(cfg, layout, qc.specs, weight_shapes=qc.logical_shapes)]


def _fast(cfg, mode, layout):
    return [r.total for row in stage_weights(weight_catalog(cfg, mode), layout) for r in row]


@pytest.mark.parametrize("mode", MODES)
def test_fast_weights_equal_plan_ranks_over_the_full_catalogue_for_every_tiny_layout(mode):
    cfg = tiny_config()
    for layout in TINY_LAYOUTS:
        try:
            expected = _full(cfg, mode, layout)
        except LayoutError as exc:
            with pytest.raises(LayoutError) as got:
                _fast(cfg, mode, layout)
            assert str(got.value) == str(exc)
            continue
        assert _fast(cfg, mode, layout) == expected, layout


@pytest.mark.slow
@pytest.mark.parametrize("mode,layout", [("fp8", Layout(8, 1, 8)), ("fp8", Layout(8, 2, 4, True)),
                                         ("w4afp8", Layout(8, 1, 8)), ("nvfp4", Layout(4, 2, 4))])
def test_fast_weights_equal_plan_ranks_for_deepseek_v32(mode, layout):
    cfg = preset("deepseek-v3.2")
    assert _fast(cfg, mode, layout) == _full(cfg, mode, layout)


def test_catalogue_total_is_the_whole_checkpoint():
    cfg = preset("deepseek-v3.2")
    cat = weight_catalog(cfg, "fp8")
    # DeepSeek-V3.2's FP8 checkpoint: 671B main + ~14B MTP parameters, ~642 GiB with scales (docs/upstream-facts.md#U-DS-1).
    assert 640 < cat.total_bytes / GIB < 645
    tiny = tiny_config()
    assert weight_catalog(tiny, "w4afp8").total_bytes == sum(s.nbytes for s in quantized_catalog(tiny, "w4afp8").specs)


def test_kv_bytes_per_token_follow_mla_and_the_dsa_indexer():
    v32, v3 = preset("deepseek-v3.2"), preset("deepseek-v3")
    assert kv_bytes_per_token_per_layer(v32, "fp8") == 576 + 132
    assert kv_bytes_per_token_per_layer(v32, "bf16") == 1152 + 132
    assert kv_bytes_per_token_per_layer(v3, "fp8") == 576


def test_kv_capacity_is_the_memory_left_after_weights_activations_and_reserve():
    r = plan_cluster(model="deepseek-v3.2", gpu="h200-sxm", tp=8, pp=1, ep=8, attention_dp=False)
    lp = r.layouts[0]
    d = lp.to_dict()
    assert d["feasible"] and d["gpus"] == 8
    full = _full(preset("deepseek-v3.2"), "fp8", Layout(8, 1, 8))
    assert d["weights_per_rank_bytes"] == full  # the rank files, exactly
    weights = max(d["runtime_weights_per_rank_bytes"])  # what TensorRT-LLM holds decides the pool
    assert d["memory_per_gpu_gib"]["rank_files"] == pytest.approx(max(full) / GIB, abs=1e-3)
    free = 143771 * (1 << 20) - weights - lp.activations - 2 * GIB
    per_token = 61 * (576 + 132)  # every layer's latent is replicated on each attention-TP rank
    assert d["kv_bytes_per_token_per_gpu"] == per_token
    assert d["max_concurrent_sequences"] == int(free * FREE_GPU_MEMORY_FRACTION) // (per_token * 2048)
    mem = d["memory_per_gpu_gib"]
    assert mem["total"] == pytest.approx(mem["weights"] + mem["kv_cache"] + mem["activations"] + mem["reserve"],
                                         abs=0.01)
    assert 75 < mem["weights"] < 90


def test_attention_dp_splits_sequences_and_pp_splits_layers():
    base = dict(model="deepseek-v3.2", gpu="h200-sxm", nodes=2, ep=8)
    tp = plan_cluster(**base, tp=8, pp=2, attention_dp=False).layouts[0]
    adp = plan_cluster(**base, tp=8, pp=2, attention_dp=True).layouts[0]
    # PP2: 31 + 30 layers. The first stage holds the 3 dense layers (much lighter than MoE layers) and, as
    # TensorRT-LLM loads it, the whole embedding; the last 30 MoE layers and the LM head. Without MTP decoding the
    # MTP module stays out (the rank files carry it on the last stage). The last stage is the fullest GPU either
    # way, and its KV cache holds 30 layers.
    per_rank, held = tp.weights_per_rank, tp.runtime_weights_per_rank
    assert max(per_rank[8:]) - max(per_rank[:8]) > max(held[8:]) - max(held[:8]) > 0
    assert len(tp.weights_per_stage) == 2 and tp.weights_per_stage[1] > tp.weights_per_stage[0]
    assert tp.kv_bytes_per_token == 30 * 708
    assert tp.max_seqs_replica <= tp.kv_pool // (30 * 708 * 2048)
    # Attention-DP: each rank caches only its own requests, so a TP group of 8 holds 8x the sequences.
    assert adp.max_seqs_replica <= 8 * (adp.kv_pool // (30 * 708 * 2048))
    assert adp.max_seqs_replica >= 0.95 * 8 * (adp.kv_pool // (31 * 708 * 2048))
    assert adp.max_seqs_replica > 4 * tp.max_seqs_replica
