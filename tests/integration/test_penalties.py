"""Presence/frequency penalties through the reference engine against an independent oracle: a greedy loop over
transformers' DeepseekV32ForCausalLM full-sequence logits with the penalty applied by this test itself, on the
trained tiny model (whose plain greedy output repeats itself). One process and PP2 with pipelined micro-batches;
a batch whose requests carry different penalties; MTP and draft-model speculative decoding; and
`dsbuild generate --engine` with the new flags."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from builder.engine.service import EngineService, GenerationRequest, SpeculativeOptions
from builder.sampling_params import SamplingParams
from tests.support.engines import build_bundle

# The last two repeat words that their continuations would use, so counting the prompt matters (asserted below).
PROMPTS = ("Elizabeth was", "The cold, and the cold, and the river", "She said that the counting to be a count")
GEN = 24
# (presence, frequency) per prompt: each kind alone, and both with a negative frequency penalty.
PENALTIES = ((0.0, 0.5), (0.8, 0.0), (0.6, -0.1))


@pytest.fixture(scope="module")
def bundles(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("penalty-bundles")
    return {(tp, pp): build_bundle(tiny_ckpt, root / f"tp{tp}pp{pp}", tp=tp, pp=pp, ep=1) for tp, pp in ((1, 1), (1, 2))}


@pytest.fixture(scope="module")
def prompts(bundles):
    from builder.engine.bundle import EngineBundle
    from builder.engine.text import encode_prompt

    bundle = EngineBundle.open(bundles[1, 1])
    tok = bundle.tokenizer()
    return [encode_prompt(bundle, tok, p) for p in PROMPTS]


def oracle_greedy(model, prompt: list[int], presence: float, frequency: float, n: int = GEN, *,
                  count_prompt: bool = True) -> list[int]:
    """Greedy decoding recomputing the whole sequence each step; penalties from the formula, counts over the prompt
    (unless ``count_prompt`` is False) and the tokens generated so far."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            for token, count in Counter(ids if count_prompt else ids[len(prompt):]).items():
                logits[token] -= frequency * count + presence
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def oracle(tiny_float_dir, prompts):
    from builder.model.hf_compat import load_hf_model

    model = load_hf_model(tiny_float_dir)
    plain = [oracle_greedy(model, p, 0.0, 0.0) for p in prompts]
    penalized = [oracle_greedy(model, p, *pen) for p, pen in zip(prompts, PENALTIES)]
    output_only = [oracle_greedy(model, p, *pen, count_prompt=False) for p, pen in zip(prompts, PENALTIES)]
    assert output_only != penalized, "no request here would notice penalties that skip the prompt"
    return plain, penalized


def _requests(prompts, penalties):
    return [GenerationRequest(prompt_ids=p, sampling=SamplingParams(max_tokens=GEN, presence_penalty=pres, frequency_penalty=freq))
            for p, (pres, freq) in zip(prompts, penalties)]


def test_oracle_shows_the_plain_output_loops_and_penalties_change_it(oracle):
    plain, penalized = oracle
    assert all(len(set(p)) <= GEN // 2 for p in plain), "the trained tiny model's greedy output should loop"
    assert all(len(set(b)) > len(set(a)) for a, b in zip(plain, penalized))  # penalties break the loop


@pytest.mark.parametrize("layout", [(1, 1), (1, 2)], ids=["tp1pp1", "tp1pp2-microbatches"])
def test_penalized_greedy_batch_equals_the_transformers_loop(bundles, prompts, oracle, layout):
    plain, penalized = oracle
    with EngineService(bundles[layout], threads_per_rank=1) as svc:
        got = svc.generate(_requests(prompts, PENALTIES))
        # Penalties are per request: the same prompts without them, batched, give the oracle's plain output.
        mixed = svc.generate(_requests(prompts, [PENALTIES[0], (0.0, 0.0), PENALTIES[2]]))
    assert [r.token_ids for r in got] == penalized
    assert [r.token_ids for r in mixed] == [penalized[0], plain[1], penalized[2]]


def test_penalized_greedy_speculative_equals_the_transformers_loop(bundles, prompts, oracle, cache_dir, tmp_path):
    """The trained MTP module and the trained tiny draft model, drafts penalized like the target's positions:
    greedy speculative output is the oracle's penalized greedy output, with drafts partly accepted."""
    from builder.model.generated import ensure_tiny

    draft = build_bundle(ensure_tiny(cache_dir / "models", preset_name="tiny-draft"), tmp_path / "draft", tp=1,
                         pp=1, ep=1)
    _, penalized = oracle
    with EngineService(bundles[1, 1], threads_per_rank=1) as svc:
        for spec in (SpeculativeOptions(mode="mtp", draft_len=3),
                     SpeculativeOptions(mode="draft", draft_len=3, draft_engine=str(draft))):
            got = svc.generate(_requests(prompts, PENALTIES), speculative=spec)
            assert [r.token_ids for r in got] == penalized, spec.mode
            accepted = sum(r.total_accepted_draft_tokens for r in got)
            assert 0 < accepted < sum(r.total_draft_tokens for r in got), spec.mode


def test_generate_cli_frequency_penalty_changes_a_looping_continuation(bundles, dsbuild, oracle):
    from builder.engine.bundle import EngineBundle

    def run(*extra):
        proc = dsbuild("generate", "--engine", str(bundles[1, 1]), "--prompt", PROMPTS[0], "--max-tokens", str(GEN),
                       "--ignore-eos", "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    plain, penalized = oracle
    base, pen = run(), run("--frequency-penalty", "0.5")
    assert base["token_ids"] == plain[0] and pen["token_ids"] == penalized[0]
    assert pen["text"] != base["text"]
    assert pen["text"] == EngineBundle.open(bundles[1, 1]).tokenizer().decode(penalized[0])
    bad = dsbuild("generate", "--engine", str(bundles[1, 1]), "--prompt", PROMPTS[0], "--presence-penalty", "nan")
    assert bad.returncode == 2 and "presence_penalty must be a finite number" in bad.stderr and "got nan" in bad.stderr
