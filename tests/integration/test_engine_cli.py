"""``dsbuild generate`` and ``dsbuild verify`` on a built tiny bundle (TP2 x EP2, two ranks launched by the CLI)."""

from __future__ import annotations

import json
import pytest
import torch

from tests.conftest import run_dsbuild


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir):
    work = tmp_path_factory.mktemp("cli-engine")
    run_dsbuild("run", "--tp", "2", "--pp", "1", "--ep", "2", "--out", "build/r", cwd=work,
                env={"XDG_CACHE_HOME": str(cache_dir)}, check=True)
    return work / "build" / "r"


def test_generate_json(run_dir, dsbuild):
    greedy = json.loads(dsbuild("generate", "--engine", str(run_dir / "engines"), "--prompt", "The river",
                                "--max-tokens", "6", "--temperature", "0", "--ignore-eos", "--json", check=True).stdout)
    assert len(greedy["token_ids"]) == 6 and greedy["finish_reason"] == "length"
    assert greedy["total_draft_tokens"] == greedy["total_accepted_draft_tokens"] == 0
    assert isinstance(greedy["text"], str) and greedy["prompt_tokens"] >= 2


def test_verify_passes_and_reports_errors(run_dir, dsbuild):
    res = dsbuild("verify", "--engine", str(run_dir / "engines"), check=True)
    report = json.loads(res.stdout)
    assert report["ok"] and report["greedy_match"] and report["layout"] == "tp2pp1ep2"
    assert 0 < report["max_rel_err"] < 1e-4 and report["max_abs_err"] > 0


def test_verify_fails_on_a_tampered_rank(tiny_ckpt, tmp_path):
    """verify_engine itself (the CLI's logic) on a one-rank bundle whose final norm was altered."""
    from safetensors.torch import load_file, save_file

    from builder.engine.verify import verify_engine
    from tests.support.engines import build_bundle

    bad = build_bundle(tiny_ckpt, tmp_path / "engines", tp=1, pp=1, ep=1)
    tensors = load_file(str(bad / "rank0.safetensors"))
    tensors["model.norm.weight"] = (tensors["model.norm.weight"].float() * 1.01).to(torch.bfloat16)
    save_file(tensors, str(bad / "rank0.safetensors"))
    report = verify_engine(bad, checkpoint=tiny_ckpt, gen_tokens=4)
    assert report["ok"] is False and report["max_rel_err"] > 1e-3


@pytest.mark.slow
def test_verify_exits_11_beyond_tolerance(run_dir, dsbuild):
    res = dsbuild("verify", "--engine", str(run_dir / "engines"), "--tolerance", "0")
    assert res.returncode == 11 and "exceeds" in res.stderr
    assert json.loads(res.stdout)["ok"] is False


def test_generate_refuses_a_directory_that_is_not_a_bundle(dsbuild, tmp_path):
    res = dsbuild("generate", "--engine", str(tmp_path), "--prompt", "x")
    assert res.returncode == 3 and "is not an engine bundle" in res.stderr


def test_generate_with_extreme_sampling_values_ends_cleanly(run_dir, dsbuild):
    """Issue 18 item 3: finite extremes the sampling rules accept (a subnormal temperature, penalties near FP32's
    largest) generate without a traceback -- a temperature of 1e-40 is the T -> 0 limit, the greedy tokens --
    and values FP32 cannot carry are refused in one sentence naming the flag's field."""
    engines = str(run_dir / "engines")

    def run(*extra, **kw):
        return dsbuild("generate", "--engine", engines, "--prompt", "The river", "--max-tokens", "6",
                       "--ignore-eos", "--json", *extra, **kw)

    greedy = json.loads(run("--temperature", "0", check=True).stdout)
    tiny = run("--temperature", "1e-40", "--seed", "3")
    assert tiny.returncode == 0 and "Traceback" not in tiny.stderr, tiny.stderr
    assert json.loads(tiny.stdout)["token_ids"] == greedy["token_ids"]
    for extra in (("--presence-penalty", "-3e38"), ("--frequency-penalty", "-3e38", "--temperature", "0.8"),
                  ("--temperature", "3.4e38", "--seed", "1"), ("--temperature", "1.4e-45", "--top-p", "1.4e-45")):
        res = run(*extra)
        assert res.returncode == 0 and "Traceback" not in res.stderr, (extra, res.stderr)
        out = json.loads(res.stdout)
        assert len(out["token_ids"]) == 6 and out["finish_reason"] == "length", extra
    for extra, field in ((("--temperature", "1e-50"), "temperature"), (("--presence-penalty", "-1e39"),
                                                                       "presence_penalty")):
        res = run(*extra)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert f"{field} must be a finite number that FP32 can carry" in res.stderr
