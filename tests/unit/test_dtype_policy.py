"""The checkpoint dtype policy (issue 17 item 1, docs/tensorrt-llm-contract.md#C-DSREF-1): unquantized tensors accept
BF16 or F32, the dtype found is recorded and carried to the rank shards; FP8 weights and their scales stay strict;
the generated tiny checkpoint uses the real model's on-disk dtypes."""

from __future__ import annotations

import json

import pytest

from builder.errors import CheckpointError
from builder.layout import Layout
from builder.model.catalog import Dtype, Kind, build_catalog, catalog_by_name
from builder.model.config import ModelConfig, preset
from builder.model.safetensors_io import read_header, validate_checkpoint
from tests.support.checkpoints import recast, variant

REAL_V32_STORED = {  # DeepSeek's statements (C-DSREF-1): weights_proj bf16 on disk, Gate.bias float32
    Kind.IDX_WEIGHTS: Dtype.BF16, Kind.ROUTER_BIAS: Dtype.F32, Kind.NORM: Dtype.BF16, Kind.ROUTER: Dtype.BF16,
}


def test_catalogue_policy_for_the_real_model():
    specs = build_catalog(preset("deepseek-v3.2"))
    by_kind = {}
    for s in specs:
        by_kind.setdefault(s.kind, set()).add((s.dtype, s.accepted))
    for kind, stored in REAL_V32_STORED.items():
        assert by_kind[kind] == {(stored, frozenset({Dtype.BF16, Dtype.F32}))}, kind
    for kind in (Kind.FINAL_NORM, Kind.MTP_NORM, Kind.IDX_K_NORM):
        assert all(acc == frozenset({Dtype.BF16, Dtype.F32}) for _, acc in by_kind[kind]), kind
    strict = [s for s in specs if s.dtype in (Dtype.F8_E4M3,) or s.is_scale]
    assert strict and all(s.accepted is None for s in strict)  # FP8 weights and scales: exactly one dtype


def test_tiny_checkpoint_is_written_with_the_real_models_dtypes(tiny_ckpt):
    cfg = ModelConfig.from_json_file(tiny_ckpt / "config.json")
    dtypes = {}
    for shard in tiny_ckpt.glob("*.safetensors"):
        dtypes.update({n: t.dtype for n, t in read_header(shard).tensors.items()})
    assert dtypes["model.layers.0.self_attn.indexer.weights_proj.weight"] is Dtype.BF16
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] is Dtype.F32
    assert dtypes["model.layers.0.input_layernorm.weight"] is Dtype.BF16
    for spec in catalog_by_name(cfg).values():
        assert dtypes[spec.name] is spec.dtype, spec.name


@pytest.fixture(scope="module")
def f32_norms_bf16_bias(tiny_ckpt, tmp_path_factory):
    """The real layout with the other dtype of the policy everywhere it allows one."""
    return recast(tiny_ckpt, tmp_path_factory.mktemp("v") / "ckpt", {
        Kind.NORM: Dtype.F32, Kind.FINAL_NORM: Dtype.F32, Kind.MTP_NORM: Dtype.F32, Kind.IDX_K_NORM: Dtype.BF16,
        Kind.ROUTER: Dtype.F32, Kind.ROUTER_BIAS: Dtype.BF16, Kind.IDX_WEIGHTS: Dtype.F32})


def test_policy_dtypes_are_accepted(f32_norms_bf16_bias):
    cfg = ModelConfig.from_json_file(f32_norms_bf16_bias / "config.json")
    layout = validate_checkpoint(f32_norms_bf16_bias, expected=catalog_by_name(cfg))
    assert layout.tensor("model.layers.0.input_layernorm.weight").dtype is Dtype.F32


@pytest.mark.parametrize("name,dtype,rule", [
    ("model.layers.0.input_layernorm.weight", "float16", "BF16 or F32"),  # outside the policy
    ("model.layers.0.self_attn.q_b_proj.weight", "bfloat16", "F8_E4M3"),  # FP8 weights stay strict
    ("model.layers.0.self_attn.q_b_proj.weight_scale_inv", "bfloat16", "F32"),  # and their scales
])
def test_outside_the_policy_is_refused(tiny_ckpt, tmp_path, name, dtype, rule):
    import torch

    bad = variant(tiny_ckpt, tmp_path / "bad", lambda t: {n: (v.float().to(getattr(torch, dtype)) if n == name else v)
                                                          for n, v in t.items()})
    cfg = ModelConfig.from_json_file(bad / "config.json")
    with pytest.raises(CheckpointError, match=f"{name}.* but {rule} was expected"):
        validate_checkpoint(bad, expected=catalog_by_name(cfg))


def test_fetch_records_and_the_bundle_carries_the_stored_dtypes(f32_norms_bf16_bias, tmp_path):
    from builder.shard.bundle import write_engine_bundle
    from builder.shard.fusion import FusionOptions
    from builder.stages.fetch import directory_files, materialize

    weights = tmp_path / "weights"
    weights.mkdir()
    info = materialize(directory_files(f32_norms_bf16_bias, include=[], exclude=[]), weights, skip_mtp=False,
                       include=[], exclude=[])
    assert info["dtypes"]["norm"] == ["F32"] and info["dtypes"]["indexer_weights_proj"] == ["F32"]
    assert info["dtypes"]["router_bias"] == ["BF16"]
    out = tmp_path / "engines"
    bundle = write_engine_bundle(weights, out, layout=Layout(tp=2, pp=1), fusion=FusionOptions())
    assert bundle["stored_dtypes"] == info["dtypes"]
    assert json.loads((out / "config.json").read_text())["stored_dtypes"] == info["dtypes"]
    rank0 = read_header(out / "rank0.safetensors").tensors
    assert rank0["model.layers.0.input_layernorm.weight"].dtype is Dtype.F32
    assert rank0["model.layers.0.self_attn.indexer.weights_proj.weight"].dtype is Dtype.F32
