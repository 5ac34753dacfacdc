import pytest

from builder.errors import LayoutError
from builder.layout import Layout
from builder.model.catalog import build_catalog
from builder.model.config import preset
from builder.shard.rules import mlp_tp, plan_ranks


def test_stage_layers_put_the_remainder_on_leading_stages():
    assert [len(s) for s in Layout(pp=2).stage_layers(61)] == [31, 30]
    assert [len(s) for s in Layout(pp=4).stage_layers(61)] == [16, 15, 15, 15]
    assert sum(Layout(pp=8).stage_layers(61), []) == list(range(61))


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("pp", [1, 2, 4])
@pytest.mark.parametrize("ep", [1, 2, 4, 8])
def test_every_tiny_layout_tiles_every_tensor_on_whole_blocks(tp, pp, ep):
    from builder.model.config import tiny_config

    cfg = tiny_config()
    specs = build_catalog(cfg)
    layout = Layout(tp, pp, ep)
    if ep > tp:
        with pytest.raises(LayoutError, match="must divide TP"):
            plan_ranks(cfg, layout, specs)
        return
    plans = plan_ranks(cfg, layout, specs)
    assert len(plans) == tp * pp
    by_name = {}
    for plan in plans:
        for piece in plan.pieces:
            by_name.setdefault(piece.name, []).append((plan, piece))
    assert set(by_name) == {s.name for s in specs}  # nothing is lost
    for spec in specs:
        held = by_name[spec.name]
        assert len({pl.pp_rank for pl, _ in held}) == 1  # on exactly one pipeline stage
        split = [p for _, p in held if not p.whole]
        if not split:
            continue
        dim = split[0].dim
        intervals = sorted({(p.start, p.stop) for p in split})
        # The distinct pieces tile the stored dimension exactly, and weights split on 128-row boundaries.
        assert intervals[0][0] == 0 and intervals[-1][1] == spec.shape[dim]
        assert all(a[1] == b[0] for a, b in zip(intervals, intervals[1:]))
        if not spec.is_scale and spec.dtype.value == "F8_E4M3":
            assert all(start % 128 == 0 for start, _ in intervals)


def test_experts_are_owned_by_one_ep_rank_and_split_by_moe_tp():
    from builder.model.config import tiny_config

    cfg = tiny_config()
    specs = build_catalog(cfg)
    plans = plan_ranks(cfg, Layout(tp=4, pp=1, ep=2), specs)
    name = "model.layers.1.mlp.experts.5.gate_proj.weight"
    holders = {plan.rank: [p for p in plan.pieces if p.name == name] for plan in plans}
    owners = [r for r, ps in holders.items() if ps]
    # TensorRT-LLM numbering: moe_ep_rank = tp_rank % ep, so expert 5 (of EP rank 1) lives on TP ranks 1 and 3,
    # each with half of its 1024 rows.
    assert owners == [1, 3]
    assert [holders[r][0].shape for r in owners] == [(512, 128), (512, 128)]
    assert [(holders[r][0].start, holders[r][0].stop) for r in owners] == [(0, 512), (512, 1024)]


def test_real_model_weights_per_gpu_at_tp8_ep8():
    cfg = preset("deepseek-v3.2")
    plans = plan_ranks(cfg, Layout(tp=8, pp=1, ep=8), build_catalog(cfg))
    gib = [p.nbytes / 2**30 for p in plans]
    # 642 GiB of which ~600 are routed experts split 8 ways, plus replicated attention parts.
    assert 75 < min(gib) <= max(gib) < 95


def test_mlp_tp_is_gcd_of_blocks_and_tp():
    assert mlp_tp(18432, Layout(tp=8)) == 8
    assert mlp_tp(2048, Layout(tp=32)) == 16
    assert mlp_tp(128, Layout(tp=8)) == 1
    assert mlp_tp(18432, Layout(tp=8, attention_dp=True)) == 1


def test_a_split_that_cuts_fp8_blocks_is_refused_with_the_reason():
    from builder.model.config import tiny_config

    cfg = tiny_config(overrides={"moe_intermediate_size": 256})
    with pytest.raises(LayoutError, match="cuts its 128x128 FP8 blocks"):
        plan_ranks(cfg, Layout(tp=4, pp=1, ep=1), build_catalog(cfg))
    plan_ranks(cfg, Layout(tp=4, pp=1, ep=2), build_catalog(cfg))  # moe_tp 2 -> 128 rows: fine


@pytest.mark.parametrize("layout,msg", [
    (Layout(tp=3), "does not divide the 16 attention heads"),
    (Layout(pp=5), "PP 5 is larger than the model's 4 layers"),
    (Layout(tp=2, ep=4), "must divide TP"),
])
def test_bad_layouts(layout, msg):
    from builder.model.config import tiny_config

    cfg = tiny_config()
    with pytest.raises(LayoutError, match=msg):
        plan_ranks(cfg, layout, build_catalog(cfg))
