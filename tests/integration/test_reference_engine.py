"""The reference engine against transformers' DeepseekV32ForCausalLM (fp32, eager) on the same dequantized tiny
checkpoint: logits within 1e-4 relative (max |err| / max |logit|) and identical greedy continuations, for every
TP x PP x EP layout of the tiny model (a representative subset unmarked, all of them under ``slow``), launched
with torchrun (one and two "nodes" on this host) and through ``EngineService``."""

from __future__ import annotations

import pytest
import torch

from builder.engine.sampling import GenerationRequest
from builder.sampling_params import SamplingParams
from tests.support.engines import (
    GEN_TOKENS,
    REL_TOL,
    build_bundle,
    fixed_prompts,
    hf_reference,
    max_rel_err,
    run_torchrun,
)

ALL_LAYOUTS = [(tp, pp, ep) for tp in (1, 2, 4, 8) for pp in (1, 2) for ep in (1, 2, 4) if ep <= tp]
# Unmarked: TP1 in-process, TP2/PP2/EP2 here (and with attention-DP), TP2/PP2 as two nodes, TP2/EP2 through
# EngineService, TP4/EP2 with the gcd rule; every layout (with and without attention-DP) under `slow`.
FAST_LAYOUTS = [(2, 2, 2)]


@pytest.fixture(scope="module")
def prompts():
    return fixed_prompts()


@pytest.fixture(scope="module")
def reference(tiny_float_dir, prompts):
    return hf_reference(tiny_float_dir, prompts)


@pytest.fixture(scope="module")
def bundles(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")

    def get(tp: int, pp: int, ep: int, fusion=None, tag: str = "fused", attention_dp: bool = False):
        name = f"tp{tp}pp{pp}ep{ep}{'adp' if attention_dp else ''}-{tag}"
        return build_bundle(tiny_ckpt, root / name, tp=tp, pp=pp, ep=ep, fusion=fusion, attention_dp=attention_dp)
    return get


def task(prompts):
    return {"logits": prompts,
            "generate": [GenerationRequest(p, SamplingParams(max_tokens=GEN_TOKENS)).to_dict() for p in prompts]}


def check_against_reference(result, logits, reference):
    ref_logits, ref_greedy = reference
    assert len(logits) == len(ref_logits)
    for got, ref in zip(logits, ref_logits):
        assert got.shape == ref.shape
    err = max_rel_err(logits, ref_logits)
    assert err < REL_TOL, f"max relative logit error {err:.2e}"
    assert [g["token_ids"] for g in result["generate"]] == ref_greedy
    assert all(g["finish_reason"] == "length" for g in result["generate"])


def test_single_process_engine_matches_transformers(bundles, prompts, reference):
    from builder.engine.service import EngineService, GenerationRequest

    with EngineService(bundles(1, 1, 1)) as svc:
        logits = svc.prompt_logits(prompts)
        res = svc.generate([GenerationRequest(prompt_ids=p, sampling=SamplingParams(max_tokens=GEN_TOKENS)) for p in prompts])
    check_against_reference({"generate": [{"token_ids": r.token_ids, "finish_reason": r.finish_reason}
                                          for r in res]}, logits, reference)


@pytest.mark.parametrize("layout", FAST_LAYOUTS, ids=lambda l: "tp{}pp{}ep{}".format(*l))
def test_torchrun_layouts_match_transformers(layout, bundles, prompts, reference, tmp_path):
    tp, pp, ep = layout
    result, logits = run_torchrun(bundles(tp, pp, ep), task(prompts), tmp_path, nproc=tp * pp)
    assert result["world_size"] == tp * pp
    check_against_reference(result, logits, reference)


def test_two_nodes_on_one_host_with_c10d_rendezvous(bundles, prompts, reference, tmp_path):
    result, logits = run_torchrun(bundles(2, 2, 1), task(prompts), tmp_path, nproc=4, nnodes=2)
    assert result["hosts"] == "2" and result["local_world"] == "2"  # two torchrun agents of two ranks each
    check_against_reference(result, logits, reference)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=lambda l: "tp{}pp{}ep{}".format(*l))
