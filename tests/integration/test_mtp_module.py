"""The MTP module of the reference engine: its input combination against a direct computation from the checkpoint
(embedding first: ``eh_proj([enorm(embed(t[i+1])), hnorm(h[i])])``, as vLLM, sglang and TensorRT-LLM concatenate),
and its own latent + indexer cache: one multi-token step equals token-by-token steps."""

from __future__ import annotations

import pytest
import torch

from builder.engine.bundle import EngineBundle
from builder.engine.distributed import make_comm
from builder.engine.generate import Engine
from builder.engine.kv_cache import StepPositions
from builder.engine.mtp import MTPModule
from builder.model.catalog import build_catalog
from builder.model.config import tiny_config
from builder.model.tiny import init_tensor, make_tiny
from tests.support.engines import build_bundle


def _rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.fixture(scope="module")
def zero_layer_engine(tmp_path_factory):
    """Tiny target whose MTP decoder layer adds nothing (o_proj, down_proj zero): MTP = head(norm(eh_proj(...)))."""
    root = tmp_path_factory.mktemp("mtp-zero")
    cfg = tiny_config("tiny")
    L = cfg.num_hidden_layers
    w = {s.name: init_tensor(s, cfg, 3) for s in build_catalog(cfg) if not s.is_scale}
    for n in w:
        if n.startswith(f"model.layers.{L}.") and n.endswith(("o_proj.weight", "down_proj.weight")):
            w[n] = torch.zeros_like(w[n])
    ckpt = make_tiny(root / "ckpt", weights=w)
    bundle = EngineBundle.open(build_bundle(ckpt, root / "b", tp=1, pp=1, ep=1))
    return Engine(bundle, make_comm(bundle.layout, rank=0)), bundle


def test_mtp_combines_embedding_first_then_hidden(zero_layer_engine):
    engine, bundle = zero_layer_engine
    t = bundle.load_rank(0)  # dequantized exactly as the engine holds them
    cfg = bundle.cfg
    p = f"model.layers.{cfg.num_hidden_layers}."
    mtp = MTPModule(engine.model)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 5), generator=g)
    hidden = torch.randn(2, 5, cfg.hidden_size, generator=g) * 3
    _, logits = mtp.forward(tokens, hidden, StepPositions(torch.zeros(2, dtype=torch.long), 5),
                            mtp.new_cache(batch=2, capacity=8))
    e = t[p + "embed_tokens.weight"][tokens]
    enorm, hnorm = _rms(e, t[p + "enorm.weight"]), _rms(hidden, t[p + "hnorm.weight"])

    def head(parts):
        x = torch.cat(parts, dim=-1) @ t[p + "eh_proj.weight"].T
        return _rms(x, t[p + "shared_head.norm.weight"]) @ t[p + "shared_head.head.weight"].T

    assert torch.allclose(logits, head([enorm, hnorm]), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits, head([hnorm, enorm]), rtol=1e-2, atol=1e-2)  # the order is checked


def test_mtp_cache_one_wide_step_equals_token_by_token(tiny_ckpt, tmp_path):
    """Past index_topk (8) positions so DSA's sparse selection runs on the MTP layer's own indexer cache."""
    bundle = EngineBundle.open(build_bundle(tiny_ckpt, tmp_path / "b", tp=1, pp=1, ep=1))
    engine = Engine(bundle, make_comm(bundle.layout, rank=0))
    mtp = MTPModule(engine.model)
    g = torch.Generator().manual_seed(1)
    S = 14
    tokens = torch.randint(0, bundle.cfg.vocab_size, (1, S), generator=g)
    hidden = torch.randn(1, S, bundle.cfg.hidden_size, generator=g)
    wide_g, wide = mtp.forward(tokens, hidden, StepPositions(torch.zeros(1, dtype=torch.long), S),
                               mtp.new_cache(batch=1, capacity=S))
    cache = mtp.new_cache(batch=1, capacity=S)
    for i in range(S):
        _, step = mtp.forward(tokens[:, i:i + 1], hidden[:, i:i + 1],
                              StepPositions(torch.tensor([i]), 1), cache)
        assert torch.allclose(step[0, 0], wide[0, i], rtol=1e-4, atol=1e-4), i


def test_mtp_drafts_from_the_final_normed_hidden_state_as_the_trainer_taught_it(tiny_ckpt, tmp_path):
    """The runtime's MTP path (engine hidden -> final norm -> module) on the trained checkpoint computes the training
    model's MTP head (builder.train.model, which feeds ``hnorm`` the post-final-norm state, as TensorRT-LLM and vLLM
    do); feeding the pre-norm state instead gives clearly different logits."""
    from builder.engine.mtp import MTPProposer
    from builder.model import trained as builtin
    from builder.model.hf_compat import iter_dequantized
    from builder.train.model import TinyDeepseekV32, load_weights

    bundle = EngineBundle.open(build_bundle(tiny_ckpt, tmp_path / "b", tp=1, pp=1, ep=1))
    engine = Engine(bundle, make_comm(bundle.layout, rank=0))
    tok = builtin.load_tokenizer()
    ids = torch.tensor([[0] + tok.encode("It is a truth universally acknowledged, that a single man in possession "
                                         "of a good fortune, must be in want of a wife.").ids])
    S = ids.shape[1]
    assert S > bundle.cfg.index_topk  # DSA's sparse selection runs
    trainer = TinyDeepseekV32(tiny_config("tiny"))
    load_weights(trainer, dict(iter_dequantized(tiny_ckpt)))
    with torch.no_grad():
        expected = trainer.eval()(ids, sparse=True).mtp_logits[0]  # [S-1, V]: x[t+2] at t

    zeros = torch.zeros(1, dtype=torch.long)
    hidden = engine.hidden(ids, StepPositions(zeros, S), engine.model.new_cache(batch=1, capacity=S))
    proposer = MTPProposer(engine)

    def mtp_logits(normed_hidden):
        _, logits = proposer.module.forward(ids[:, 1:], normed_hidden[:, :-1], StepPositions(zeros, S - 1),
                                            proposer.module.new_cache(batch=1, capacity=S))
        return logits[0]

    with torch.inference_mode():
        normed = engine.model.final_norm(hidden)  # what the speculative decoder hands the proposer
    got = mtp_logits(normed)
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-3), (got - expected).abs().max()
    pre_norm = mtp_logits(hidden)
    assert (pre_norm - expected).abs().max() > 100 * (got - expected).abs().max()
