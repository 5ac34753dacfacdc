"""Planner: links and collective times, feasibility reasons, search and ranking, hardware overrides, JSON shape."""

from __future__ import annotations

import pytest

from builder.errors import SpecError
from builder.plan.search import plan_cluster
from builder.plan.hardware import GPUS, Cluster, NETWORKS, load_hardware
from builder.plan.perf import Placement, expert_fraction_read
from builder.layout import Layout

DS = "deepseek-v3.2"
LAYOUT_KEYS = {"tp", "pp", "ep", "attention_dp", "gpus", "feasible", "reasons", "memory_per_gpu_gib",
               "max_concurrent_sequences", "decode_step_ms", "tokens_per_s_per_gpu", "tokens_per_s_per_user", "comm"}


def one(**kw):
    (lp,) = plan_cluster(model=DS, **kw).layouts
    return lp


def test_groups_use_the_link_they_cross():
    cluster = Cluster(GPUS["h200-sxm"], NETWORKS["ib-ndr"], nodes=2, gpus_per_node=8)
    inside = Placement.of(cluster, Layout(tp=8, pp=2))
    assert inside.tp.kind == "nvlink" and [p.kind for p in inside.pp] == ["ib-ndr"]
    across = Placement.of(cluster, Layout(tp=16, pp=1))
    assert across.tp.kind == "ib-ndr" and across.tp.gb_s == 50
    pcie = Placement.of(Cluster(GPUS["l40s"], NETWORKS["ib-ndr"], 1, 8), Layout(tp=4, pp=2))
    assert pcie.tp.kind == "pcie" and [p.kind for p in pcie.pp] == ["pcie"]


def test_tp_allreduce_time_is_the_ring_formula_over_nvlink():
    lp = one(gpu="h200-sxm", tp=8, pp=1, ep=8, attention_dp=False, concurrency=64)
    ar = lp.to_dict()["comm"]["decode_step"]["tp_allreduce"]
    size = 64 * 7168 * 2  # the batch's bf16 hidden states
    per = 6e-6 + size * 2 * 7 / 8 / (450e9 * 0.8)  # latency + ring all-reduce at 80 % of NVLink
    assert ar["link"] == "nvlink"
    assert ar["bytes"] == 2 * 61 * size  # two all-reduces per decoder layer (the MTP layer does not run here)
    assert ar["ms"] == pytest.approx(2 * 61 * per * 1e3, rel=1e-3)


def test_attention_dp_replaces_allreduces_with_the_ep_all_to_all():
    d = one(gpu="h200-sxm", tp=8, pp=1, ep=8, attention_dp=True, concurrency=64).to_dict()
    c = d["comm"]["decode_step"]
    assert c["tp_allreduce"]["bytes"] == 0
    local = 64 / 8
    per_layer = local * 8 * ((7168 + 4 * 7168 / 128 + 16) + 2 * 7168) * 7 / 8  # FACTS §5 dispatch + combine
    assert c["ep_dispatch_combine"]["bytes"] == pytest.approx(58 * per_layer, rel=1e-6)


def test_expert_reads_saturate_with_batch():
    from builder.model.config import preset

    cfg = preset(DS)
    assert expert_fraction_read(cfg, 1) == pytest.approx(8 / 256)
    assert expert_fraction_read(cfg, 256) > 0.99


def test_decode_step_is_the_sum_of_its_kernels_and_faster_on_more_bandwidth():
    h200 = one(gpu="h200-sxm", tp=8, pp=1, ep=8, attention_dp=False)
    b200 = one(gpu="b200", tp=8, pp=1, ep=8, attention_dp=False)
    assert b200.decode.step_ms < h200.decode.step_ms
    step = h200.to_dict()["decode_breakdown_ms"]
    assert step["stage"] == pytest.approx(step["weights_read"] + step["kv_read"] + step["compute"] + step["comm"]
                                          + step["kernel_latency"], abs=1e-3)
    assert step["kernel_latency"] == pytest.approx(61 * GPUS["h200-sxm"].layer_overhead_us / 1e3, abs=1e-3)


@pytest.mark.parametrize("kw,reason", [
    (dict(gpu="h200-sxm", quant="nvfp4", tp=8, pp=1, ep=8, attention_dp=False), "nvfp4 needs Blackwell"),
    (dict(gpu="a100-sxm-80g", nodes=4, quant="fp8", tp=8, pp=4, ep=8, attention_dp=False), "fp8 needs"),
    (dict(gpu="h100-sxm", tp=8, pp=1, ep=8, attention_dp=False), "out of memory on PP stage 0"),
    (dict(gpu="h200-sxm", tp=16, pp=1, ep=16, attention_dp=False), "needs 16 GPUs"),
    (dict(gpu="h200-sxm", nodes=4, tp=32, pp=1, ep=1, attention_dp=False), "cuts its 128x128 FP8 blocks"),
    (dict(gpu="h200-sxm", tp=8, pp=1, ep=3, attention_dp=False), "must divide TP"),
    (dict(gpu="h200-sxm", tp=8, pp=1, ep=8, attention_dp=False, isl=4_000_000, osl=1, max_num_tokens=8192),
     "KV cache holds no sequence"),
    # Without a chunk limit the profiling forward of max_num_tokens = one whole 4M-token prompt cannot fit.
    (dict(gpu="h200-sxm", tp=8, pp=1, ep=8, attention_dp=False, isl=4_000_000, osl=1), "+ activations"),
])
def test_infeasible_layouts_say_why(kw, reason):
    lp = one(**kw)
    assert not lp.feasible
    assert any(reason in r for r in lp.reasons), lp.reasons


