"""Runtime pieces against transformers' own modules and against their definitions: the DSA indexer's top-k sets,
the noaux_tc router, RoPE variants, sampling, request validation, fusion round trips."""

from __future__ import annotations

import pytest
import torch

from builder.engine.sampling import GenerationRequest, sample, validate_request
from builder.errors import RequestError
from builder.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def hf_model(tiny_float_dir):
    from builder.model.hf_compat import load_hf_model

    return load_hf_model(tiny_float_dir)


def _weights(hf_model):
    from builder.engine.layers import Weights

    return Weights({k: v.detach() for k, v in hf_model.state_dict().items()})


def _step(cfg, B, S):
    from builder.engine.kv_cache import StepPositions
    from builder.engine.layers import Step
    from builder.model.functional import RopeTable

    pos = StepPositions(torch.zeros(B, dtype=torch.long), S)
    cos, sin = RopeTable.from_config(cfg).cos_sin(pos.positions, torch.float32)
    return Step(pos, cos, sin, pos.visible(), decode=False)


def test_indexer_selects_the_same_key_sets_as_transformers(hf_model):
    """Same top-k key sets per query as transformers' DeepseekV32Indexer; a differing set is only accepted where
    the k-th and (k+1)-th scores are a near-tie (< 1e-5 apart), which docs/upstream-facts.md#U-HF-4 says happens."""
    from builder.engine.layers import Indexer
    from builder.model.config import tiny_config

    cfg = tiny_config()
    B, S, k = 2, 40, cfg.index_topk
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, S, cfg.hidden_size, generator=g)
    attn = hf_model.model.layers[1].self_attn
    with torch.no_grad():
        q_resid = attn.q_a_layernorm(attn.q_a_proj(x))
        pos_ids = torch.arange(S)[None].expand(B, -1)
        pe = hf_model.model.rotary_emb(x, pos_ids)
        ref = attn.indexer(x, q_resid, pe, None, pos_ids).long()
    ours = Indexer(cfg, _weights(hf_model).sub("model.layers.1.self_attn.indexer."))
    step = _step(cfg, B, S)
    keys = ours.keys(torch.nn.functional.linear(x, attn.indexer.wk.weight), step)
    scores = ours.scores(x, q_resid, keys, step)
    mine = scores.topk(k, dim=-1).indices
    checked = ties = 0
    for b in range(B):
        for s in range(k, S):  # queries with more visible keys than index_topk: a real selection
            checked += 1
            a, r = set(mine[b, s].tolist()), set(ref[b, s].tolist())
            if a != r:
                ordered = scores[b, s].sort(descending=True).values
                assert float(ordered[k - 1] - ordered[k]) < 1e-5, (b, s, a ^ r)
                ties += 1
    assert checked == B * (S - k) and ties <= checked // 10


def test_router_matches_transformers(hf_model):
    from builder.engine.layers import route
    from builder.model.config import tiny_config

    cfg = tiny_config()
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    gate = hf_model.model.layers[2].mlp.gate
    with torch.no_grad():
        _, ref_w, ref_i = gate(x)
    idx, w = route(cfg, x, _weights(hf_model).sub("model.layers.2.mlp."))
    assert torch.equal(idx.sort(-1).values, ref_i.sort(-1).values)
    order_ref, order = ref_i.argsort(-1), idx.argsort(-1)
    torch.testing.assert_close(w.gather(1, order), ref_w.gather(1, order_ref), rtol=1e-6, atol=1e-7)
    assert torch.allclose(w.sum(-1), torch.full((64,), cfg.routed_scaling_factor))


def test_rope_variants_rotate_as_defined():
    from builder.model.functional import rotate_half_split, rotate_interleaved

    x = torch.arange(8, dtype=torch.float32)
    angle = torch.tensor([0.3, 1.1, 0.0, 2.0])
    cos, sin = angle.cos(), angle.sin()
    inter = rotate_interleaved(x, cos, sin)  # pair (x0, x1) rotated by angle 0, output [evens..., odds...]
    assert torch.allclose(inter[0], x[0] * cos[0] - x[1] * sin[0]) and torch.allclose(inter[4], x[1] * cos[0] + x[0] * sin[0])
    half = rotate_half_split(x, cos, sin)  # pair (x0, x4) rotated by angle 0
    assert torch.allclose(half[0], x[0] * cos[0] - x[4] * sin[0]) and torch.allclose(half[4], x[4] * cos[0] + x[0] * sin[0])


def test_sampling_greedy_top_k_top_p_and_seed():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])
    assert sample(logits, SamplingParams(temperature=0.0), None) == 1
    draws = lambda req, n=300, seed=0: [sample(logits, req, torch.Generator().manual_seed(seed + i)) for i in range(n)]
    assert set(draws(SamplingParams(temperature=1.0, top_k=2))) == {1, 2}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.3))) == {1}  # p(1) alone exceeds 0.3
    free = draws(SamplingParams(temperature=1.0))
    assert set(free) >= {0, 1, 2, 4}
    assert draws(SamplingParams(temperature=0.7), seed=5) == draws(SamplingParams(temperature=0.7), seed=5)
    hot = draws(SamplingParams(temperature=5.0), n=400)
    cold = draws(SamplingParams(temperature=0.2), n=400)
    assert hot.count(1) < cold.count(1)


