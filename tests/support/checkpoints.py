"""Variants of a checkpoint for conformance tests: tensors re-stored in another dtype, renamed, dropped or reshaped.
Each variant is a complete, self-consistent checkpoint directory (index and headers agree), as a hub would serve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from builder.model.catalog import Dtype, Kind, build_catalog
from builder.model.config import ModelConfig
from builder.model.safetensors_io import INDEX_NAME
from builder.model.safetensors_tensors import TORCH_DTYPES


def variant(src: Path, out: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Path:
    """Copy ``src`` to ``out`` with every shard's tensors passed through ``edit`` (name -> tensor, per shard) and the
    index rewritten to match."""
    shutil.copytree(src, out)
    index = json.loads((out / INDEX_NAME).read_text())
    weight_map: dict[str, str] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = edit(load_file(out / shard))
        (out / shard).unlink()
        save_file(tensors, out / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in tensors})
    index["weight_map"] = dict(sorted(weight_map.items()))
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return out


def recast(src: Path, out: Path, dtypes: dict[Kind, Dtype]) -> Path:
    """``src`` with the tensors of the given kinds stored in the given dtypes."""
    cfg = ModelConfig.from_json_file(src / "config.json")
    kinds = {s.name: s.kind for s in build_catalog(cfg) if not s.is_scale}
    return variant(src, out, lambda t: {n: v.to(TORCH_DTYPES[dtypes[kinds[n]]]) if kinds.get(n) in dtypes else v
                                        for n, v in t.items()})
