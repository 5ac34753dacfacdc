"""Engine bundles: per-rank tensor bytes equal the planner's prediction for every tiny layout, fused or not;
fused tensors unfuse to exactly the planned pieces; broken bundles are refused clearly."""

from __future__ import annotations

import json

import pytest
import torch

from builder.errors import CheckpointError
from builder.model.config import ModelConfig
from builder.engine.bundle import EngineBundle
from builder.shard.fusion import FusionOptions
from builder.shard.rules import plan_ranks
from builder.layout import Layout
from builder.stages.build import catalog_of_checkpoint, write_engine_bundle

LAYOUTS = [(tp, pp, ep) for tp in (1, 2, 4, 8) for pp in (1, 2) for ep in (1, 2, 4) if ep <= tp]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_rank_bytes_on_disk_equal_the_plan_for_every_layout(tiny_ckpt, tmp_path, fused):
    cfg = ModelConfig.from_json_file(tiny_ckpt / "config.json")
    _, specs, _ = catalog_of_checkpoint(tiny_ckpt, cfg)
    for tp, pp, ep in LAYOUTS:
        out = tmp_path / f"{tp}{pp}{ep}"
        out.mkdir()
        layout = Layout(tp, pp, ep)
        write_engine_bundle(tiny_ckpt, out, layout=layout, fusion=FusionOptions() if fused else FusionOptions.none())
        bundle = EngineBundle.open(out)
        plans = plan_ranks(cfg, layout, specs)
        assert [bundle.tensor_bytes(r) for r in range(layout.world_size)] == [p.nbytes for p in plans], layout
        cfg_json = json.loads((out / "config.json").read_text())
        assert cfg_json["fusion"]["fuse_gate_up"] is fused
        assert [r["weight_bytes"] for r in cfg_json["mapping"]["ranks"]] == [p.nbytes for p in plans]


def test_fused_tensors_unfuse_to_the_planned_pieces(tiny_ckpt, tmp_path):
    fused_dir, plain_dir = tmp_path / "f", tmp_path / "p"
    for d, fusion in ((fused_dir, FusionOptions()), (plain_dir, FusionOptions.none())):
        d.mkdir()
        write_engine_bundle(tiny_ckpt, d, layout=Layout(4, 2, 2), fusion=fusion)
    fb, pb = EngineBundle.open(fused_dir), EngineBundle.open(plain_dir)
    for rank in (0, 5):
        f, p = fb.load_rank(rank), pb.load_rank(rank)
        L = fb.ranks[rank].layers[0]
        a = f"model.layers.{L}.self_attn."
        assert torch.equal(f[a + "fused_a.weight"], torch.cat([p[a + "q_a_proj.weight"],
                                                              p[a + "kv_a_proj_with_mqa.weight"],
                                                              p[a + "indexer.wk.weight"]]))
        moe = [i for i in fb.ranks[rank].layers if i >= 1 and i < fb.cfg.num_hidden_layers][0]
        m = f"model.layers.{moe}.mlp."
        experts = fb.ranks[rank].experts
        stacked = f[m + "experts.gate_up_proj.weight"]
        assert stacked.shape[0] == len(experts)
        for i, e in enumerate(experts):
            assert torch.equal(stacked[i], torch.cat([p[f"{m}experts.{e}.gate_proj.weight"],
                                                      p[f"{m}experts.{e}.up_proj.weight"]]))
            assert torch.equal(f[m + "experts.down_proj.weight"][i], p[f"{m}experts.{e}.down_proj.weight"])
        assert torch.equal(f[m + "shared_experts.gate_up_proj.weight"],
                           torch.cat([p[m + "shared_experts.gate_proj.weight"], p[m + "shared_experts.up_proj.weight"]]))


def test_missing_or_broken_bundle_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not an engine bundle"):
        EngineBundle.open(tmp_path)
    (tmp_path / "config.json").write_text('{"model": {}}')
    with pytest.raises(CheckpointError, match="not a valid engine config"):
        EngineBundle.open(tmp_path)


def test_a_quantized_weight_without_its_scales_is_named(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    write_engine_bundle(tiny_ckpt, tmp_path, layout=Layout(1, 1, 1), fusion=FusionOptions.none())
    tensors = load_file(str(tmp_path / "rank0.safetensors"))
    name = "model.layers.1.mlp.experts.0.up_proj.weight"
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] // 2, dtype=torch.int8)  # INT4 packed
    tensors.pop(name[: -len("weight")] + "weight_scale_inv")
    save_file(tensors, str(tmp_path / "rank0.safetensors"))
    with pytest.raises(CheckpointError, match=r"rank0.safetensors: model.layers.1.mlp.experts.0.up_proj.weight: a "
                                              r"torch.int8 weight without the scales its format needs \(has: none\)"):
        EngineBundle.open(tmp_path).load_rank(0)