def test_every_tiny_layout_matches_transformers(layout, bundles, prompts, reference, tmp_path):
    tp, pp, ep = layout
    result, logits = run_torchrun(bundles(tp, pp, ep), task(prompts), tmp_path, nproc=tp * pp)
    check_against_reference(result, logits, reference)


def test_attention_dp_layout_matches_transformers(bundles, prompts, reference, tmp_path):
    """Attention-DP, TP2/PP2/EP2: each TP rank runs its share of the 3 prompts (one rank gets a padding row)
    through attention, MoE layers gather all rows; same logits and greedy tokens as transformers."""
    result, logits = run_torchrun(bundles(2, 2, 2, attention_dp=True), task(prompts), tmp_path, nproc=4)
    check_against_reference(result, logits, reference)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [l for l in ALL_LAYOUTS if l[0] > 1], ids=lambda l: "tp{}pp{}ep{}adp".format(*l))
def test_every_attention_dp_layout_matches_transformers(layout, bundles, prompts, reference, tmp_path):
    tp, pp, ep = layout
    result, logits = run_torchrun(bundles(tp, pp, ep, attention_dp=True), task(prompts), tmp_path, nproc=tp * pp)
    check_against_reference(result, logits, reference)


def test_service_multi_rank_generates_with_streaming_and_stops(bundles, prompts, reference):
    """EngineService at TP2/EP2: greedy equals transformers, on_token streams every token in order, a stop token
    ends a sequence (not included) while the others run to max_tokens."""
    from builder.engine.service import EngineService, GenerationRequest

    _, ref_greedy = reference
    stop = ref_greedy[1][3]
    seen: dict[int, list[int]] = {}
    with EngineService(bundles(2, 1, 2), threads_per_rank=1) as svc:
        res = svc.generate([GenerationRequest(prompt_ids=p, stop_token_ids=[stop] if i == 1 else [], sampling=SamplingParams(max_tokens=GEN_TOKENS))
                            for i, p in enumerate(prompts)],
                           on_token=lambda i, t: seen.setdefault(i, []).append(t))
        tok = svc.tokenizer()
        assert tok.decode(tok.encode("the river said").ids) == "the river said"
    assert res[0].token_ids == ref_greedy[0] and res[2].token_ids == ref_greedy[2]
    cut = ref_greedy[1].index(stop)
    assert res[1].token_ids == ref_greedy[1][:cut] and res[1].finish_reason == "stop"
    assert {i: r.token_ids for i, r in enumerate(res)} == {i: seen.get(i, []) for i in range(3)}


def test_pp_micro_batches_give_the_same_tokens_as_one_batch(bundles, prompts, reference):
    """PP2 with the requests split into micro-batches that overlap the stages: greedy equals transformers and the
    one-batch schedule, seeded sampling draws the same tokens, and every request streams its tokens in order."""
    from builder.engine.service import EngineService, GenerationRequest

    _, ref_greedy = reference
    streamed: dict[int, list[int]] = {}
    with EngineService(bundles(1, 2, 1), threads_per_rank=1) as svc:
        greedy = [GenerationRequest(prompt_ids=p, sampling=SamplingParams(max_tokens=GEN_TOKENS)) for p in prompts]
        piped = svc.generate(greedy, on_token=lambda b, t: streamed.setdefault(b, []).append(t))
        whole = svc.generate(greedy, micro_batches=False)
        sampled = [GenerationRequest(prompt_ids=p, sampling=SamplingParams(max_tokens=GEN_TOKENS, temperature=0.9, seed=7 + i))
                   for i, p in enumerate(prompts + prompts[:1])]
        piped_s, whole_s = svc.generate(sampled), svc.generate(sampled, micro_batches=False)
    assert [r.token_ids for r in piped] == [r.token_ids for r in whole] == ref_greedy
    assert streamed == {b: r.token_ids for b, r in enumerate(piped)}
    assert [r.token_ids for r in piped_s] == [r.token_ids for r in whole_s]
    assert len({tuple(r.token_ids) for r in piped_s}) > 1


