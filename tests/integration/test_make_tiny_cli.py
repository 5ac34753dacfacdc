"""``dsbuild make-tiny``: the committed trained models by default, the random init on request, ``--train``."""

from __future__ import annotations

import json

import pytest
import torch

from builder.model import trained as builtin
from builder.model.catalog import catalog_by_name
from builder.model.config import tiny_config
from builder.model.hf_compat import iter_dequantized
from builder.model.safetensors_io import validate_checkpoint


def test_default_export_is_the_committed_trained_draft(dsbuild, tmp_path):
    res = dsbuild("make-tiny", "--out", str(tmp_path / "d"), "--preset", "tiny-draft")
    assert res.returncode == 0, res.stderr
    validate_checkpoint(tmp_path / "d", expected=catalog_by_name(tiny_config("tiny-draft")))
    committed = builtin.load_builtin("tiny-draft")
    assert all(torch.equal(t, committed[n]) for n, t in iter_dequantized(tmp_path / "d"))
    assert (tmp_path / "d" / "tokenizer.json").read_text() == (builtin.TRAINED_DIR / "tokenizer.json").read_text()


def test_random_flavour_differs_from_the_trained_one(dsbuild, tmp_path):
    res = dsbuild("make-tiny", "--out", str(tmp_path / "r"), "--preset", "tiny-draft-random", "--seed", "3")
    assert res.returncode == 0, res.stderr
    committed = builtin.load_builtin("tiny-draft")
    weights = dict(iter_dequantized(tmp_path / "r"))
    assert not torch.equal(weights["model.layers.0.self_attn.q_b_proj.weight"],
                           committed["model.layers.0.self_attn.q_b_proj.weight"])


@pytest.mark.parametrize("args, message", [
    (["--steps", "3"], "only apply with --train"),
    (["--train", "--preset", "tiny-random"], "--train knows the presets"),
    (["--train", "--steps", "0"], "--steps must be at least 1"),
    (["--preset", "nonsense"], "unknown generated model"),
])
def test_bad_options_fail_with_one_sentence_and_write_nothing(dsbuild, tmp_path, args, message):
    res = dsbuild("make-tiny", "--out", str(tmp_path / "x"), *args)
    assert res.returncode != 0
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_train_cli_runs_end_to_end_and_reports_perplexities(dsbuild, tmp_path):
    res = dsbuild("make-tiny", "--train", "--steps", "2", "--preset", "tiny-draft", "--out", str(tmp_path / "t"),
                  timeout=1200)
    assert res.returncode == 0, res.stderr
    assert "held-out ppl" in res.stdout and "unigram" in res.stdout
    report = json.loads((tmp_path / "t" / "tiny-draft.report.json").read_text())
    assert report["recipe"]["steps"] == 2 and not report["same_as_committed"]
    assert report["heldout_float"]["unigram_ppl"] > 1
    assert report["train_cpu_s"] > 0 and report["total_wall_s"] >= report["train_wall_s"]
    validate_checkpoint(tmp_path / "t" / "tiny-draft", expected=catalog_by_name(tiny_config("tiny-draft")))
