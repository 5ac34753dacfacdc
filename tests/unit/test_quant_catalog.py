"""Every format's catalogue slices under the sharding rules, for the tiny and the real model."""

from __future__ import annotations

import pytest

from builder.layout import Layout
from builder.model.config import preset, tiny_config
from builder.shard.rules import plan_ranks
from quantize.formats import quantized_catalog
from quantize.registry import NAMES


@pytest.mark.parametrize("mode", sorted(NAMES))
@pytest.mark.parametrize("layout", [Layout(tp=2, pp=2), Layout(tp=8, pp=1, ep=8), Layout(tp=4, pp=2, ep=2)])
def test_every_format_slices_and_every_rank_gets_all_w4a8_input_scales(mode, layout):
    cfg = tiny_config()
    cat = quantized_catalog(cfg, mode)
    plans = plan_ranks(cfg, layout, cat.specs, weight_shapes=cat.logical_shapes)
    held = [{p.name for p in plan.pieces} for plan in plans]
    for plan, names in zip(plans, held):
        scales = {n for n in names if n.endswith(".input_scale") and ".experts." in n}
        main_moe = [l for l in plan.layers if cfg.is_moe_layer(l) and l < cfg.num_hidden_layers]
        if mode == "w4afp8":  # TensorRT-LLM's W4A8 loader reads every expert's input scale on every rank
            assert len(scales) == 3 * cfg.n_routed_experts * len(main_moe)
    # Every stored tensor lands somewhere.
    assert set().union(*held) == {s.name for s in cat.specs}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["w4afp8", "int4-awq", "nvfp4", "fp8-tensor"])
def test_real_model_tp8_splits_land_on_packed_bytes_and_groups(mode):
    cfg = preset("deepseek-v3.2")
    cat = quantized_catalog(cfg, mode)
    plans = plan_ranks(cfg, Layout(tp=8, pp=1, ep=1), cat.specs, weight_shapes=cat.logical_shapes)
    assert len(plans) == 8
    sizes = [p.nbytes for p in plans]
    assert max(sizes) - min(sizes) < 0.01 * max(sizes)


def test_full_size_calibration_is_refused_with_the_gpu_node_script(tmp_path):
    from builder.errors import QuantizationError
    from quantize.modes import QuantJob, _refuse_full_size

    job = QuantJob(src=tmp_path / "weights", out=tmp_path / "quantized", mode="nvfp4", gpu="b200")
    with pytest.raises(QuantizationError) as err:
        _refuse_full_size(job, preset("deepseek-v3.2"), "ModelOpt NVFP4_DEFAULT_CFG calibration")
    script = tmp_path / "gpu-quantize-nvfp4.sh"
    assert str(script) in str(err.value)
    text = script.read_text()
    assert "torchrun --nproc-per-node 8" in text and "--quant_cfg NVFP4_DEFAULT_CFG" in text
    assert "quantize_fp8_to_nvfp4.sh" in text and str(tmp_path / "weights") in text
    _refuse_full_size(job, tiny_config(), "calibration")  # the tiny model fits: no error
    awq = QuantJob(src=tmp_path / "weights", out=tmp_path / "quantized", mode="int4-awq")
    with pytest.raises(QuantizationError, match="produces only NVFP4"):
        _refuse_full_size(awq, preset("deepseek-v3.2"), "ModelOpt INT4_AWQ_CFG calibration")


def test_rank_writer_reads_per_tensor_scalar_scales(tmp_path):
    import torch

    from builder.model.safetensors_io import validate_checkpoint, write_index
    from builder.model.safetensors_tensors import write_safetensors
    from builder.shard.rules import Piece, RankPlan
    from builder.shard.writer import write_rank

    tensors = {"a.weight": torch.ones(4, 2, dtype=torch.float8_e4m3fn), "a.weight_scale": torch.tensor(0.5),
               "a.input_scale": torch.tensor([0.25])}
    size = write_safetensors(tmp_path / "m.safetensors", tensors)
    write_index(tmp_path, {n: "m.safetensors" for n in tensors}, total_size=size)
    plan = RankPlan(0, 0, 0, [], [], [Piece("a.weight", (2, 2), 4, 0, 2, 4), Piece("a.weight_scale", (), 4),
                                       Piece("a.input_scale", (1,), 4)])
    write_rank(validate_checkpoint(tmp_path), plan, tmp_path)
    from safetensors.torch import load_file

    got = load_file(tmp_path / "rank0.safetensors")
    assert got["a.weight_scale"].shape == () and float(got["a.weight_scale"]) == 0.5
    assert got["a.weight"].shape == (2, 2)


def test_every_registered_format_has_a_writer_a_layout_and_a_spec_value():
    """The registry is the one list of formats: the quantize stage, the stored layouts and the spec accept exactly
    its names (a format added to the registry alone, or to a writer alone, fails here)."""
    import typing

    from builder.specs import RunSpec
    from quantize.formats import quantized_catalog
    from quantize.modes import MODES
    from quantize.registry import FORMAT_OF_ALGO, FORMATS, NAMES

    assert set(MODES) == set(FORMATS) == set(NAMES)
    assert set(typing.get_args(RunSpec.model_fields["quant"].annotation)) == set(NAMES)
    assert len(FORMAT_OF_ALGO) == len(FORMATS)  # quant_algo identifies the format of a written checkpoint
    cfg = preset("deepseek-v3.2")
    for name in NAMES:
        assert quantized_catalog(cfg, name).quant_algo == FORMATS[name].quant_algo