def test_gcd_rule_mlp_split_over_fewer_ranks_than_tp(tmp_path_factory, tmp_path):
    """A dense MLP of 256 (two 128-blocks) at TP4 is split over gcd(2, 4) = 2 ranks and replicated on the other
    two; the engine must count each slice once."""
    from builder.layout import Layout
    from builder.model.config import tiny_config
    from builder.model.hf_compat import write_dequantized_checkpoint
    from builder.model.tiny import make_tiny
    from builder.shard.rules import mlp_tp

    cfg = tiny_config(overrides={"intermediate_size": 256})
    assert mlp_tp(cfg.intermediate_size, Layout(4, 1, 1)) == 2
    ckpt = make_tiny(tmp_path_factory.mktemp("gcd") / "ckpt", seed=3, overrides={"intermediate_size": 256})
    prompts = fixed_prompts(lengths=(12, 6))
    reference = hf_reference(write_dequantized_checkpoint(ckpt, tmp_path / "fp32"), prompts)
    bundle = build_bundle(ckpt, tmp_path / "tp4", tp=4, pp=1, ep=2)
    result, logits = run_torchrun(bundle, task(prompts), tmp_path / "run", nproc=4)
    check_against_reference(result, logits, reference)


def test_yarn_rope_matches_transformers(tmp_path_factory, tmp_path):
    """The real model's YaRN rope scaling (factor, original length, mscale) on a tiny model."""
    from builder.engine.service import EngineService, GenerationRequest
    from builder.model.hf_compat import write_dequantized_checkpoint
    from builder.model.tiny import make_tiny

    yarn = {"rope_scaling": {"type": "yarn", "factor": 8, "original_max_position_embeddings": 64, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}
    ckpt = make_tiny(tmp_path_factory.mktemp("yarn") / "ckpt", seed=4, overrides=yarn)
    prompts = fixed_prompts(lengths=(40, 9))
    ref_logits, ref_greedy = hf_reference(write_dequantized_checkpoint(ckpt, tmp_path / "fp32"), prompts)
    with EngineService(build_bundle(ckpt, tmp_path / "tp1", tp=1, pp=1, ep=1)) as svc:
        logits = svc.prompt_logits(prompts)
        res = svc.generate([GenerationRequest(prompt_ids=p, sampling=SamplingParams(max_tokens=GEN_TOKENS)) for p in prompts])
    from builder.model.functional import RopeTable

    table = RopeTable.from_config(svc.bundle.cfg)
    assert table.softmax_scale != svc.bundle.cfg.qk_head_dim ** -0.5  # mscale really applied
    assert max_rel_err(logits, ref_logits) < REL_TOL
    assert [r.token_ids for r in res] == ref_greedy


def test_fused_and_unfused_bundles_agree(bundles, prompts):
    """Every fusion off (and MLA absorption off) against every fusion on: same logits, same greedy tokens."""
    from builder.engine.service import EngineService, GenerationRequest
    from builder.shard.fusion import FusionOptions

    outs = {}
    for tag, fusion in (("fused", FusionOptions()), ("unfused", FusionOptions.none())):
        with EngineService(bundles(1, 1, 1, fusion=fusion, tag=tag)) as svc:
            assert svc.engine.model.attn[0].fused_a == (tag == "fused")
            assert svc.engine.model.mlp[1].stacked == (tag == "fused")
            reqs = [GenerationRequest(prompt_ids=p, sampling=SamplingParams(max_tokens=GEN_TOKENS)) for p in prompts]
            outs[tag] = (svc.prompt_logits(prompts), [r.token_ids for r in svc.generate(reqs)])
    assert max_rel_err(outs["fused"][0], outs["unfused"][0]) < 1e-5
    assert outs["fused"][1] == outs["unfused"][1]


def test_packed_and_plain_gemm_weights_agree(bundles, prompts, monkeypatch):
    """The CPU engine's pre-packed GEMM weights (its default) against plain tensors: same logits within fp32
    rounding, same greedy tokens; every 2-D weight of the decoder but the embedding and the small ones is packed, experts included."""
    from builder.engine.layers import PACKED_MIN_ELEMENTS
    from builder.engine.service import EngineService, GenerationRequest

    outs = {}
    for packed in ("1", "0"):
        monkeypatch.setenv("DSBUILD_PACKED_GEMMS", packed)
        with EngineService(bundles(1, 1, 1)) as svc:
            model = svc.engine.model
            mtp = f"model.layers.{svc.engine.cfg.num_hidden_layers}."  # set up (and packed) when MTP drafts
            gemm_weights = [n for n, t in model.w.t.items()
                            if t.ndim == 2 and "embed_tokens" not in n and not n.startswith(mtp)]
            big = [n for n in gemm_weights if model.w.t[n].numel() >= PACKED_MIN_ELEMENTS]
            assert big and all(model.w.t[n].is_mkldnn == (packed == "1" and n in big) for n in gemm_weights)
            assert bool(model.mlp[1].expert_gemms) == (packed == "1")
            reqs = [GenerationRequest(prompt_ids=p, sampling=SamplingParams(max_tokens=GEN_TOKENS)) for p in prompts]
            outs[packed] = (svc.prompt_logits(prompts), [r.token_ids for r in svc.generate(reqs)])
    assert max_rel_err(outs["1"][0], outs["0"][0]) < 1e-5
    assert outs["1"][1] == outs["0"][1]


@pytest.mark.parametrize("layout", [(1, 1, 1), (2, 1, 2)])
def test_all_experts_at_once_equals_each_expert_on_its_rows(bundles, layout, monkeypatch):
    """The CPU MoE's decode path (every row through all local experts in two GEMMs, routing weights as a dense
    matrix) against the per-expert path, on a whole rank and on a TP2/EP2 rank (half the experts, moe-TP slices);
    and it is the path taken for a few rows that reach most experts."""
    import builder.engine.layers as layers
    from builder.engine.bundle import EngineBundle
    from builder.engine.distributed import Comm
    from builder.engine.model import StageModel

    bundle = EngineBundle.open(bundles(*layout))
    comm = Comm(layout=bundle.layout, rank=bundle.layout.world_size - 1)
    moe = StageModel(bundle, comm, bundle.load_rank(comm.rank), dtype=torch.float32).mlp[1]
    assert moe.all_experts is not None
    x = torch.randn(12, bundle.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    calls = []
    all_experts = layers.MoE._all_experts
    monkeypatch.setattr(layers.MoE, "_all_experts", lambda self, *a: calls.append(a) or all_experts(self, *a))
    at_once = moe.routed(x)
    assert len(calls) == 1
    monkeypatch.setattr(layers, "ALL_EXPERTS_MAX_ROWS", 0)
    per_expert = moe.routed(x)
    assert len(calls) == 1
    torch.testing.assert_close(at_once, per_expert, rtol=1e-5, atol=1e-5)
    assert at_once.abs().max() > 0.1


def test_seeded_sampling_repeats_and_bf16_stays_close(bundles, prompts):
    from builder.engine.service import EngineService, GenerationRequest

    reqs = lambda seed: [GenerationRequest(prompt_ids=p, sampling=SamplingParams(max_tokens=8, temperature=1.2, top_k=40, top_p=0.9, seed=seed)) for p in prompts]
    with EngineService(bundles(1, 1, 1)) as svc:
        a, b, c = ([r.token_ids for r in svc.generate(reqs(s))] for s in (5, 5, 6))
        fp32 = svc.prompt_logits(prompts)
    assert a == b != c and all(len(t) == 8 for t in a)
    with EngineService(bundles(1, 1, 1), dtype=torch.bfloat16) as svc:
        assert svc.engine.model.w("lm_head.weight").dtype == torch.bfloat16
        bf16 = svc.prompt_logits(prompts)
    # bf16 is no oracle (its DSA top-k sets differ on some rows, docs/upstream-facts.md#U-HF-4), but it must be the same model.
    cos = torch.nn.functional.cosine_similarity(torch.cat(bf16).flatten().float(), torch.cat(fp32).flatten(), dim=0)
    assert cos > 0.99
