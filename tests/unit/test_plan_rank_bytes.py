"""Predicted weights per GPU == the bytes the build stage writes for that rank, exactly (tiny model).

The rank files are written by the build stage's own code path (``catalog_of_checkpoint`` + ``plan_ranks`` +
``write_all_ranks``); their sizes are read back from each file's safetensors header, independently of dsbuild."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from builder.errors import LayoutError
from builder.model.config import ModelConfig
from builder.plan.search import plan_cluster
from builder.shard.rules import plan_ranks
from builder.layout import Layout
from builder.shard.writer import rank_file, write_all_ranks
from builder.shard.bundle import catalog_of_checkpoint

FAST = [Layout(2, 2, 1), Layout(4, 1, 2, True), Layout(8, 2, 8)]
ALL = [Layout(t, p, e, a) for t in (1, 2, 4, 8, 16) for p in (1, 2, 4) for e in (1, 2, 4, 8)
       for a in (False, True) if e <= t and t % e == 0]


def header_tensor_bytes(path: Path) -> int:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def _check(tiny_ckpt: Path, out: Path, layout: Layout) -> None:
    cfg = ModelConfig.from_json_file(tiny_ckpt / "config.json")
    ckpt, specs, logical_shapes = catalog_of_checkpoint(tiny_ckpt, cfg)
    plans = plan_ranks(cfg, layout, specs, weight_shapes=logical_shapes)
    write_all_ranks(ckpt, plans, out)
    on_disk = [header_tensor_bytes(out / rank_file(p.rank)) for p in plans]
    result = plan_cluster(model="tiny", tp=layout.tp, pp=layout.pp, ep=layout.ep, attention_dp=layout.attention_dp)
    (lp,) = result.layouts
    assert lp.weights_per_rank == on_disk, layout
    assert lp.to_dict()["weights_per_rank_bytes"] == on_disk
    assert lp.to_dict()["memory_per_gpu_gib"]["weights"] == pytest.approx(max(on_disk) / 2**30, abs=1e-3)


@pytest.mark.parametrize("layout", FAST, ids=lambda layout: layout.name)
def test_predicted_weights_equal_rank_file_bytes(tiny_ckpt, tmp_path, layout):
    _check(tiny_ckpt, tmp_path, layout)


@pytest.mark.slow
def test_predicted_weights_equal_rank_file_bytes_for_every_valid_tiny_layout(tiny_ckpt, tmp_path):
    checked = 0
    for layout in ALL:
        cfg = ModelConfig.from_json_file(tiny_ckpt / "config.json")
        try:
            plan_ranks(cfg, layout, catalog_of_checkpoint(tiny_ckpt, cfg)[1])
        except LayoutError:
            continue
        out = tmp_path / layout.name
        out.mkdir()
        _check(tiny_ckpt, out, layout)
        checked += 1
    assert checked >= 40