def test_communication_bound_layouts_are_flagged():
    across = one(gpu="h200-sxm", nodes=2, tp=16, pp=1, ep=16, attention_dp=False)
    assert across.feasible and any("spans nodes" in w and "communication-bound" in w for w in across.warnings)
    pcie = plan_cluster(model="tiny", gpu="l40s", tp=4, pp=1, ep=1, attention_dp=False).layouts[0]
    assert any("over PCIe" in w for w in pcie.warnings)


def test_search_keeps_all_reduces_inside_the_node_for_two_h200_nodes():
    r = plan_cluster(model=DS, gpu="h200-sxm", nodes=2)
    rec = r.to_dict()["recommended"]
    assert rec["feasible"] and (rec["links"]["tp"] == "nvlink" or rec["attention_dp"])
    # TP16 without attention-DP puts two all-reduces per layer on InfiniBand: slower than TP8 inside each node.
    by_name = {lp.name: lp for lp in r.layouts}
    assert by_name["tp16pp1ep16"].tokens_per_s_per_gpu < by_name["tp8pp1ep8x2"].tokens_per_s_per_gpu
    assert by_name["tp16pp1ep16"].decode.comm.tp_allreduce.link == "ib-ndr"
    names = set(by_name)
    assert {"tp8pp2ep8", "tp16pp1ep16", "tp8pp1ep8x2", "tp16pp1ep16adp"} <= names
    assert "Over " in r.to_dict()["rationale"]


def test_sixteen_h100_need_two_nodes_and_eight_h100_are_too_few():
    assert plan_cluster(model=DS, gpu="h100-sxm", nodes=1).recommended is None
    r = plan_cluster(model=DS, gpu="h100-sxm", nodes=2)
    assert r.recommended is not None and r.recommended.gpus_per_replica == 16


def test_fixed_dimensions_restrict_the_search():
    r = plan_cluster(model=DS, gpu="h200-sxm", nodes=2, tp=8)
    assert {lp.layout.tp for lp in r.layouts} == {8} and r.searched
    r = plan_cluster(model=DS, gpu="h200-sxm", nodes=2, tp=8, pp=2, ep=8, attention_dp=False)
    assert len(r.layouts) == 1 and not r.searched


def test_tpot_limit_lowers_the_batch_until_it_is_met():
    free = one(gpu="h200-sxm", tp=8, pp=1, ep=8, attention_dp=False, concurrency=256)
    limited = one(gpu="h200-sxm", tp=8, pp=1, ep=8, attention_dp=False, concurrency=256,
                  tpot_ms=free.decode.step_ms * 0.9)
    assert limited.batch < free.batch and limited.decode.step_ms <= free.decode.step_ms * 0.9
    assert limited.meets_slo
    hopeless = one(gpu="h200-sxm", tp=8, pp=1, ep=8, attention_dp=False, tpot_ms=0.5)
    assert not hopeless.meets_slo and hopeless.batch == 1


def test_cpu_profile_runs_the_tiny_model_with_the_requested_ranks():
    r = plan_cluster(model="tiny", requested=Layout(2, 2, 1))
    assert r.cluster.gpu.name == "cpu" and r.cluster.gpus == 4
    assert r.requested is not None and r.requested.feasible


def test_hardware_file_overrides_and_adds_entries(tmp_path):
    f = tmp_path / "hw.yaml"
    f.write_text("gpus:\n  h200-sxm: {memory_gib: 100}\n  my-gpu: {arch: hopper, memory_gib: 96, hbm_tb_s: 4.0, "
                 "bf16_tflops: 989, fp8_tflops: 1979, scale_up: nvlink, scale_up_gb_s: 450}\n"
                 "networks:\n  my-net: {gb_s: 100, latency_us: 3}\n")
    table = load_hardware(f)
    assert table.gpu("h200-sxm").memory_gib == 100 and table.gpu("h200-sxm").hbm_tb_s == 4.8
    assert table.gpu("my-gpu").memory_gib == 96 and table.network("my-net").gb_s == 100
    small = one(gpu="h200-sxm", hardware_file=f, tp=8, pp=1, ep=8, attention_dp=False)
    big = one(gpu="h200-sxm", tp=8, pp=1, ep=8, attention_dp=False)
    assert small.max_seqs_replica < big.max_seqs_replica
    assert one(gpu="my-gpu", network="my-net", hardware_file=f, tp=8, pp=1, ep=8, attention_dp=False).feasible


@pytest.mark.parametrize("text,msg", [
    ("gpus:\n  h200-sxm: {memory: 1}\n", "h200-sxm.memory"),
    ("gpus:\n  new-gpu: {memory_gib: 10}\n", "new GPU 'new-gpu' needs"),
    ("gpus:\n  h200-sxm: {hbm_efficiency: 2}\n", "hbm_efficiency: Input should be less than or equal to 1"),
    ("gpus: [1, 2\n", "not valid YAML"),
])
def test_bad_hardware_files_are_named(tmp_path, text, msg):
    f = tmp_path / "hw.yaml"
    f.write_text(text)
    with pytest.raises(SpecError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_hardware(f)


def test_unknown_gpu_and_network_are_named():
    with pytest.raises(SpecError, match="unknown GPU 'h300'"):
        plan_cluster(model=DS, gpu="h300")
    with pytest.raises(SpecError, match="unknown network 'carrier-pigeon'"):
        plan_cluster(model=DS, gpu="h200-sxm", network="carrier-pigeon")


def test_json_has_the_interface_others_depend_on():
    d = plan_cluster(model=DS, gpu="h200-sxm", nodes=2).to_dict()
    assert {"layouts", "recommended"} <= set(d)
    for layout in d["layouts"]:
        assert LAYOUT_KEYS <= set(layout)
    rec = d["recommended"]
    assert set(rec["memory_per_gpu_gib"]) >= {"weights", "kv_cache", "activations", "reserve", "total"}
    assert rec in d["layouts"]
