"""The speculative pipeline end to end through the CLI: ``dsbuild run --spec draft --draft-model tiny-draft`` and
``dsbuild generate --spec none|mtp|draft --json``."""

from __future__ import annotations

import json

import yaml


def test_build_with_draft_writes_both_bundles_and_generate_reports_metrics(dsbuild, tmp_path):
    """The pipeline end to end: the draft model fetched and quantized as stages of their own (draft-weights/,
    draft-quantized/: the checkpoint speculative_model names, relative to the run), engines/draft (one-rank
    bundle), then `dsbuild generate --spec draft|mtp --json` greedy equal to --spec none."""
    dsbuild("run", "--tp", "1", "--pp", "1", "--spec", "draft", "--draft-model", "tiny-draft", "--draft-len", "2",
            "--out", "build/r", check=True)
    run = tmp_path / "build" / "r"
    engines = run / "engines"
    api = yaml.safe_load((engines / "llm_api.yaml").read_text())
    assert (run / api["speculative_config"]["speculative_model"] / "model.safetensors.index.json").is_file()
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert [s for s in stages if s.startswith("draft-")] == ["draft-fetch", "draft-quantize"]
    assert stages["draft-quantize"]["inputs"] == {"draft-fetch": stages["draft-fetch"]["key"]}
    assert stages["draft-fetch"]["config"]["model"] == "tiny-draft"
    assert stages["build"]["inputs"]["draft-quantize"] == stages["draft-quantize"]["key"]
    draft_cfg = json.loads((engines / "draft" / "config.json").read_text())
    assert draft_cfg["mapping"]["world_size"] == 1 and draft_cfg["model"]["num_hidden_layers"] == 2
    assert (engines / "draft" / "tokenizer.json").read_bytes() == (engines / "tokenizer.json").read_bytes()
    out = {}
    for spec in ("none", "mtp", "draft"):
        out[spec] = json.loads(dsbuild("generate", "--engine", str(engines), "--prompt", "The river", "--max-tokens",
                                       "6", "--ignore-eos", "--spec", spec, "--draft-len", "2", "--json",
                                       check=True).stdout)
    assert out["mtp"]["token_ids"] == out["draft"]["token_ids"] == out["none"]["token_ids"]
    for spec in ("mtp", "draft"):
        r = out[spec]
        assert r["total_draft_tokens"] == 2 * (r["target_forwards"] - 1) > 0
        assert 0 <= r["total_accepted_draft_tokens"] <= r["total_draft_tokens"]
    bad = dsbuild("generate", "--engine", str(engines), "--prompt", "x", "--spec", "mtp", "--draft-len", "0")
    assert bad.returncode != 0 and "draft length 0" in bad.stderr


def test_a_draft_model_with_another_vocabulary_fails_the_build_cleanly(dsbuild, tmp_path):
    from builder.model.tiny import make_tiny

    other = make_tiny(tmp_path / "other-draft", preset_name="tiny-draft", overrides={"vocab_size": 512})
    res = dsbuild("run", "--tp", "1", "--pp", "1", "--spec", "draft", "--draft-model", str(other), "--out", "build/r")
    assert res.returncode != 0 and "vocabulary of 512" in res.stderr
    assert not (tmp_path / "build" / "r" / "engines").exists()  # nothing half-written
