"""Speculative decoding in the reference engine (MTP module and draft model): greedy output token-for-token equal to
plain greedy decoding across prompts, batch sizes, draft lengths and TP/PP layouts; the sampled output distribution
equal to the target's (chi-square against the engine's own exact next-token probabilities); clear errors.

The checkpoints come from ``tests.support.speculative`` (planted MTP and a noisy draft copy) so that drafts are
partly accepted and partly rejected: every test asserts both happened, or it would prove nothing."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from builder.engine.bundle import EngineBundle
from builder.engine.distributed import make_comm
from builder.engine.driver import decode
from builder.engine.generate import Engine
from builder.engine.sampling import GenerationRequest, probabilities
from builder.engine.service import EngineService
from builder.engine.speculative import SpeculativeOptions
from builder.errors import CheckpointError, RequestError
from builder.sampling_params import SamplingParams
from tests.support.engines import build_bundle, fixed_prompts
from tests.support.speculative import noisy_copy, planted_target

GEN = 14


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec-ckpt")
    return planted_target(root / "target"), noisy_copy(root / "draft")


@pytest.fixture(scope="module")
def bundles(ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("spec-bundles")
    target, draft = ckpts
    made = {"draft": build_bundle(draft, root / "draft", tp=1, pp=1, ep=1)}

    def get(tp: int, pp: int, ep: int = 1, attention_dp: bool = False):
        key = (tp, pp, ep, attention_dp)
        if key not in made:
            made[key] = build_bundle(target, root / f"tp{tp}pp{pp}ep{ep}{'adp' if attention_dp else ''}", tp=tp,
                                     pp=pp, ep=ep, attention_dp=attention_dp)
        return made[key]
    get.draft = made["draft"]
    return get


@pytest.fixture(scope="module")
def engine(bundles):
    b = EngineBundle.open(bundles(1, 1))
    return Engine(b, make_comm(b.layout, rank=0))


def _spec(mode: str, n: int, bundles) -> SpeculativeOptions:
    return SpeculativeOptions(mode=mode, draft_len=n, draft_engine=str(bundles.draft) if mode == "draft" else None)


def _requests(batch: int, **kw) -> list[GenerationRequest]:
    prompts = fixed_prompts(lengths=(24, 5, 13, 9)[:batch])
    return [GenerationRequest(p, SamplingParams(max_tokens=GEN), **kw) for p in prompts]


def _check_equal_and_exercised(plain, spec, n: int) -> None:
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert [r.finish_reason for r in spec] == [r.finish_reason for r in plain]
    drafted = sum(r.total_draft_tokens for r in spec)
    accepted = sum(r.total_accepted_draft_tokens for r in spec)
    assert 0 < accepted < drafted, "drafts must be partly accepted and partly rejected for this to test anything"
    for r in spec:
        rounds = r.target_forwards - 1
        assert r.total_draft_tokens == n * rounds
        # Each round emits accepted + 1 tokens; the last round may be cut by max_tokens.
        assert r.target_forwards + r.total_accepted_draft_tokens - n <= len(r.token_ids) <= \
            r.target_forwards + r.total_accepted_draft_tokens


@pytest.mark.parametrize("mode", ["mtp", "draft"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_greedy_speculative_equals_plain_greedy(engine, bundles, mode, n):
    reqs = _requests(3)
    plain = engine.generate(reqs)
    _check_equal_and_exercised(plain, decode(engine, reqs, speculative=_spec(mode, n, bundles)), n)



@pytest.mark.parametrize("mode,where", [("mtp", "verify"), ("mtp", "draft"), ("draft", "verify")])
def test_a_request_whose_speculative_sampling_fails_mid_generation_fails_alone(engine, bundles, monkeypatch, mode,
                                                                               where):
    """Issue 18 item 2 in speculative decoding: the poisoned request's verification (or drafting) raises after it
    has produced tokens; it ends with finish_reason "error" and its reason, the others of the batch get exactly
    the tokens they get without it."""
    import builder.engine.proposer as proposer
    import builder.engine.speculative as speculative

    reqs = _requests(3)
    spec = _spec(mode, 2, bundles)
    alone = decode(engine, [reqs[0], reqs[2]], speculative=spec)
    poisoned = GenerationRequest(reqs[1].prompt_ids, SamplingParams(max_tokens=GEN, temperature=0.7, seed=666))
    module, name = (speculative, "verify_row") if where == "verify" else (proposer, "choose_draft")
    real, calls = getattr(module, name), {"n": 0}

    def failing(*args, **kw):
        req_or_logits = args[0]
        params = req_or_logits.sampling if where == "verify" else args[1]
        if params.seed == 666:
            calls["n"] += 1
            if calls["n"] > 2:
                raise RuntimeError("injected sampling failure")
        return real(*args, **kw)

    monkeypatch.setattr(module, name, failing)
    got = decode(engine, [reqs[0], poisoned, reqs[2]], speculative=spec)
    assert got[1].finish_reason == "error" and "injected sampling failure" in got[1].error
    assert len(got[1].token_ids) >= 1  # it failed mid-generation, after tokens
    assert [got[0].token_ids, got[2].token_ids] == [alone[0].token_ids, alone[1].token_ids]
    assert [got[0].finish_reason, got[2].finish_reason] == [alone[0].finish_reason, alone[1].finish_reason]

@pytest.mark.parametrize("mode", ["mtp", "draft"])
def test_penalized_greedy_speculative_equals_penalized_plain_greedy(engine, bundles, mode):
    """Each request its own presence/frequency penalties: the verifier and the drafter count the emitted tokens
    plus the earlier drafts, so the output is plain penalized greedy decoding's. This planted model seldom repeats
    a token by itself, so the penalties are mostly negative (they pull tokens back; the last one pushes a token
    away again from its third occurrence on)."""
    penalties = [(0.0, -1.5), (-3.0, 0.0), (-2.0, 1.0)]
    reqs = [GenerationRequest(r.prompt_ids, SamplingParams(max_tokens=GEN, presence_penalty=pres, frequency_penalty=freq))
            for r, (pres, freq) in zip(_requests(3), penalties)]
    plain = engine.generate(reqs)
    unpenalized = engine.generate(_requests(3))
    assert all(a.token_ids != b.token_ids for a, b in zip(plain, unpenalized)), "the penalties must matter here"
    _check_equal_and_exercised(plain, decode(engine, reqs, speculative=_spec(mode, 3, bundles)), 3)


@pytest.mark.parametrize("mode", ["mtp", "draft"])
def test_stop_tokens_end_speculative_output_where_plain_decoding_ends(engine, bundles, mode):
    reqs = _requests(2)
    plain = engine.generate(reqs)
    stop = plain[0].token_ids[6]  # a token the first request emits mid-way
    reqs = _requests(2, stop_token_ids=[stop])
    plain = engine.generate(reqs)
    spec = decode(engine, reqs, speculative=_spec(mode, 3, bundles))
    assert plain[0].finish_reason == "stop"
    assert [(r.token_ids, r.finish_reason) for r in spec] == [(r.token_ids, r.finish_reason) for r in plain]


@pytest.mark.parametrize("mode,n", [("mtp", 2), pytest.param("draft", 3, marks=pytest.mark.slow)])
def test_greedy_speculative_equals_plain_greedy_tp2_pp2(bundles, mode, n):
    reqs = _requests(3)
    with EngineService(bundles(2, 2), threads_per_rank=1) as svc:
        plain = svc.generate(reqs)
        spec = svc.generate(reqs, speculative=_spec(mode, n, bundles))
    _check_equal_and_exercised(plain, spec, n)


def test_attention_dp_plain_and_mtp_greedy_equal_tp1(engine, bundles):
    """Attention-DP TP2/EP2 through EngineService: plain greedy equals the one-rank engine's, and MTP (whose module
    runs every row on every rank of the group) drafts, gets partly accepted, and changes nothing."""
    reqs = _requests(3)
    plain = engine.generate(reqs)
    with EngineService(bundles(2, 1, 2, attention_dp=True), threads_per_rank=1) as svc:
        adp = svc.generate(reqs)
        spec = svc.generate(reqs, speculative=_spec("mtp", 2, bundles))
    assert [r.token_ids for r in adp] == [r.token_ids for r in plain]
    _check_equal_and_exercised(plain, spec, 2)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(1, 2, 1), (2, 1, 2), (2, 2, 1), (4, 1, 2)], ids=lambda l: "tp%dpp%dep%d" % l)
def test_greedy_speculative_sweep_layouts_batches_draft_lengths(bundles, layout):
    with EngineService(bundles(*layout), threads_per_rank=1) as svc:
        for batch in (1, 2, 4):
            reqs = _requests(batch)
            plain = svc.generate(reqs)
            for mode in ("mtp", "draft"):
                for n in (1, 2, 3, 4):
                    spec = svc.generate(reqs, speculative=_spec(mode, n, bundles))
                    assert [r.token_ids for r in spec] == [r.token_ids for r in plain], (batch, mode, n)
                    if batch == 4:
                        _check_equal_and_exercised(plain, spec, n)


@pytest.mark.parametrize("mode,penalties", [("mtp", (0.0, 0.0)), ("mtp", (1.5, 1.0)),
                                           pytest.param("draft", (0.0, 0.0), marks=pytest.mark.slow),
                                           pytest.param("draft", (1.5, 1.0), marks=pytest.mark.slow)])
def test_sampled_tokens_follow_the_target_distribution(engine, bundles, mode, penalties):
    """600 seeded requests for the same prompt; (first, second) generated token pairs against the exact joint
    probabilities from the target's own logits. The second token is always decided by speculative verification.
    With presence/frequency penalties, the exact distributions are the penalized ones (counts over the prompt and
    the first token)."""
    prompt = fixed_prompts(lengths=(11,), seed=5)[0]
    kw = dict(temperature=1.0, top_k=3, presence_penalty=penalties[0], frequency_penalty=penalties[1])
    reqs = [GenerationRequest(prompt, SamplingParams(max_tokens=2, seed=s, **kw)) for s in range(600)]
    res = decode(engine, reqs, speculative=_spec(mode, 2, bundles))
    accepted = sum(r.total_accepted_draft_tokens for r in res)
    assert 0 < accepted < sum(r.total_draft_tokens for r in res)
    ref = SamplingParams(**kw)
    p1 = probabilities(engine.prompt_logits([prompt])[0][-1], ref, prompt)
    firsts = torch.nonzero(p1).flatten().tolist()
    rows = engine.prompt_logits([prompt + [t] for t in firsts])
    joint = {(a, b): float(p1[a] * q) for a, row in zip(firsts, rows)
             for b, q in enumerate(probabilities(row[-1], ref, prompt + [a]).tolist()) if q > 0}
    counts = {k: 0 for k in joint}
    for r in res:
        counts[tuple(r.token_ids)] += 1  # a pair outside the support raises KeyError: also a failure
    cells = sorted(joint)
    expected = torch.tensor([joint[c] for c in cells], dtype=torch.float64)
    expected = expected / expected.sum() * len(res)
    observed = torch.tensor([counts[c] for c in cells], dtype=torch.float64)
    assert expected.min() >= 5, "cells too rare for a chi-square test: change the prompt"
    assert stats.chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


def test_mtp_on_a_bundle_without_the_module_is_a_clear_error(bundles, engine):
    reqs = _requests(1)
    from builder.engine.driver import Driver

    with pytest.raises(CheckpointError, match="no MTP module"):
        Driver(Engine(EngineBundle.open(bundles.draft),
                      make_comm(EngineBundle.open(bundles.draft).layout, rank=0))).generate(
            reqs, speculative=SpeculativeOptions(mode="mtp", draft_len=2))
    with pytest.raises(RequestError, match="draft length 0"):
        Driver(engine).generate(reqs, speculative=SpeculativeOptions(mode="mtp", draft_len=0))
    with pytest.raises(RequestError, match="needs a draft model"):
        Driver(engine).generate(reqs, speculative=SpeculativeOptions(mode="draft", draft_len=2))


def test_draft_with_another_vocabulary_is_refused(bundles, engine, tmp_path):
    from builder.engine.driver import Driver
    from builder.model.tiny import make_tiny

    other = build_bundle(make_tiny(tmp_path / "ckpt", preset_name="tiny-draft", overrides={"vocab_size": 512}),
                         tmp_path / "b", tp=1, pp=1, ep=1)
    with pytest.raises(CheckpointError, match="vocabulary 512 differs"):
        Driver(engine).generate(_requests(1), speculative=SpeculativeOptions(mode="draft", draft_len=2,
                                                                             draft_engine=str(other)))


@pytest.mark.slow
def test_torchrun_launch_runs_speculative_tasks(bundles, tmp_path):
    from tests.support.engines import run_torchrun

    reqs = [r.to_dict() for r in _requests(2)]
    plain, _ = run_torchrun(bundles(1, 2), {"generate": reqs}, tmp_path / "plain", nproc=2)
    spec, _ = run_torchrun(bundles(1, 2), {"generate": reqs, "speculative": {"mode": "mtp", "draft_len": 3}},
                           tmp_path / "spec", nproc=2)
    assert [r["token_ids"] for r in spec["generate"]] == [r["token_ids"] for r in plain["generate"]]
    assert 0 < sum(r["total_accepted_draft_tokens"] for r in spec["generate"]) < \
        sum(r["total_draft_tokens"] for r in spec["generate"])
