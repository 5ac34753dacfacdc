"""Errors about options say where the bad value came from, and suggest what was probably meant (issue 21 items 3
and 9)."""

from __future__ import annotations

import pytest

from builder.errors import CheckpointError, SpecError, closest_choices, did_you_mean
from builder.model.source import check_has_weights, resolve_model, suggest_model
from builder.plan.hardware import load_hardware
from builder.specs import resolve_spec


@pytest.mark.parametrize("kwargs,expected", [
    (dict(environ={"DSBUILD_TP": "two"}),
     "invalid tp: Input should be a valid integer, unable to parse string as an integer "
     "(from environment variable DSBUILD_TP='two')"),
    (dict(cli={"tp": 0}, environ={}), "invalid tp: Input should be greater than or equal to 1 (from the command line)"),
    (dict(config="tp: x\n", environ={}), "invalid tp: Input should be a valid integer, unable to parse string as an "
                                         "integer (from key tp in config file {file})"),
    (dict(environ={"DSBUILD_QUANT": "int3"}), "invalid value 'int3' for quant: Input should be 'fp8', 'fp8-tensor', "
                                              "'w4afp8', 'int4-awq', 'nvfp4' or 'bf16' (from environment variable "
                                              "DSBUILD_QUANT='int3')"),
    (dict(config="tpp: 3\n", environ={}), "unknown option 'tpp' (did you mean 'tp'?) (from key tpp in config file "
                                          "{file})"),
    # A rule between options names where each side came from (and which one is a default).
    (dict(cli={"ep": 4}, environ={}), "EP 4 must divide TP 2 (ep from the command line; tp is the default 2)"),
    (dict(config="tp: 3\n", environ={"DSBUILD_EP": "2"}),
     "EP 2 must divide TP 3 (ep from environment variable DSBUILD_EP='2'; tp from key tp in config file {file})"),
    (dict(cli={"spec": "mtp", "skip_mtp": True}, environ={}),
     "--spec mtp needs the MTP module; drop --skip-mtp (spec from the command line; skip-mtp from the command line)"),
])
def test_a_bad_value_names_its_source(tmp_path, kwargs, expected):
    file = None
    if "config" in kwargs:
        file = tmp_path / "c.yaml"
        file.write_text(kwargs.pop("config"))
    with pytest.raises(SpecError) as err:
        resolve_spec(config_file=file, **kwargs)
    assert str(err.value) == expected.format(file=file)


def test_values_remember_their_source_for_later_refusals(tmp_path):
    (tmp_path / "c.yaml").write_text("gpu: h200\n")
    spec = resolve_spec(cli={"tp": 4}, config_file=tmp_path / "c.yaml", environ={"DSBUILD_NETWORK": "ib"})
    assert spec.origin_of("tp") == "the command line"
    assert spec.origin_of("gpu") == f"key gpu in config file {tmp_path / 'c.yaml'}"
    assert spec.origin_of("network") == "environment variable DSBUILD_NETWORK='ib'"
    assert spec.origin_of("pp") is None  # a default
    # The planner's refusal of the GPU name is tied to the option, so the CLI can name the file and key.
    with pytest.raises(SpecError) as err:
        load_hardware().gpu(spec.gpu)
    assert err.value.option == "gpu" and "(did you mean 'h200-sxm'?)" in str(err.value)


@pytest.mark.parametrize("word,choices,expected", [
    ("h200", ["h200-sxm", "b200", "h100-sxm"], ["h200-sxm"]),  # extends the word: beats the one letter away
    ("h100", ["h100-sxm", "h100-pcie", "a100"], ["h100-sxm", "h100-pcie"]),
    ("Tiny", ["tiny", "tiny-draft"], ["tiny"]),  # same but for case: alone
    ("fuse_qkv", ["fuse-qkv-a", "fuse-gate-up"], ["fuse-qkv-a"]),
    ("tpp", ["tp", "pp", "ep", "model"], ["tp"]),
    ("zzz", ["tp", "pp"], []),
    ("", ["tp"], []),
])
def test_closest_choices(word, choices, expected):
    assert closest_choices(word, choices) == expected
    assert did_you_mean(word, choices) == (f" (did you mean {' or '.join(map(repr, expected))}?)" if expected else "")


@pytest.mark.parametrize("model,expected", [
    ("DeepSeek-V3.2", "deepseek-ai/DeepSeek-V3.2"),  # the hub id's name alone
    ("deepseek-r1", "deepseek-ai/DeepSeek-R1"),
    ("deepseek-v3.2", "deepseek-ai/DeepSeek-V3.2"),  # a preset: where its weights are
    ("Tiny", "tiny"),
    ("tiny-randm", "tiny-random"),
])
def test_model_did_you_mean_covers_presets_generated_models_and_hub_ids(model, expected):
    assert suggest_model(model) == f" (did you mean {expected!r}?)"


def test_unknown_model_and_weightless_preset_point_to_the_checkpoint():
    with pytest.raises(SpecError, match=r"\(did you mean 'deepseek-ai/DeepSeek-V3\.2'\?\)") as err:
        resolve_model("DeepSeek-V3.2")
    assert err.value.option == "model"
    resolve_model("deepseek-v3.2")  # a preset is a fine input to the planner...
    with pytest.raises(CheckpointError, match=r"use --model deepseek-ai/DeepSeek-V3\.2 \(its checkpoint on the hub\)"):
        check_has_weights("deepseek-v3.2")  # ...but not to a run that fetches
    check_has_weights("tiny")
    check_has_weights("deepseek-ai/DeepSeek-V3.2")


def test_cli_names_the_source_of_a_value_refused_after_parsing(tmp_path):
    from click.testing import CliRunner

    from builder.cli import main

    (tmp_path / "c.yaml").write_text("network: ib\n")
    res = CliRunner().invoke(main, ["plan", "--model", "deepseek-v3.2", "--gpu", "h200-sxm", "--config",
                                    str(tmp_path / "c.yaml")], env={"DSBUILD_GPU": "h100"})
    assert res.exit_code == 2
    assert "unknown network 'ib' (did you mean 'ib-xdr' or 'ib-ndr' or 'ib-hdr'?)" in res.output
    assert f"(--network from key network in config file {tmp_path / 'c.yaml'})" in res.output
    res = CliRunner().invoke(main, ["plan", "--model", "deepseek-v3.2"], env={"DSBUILD_GPU": "h100"})
    assert res.exit_code == 2
    assert "(--gpu from environment variable DSBUILD_GPU='h100')" in res.output, res.output