@pytest.mark.parametrize("req,message", [
    (GenerationRequest([]), "empty prompt"),
    (GenerationRequest([5000]), "outside the vocabulary"),
    (GenerationRequest([1], SamplingParams(max_tokens=0)), "at least 1"),
    (GenerationRequest([1], SamplingParams(temperature=-1)), "temperature"),
    (GenerationRequest([1], SamplingParams(top_p=0)), "top_p"),
    (GenerationRequest([1], SamplingParams(top_k=-2)), "top_k"),
    (GenerationRequest([1], SamplingParams(max_tokens=600)), "positions"),
])
def test_bad_requests_are_refused_with_one_sentence(req, message):
    from builder.model.config import tiny_config

    with pytest.raises(RequestError, match=message):
        validate_request(req, tiny_config())


def test_composed_absorption_matches_the_factored_one_and_is_chosen_by_size(hf_model):
    """Decode with the absorbed factors pre-multiplied (what the tiny model reads) gives the factored absorbed
    attention's output; DeepSeek-V3.2's shapes (kv_lora 512 > nope 128) keep the factors."""
    from builder.engine.kv_cache import KVCache, StepPositions
    from builder.engine.layers import MLA, Step, absorbed_compositions
    from builder.model.config import preset, tiny_config
    from builder.model.functional import RopeTable

    cfg = tiny_config()
    rope = RopeTable.from_config(cfg)
    w = _weights(hf_model).sub("model.layers.1.self_attn.")
    composed = MLA(cfg, w, tp=1, rope=rope, absorb=True)
    factored = MLA(cfg, w, tp=1, rope=rope, absorb=True)
    factored.q_latent = factored.o_latent = None
    assert composed.q_latent is not None and composed.o_latent is not None
    B, S = 2, 12  # more keys than index_topk (8): the indexer selects
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, S + 1, cfg.hidden_size, generator=g)
    outs = []
    for mla in (composed, factored):
        cache = KVCache(cfg, [1], batch=B, capacity=S + 1, dtype=torch.float32)
        for start, width in ((0, S), (S, 1)):  # prefill, then one decode step
            pos = StepPositions(torch.full((B,), start, dtype=torch.long), width)
            cos, sin = rope.cos_sin(pos.positions, torch.float32)
            step = Step(pos, cos, sin, pos.visible(), decode=width == 1)
            with torch.no_grad():
                y = mla(x[:, start:start + width], cache[1], step)
        outs.append(y)
    assert float((outs[0] - outs[1]).abs().max()) < 1e-5 * float(outs[1].abs().max())  # fp32 rounding only

    big = preset("deepseek-v3.2")  # [h x 512] x 1536 composed vs [h x 128] x 1536 + [h x 128] x 512 factors
    assert absorbed_compositions(big, q_in=big.q_lora_rank, o_out=big.hidden_size) == (False, False)
    assert absorbed_compositions(cfg, q_in=cfg.q_lora_rank, o_out=cfg.hidden_size) == (True, True)


def _cpu_packs_bf16() -> bool:
    """What oneDNN's bf16 weight reorder needs, read from the CPU's own flags (independent of the probe)."""
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return True
    return {"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_gemm_weights_multiply_like_f_linear(dtype, monkeypatch):
    """A pre-packed CPU weight gives F.linear's product for any row count (the pack's row hint is only a hint),
    batched inputs and strided views; small weights and DSBUILD_PACKED_GEMMS=0 keep plain tensors."""
    import torch.nn.functional as F

    from builder.engine.layers import PACKED_MIN_ELEMENTS, PACKED_ROWS_HINT, gemm_form, linear, packed_gemms_enabled

    g = torch.Generator().manual_seed(0)
    w = torch.randn(600, 128, generator=g).to(dtype)
    if dtype == torch.bfloat16 and not _cpu_packs_bf16():
        assert not packed_gemms_enabled(dtype) and not gemm_form(w).is_mkldnn  # falls back to plain weights
        assert packed_gemms_enabled(torch.float32)  # and float32 still packs
        pytest.skip("this CPU has no AVX512-BW/VL/DQ or AVX-NE-CONVERT: oneDNN cannot pack bf16 weights")
    assert packed_gemms_enabled(dtype), "this torch build cannot pre-pack CPU GEMM weights: decode runs ~1.3x slower"
    assert not gemm_form(w[:PACKED_MIN_ELEMENTS // 128 - 1]).is_mkldnn  # small ones multiply faster unpacked
    packed = gemm_form(w)
    assert packed.is_mkldnn and packed.shape == w.shape and packed.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for rows in (0, 1, PACKED_ROWS_HINT, 7, 64):
        x = torch.randn(rows, 128, generator=g).to(dtype)
        torch.testing.assert_close(linear(x, packed).float(), F.linear(x, w).float(), rtol=tol, atol=tol)
    x = torch.randn(2, 3, 256, generator=g).to(dtype)[..., ::2]  # batched and strided
    torch.testing.assert_close(linear(x, packed).float(), F.linear(x, w).float(), rtol=tol, atol=tol)
    monkeypatch.setenv("DSBUILD_PACKED_GEMMS", "0")
    plain = gemm_form(w)
    assert not plain.is_mkldnn and torch.equal(plain, w)
