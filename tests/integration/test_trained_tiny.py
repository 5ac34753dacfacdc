"""The committed trained tiny models: they learned something, they export into the real layout with exactly the
committed values, transformers computes the same function, and training is reproducible from the seed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from builder.model import trained as builtin
from builder.model.catalog import catalog_by_name
from builder.model.config import tiny_config
from builder.model.generated import ensure_tiny
from builder.model.hf_compat import iter_dequantized, load_hf_model, write_dequantized_checkpoint
from builder.model.safetensors_io import validate_checkpoint
from builder.train.data import TokenData
from builder.train.model import TinyDeepseekV32, load_weights
from builder.train.trainer import RECIPES, SMALL_EVAL_SEQUENCES, TrainConfig, evaluate, train, with_steps


@pytest.fixture(scope="module")
def data() -> TokenData:
    return TokenData.from_tokenizer(builtin.load_tokenizer())


def _trained_model(preset: str) -> TinyDeepseekV32:
    model = TinyDeepseekV32(tiny_config(preset))
    load_weights(model, builtin.load_builtin(preset))
    return model.eval()


@pytest.mark.parametrize("preset", ["tiny", "tiny-draft"])
def test_trained_model_is_far_better_than_unigram_on_heldout_text(preset, data):
    seq_len = RECIPES[preset].seq_len
    got = evaluate(_trained_model(preset), data, seq_len=seq_len, max_sequences=SMALL_EVAL_SEQUENCES)
    assert got["ppl"] < 0.5 * got["unigram_ppl"], got
    if preset == "tiny":
        # The MTP module predicts x[t+2] from h[t] and the true x[t+1] (teacher-forced, as DeepSeek trains it), one
        # decoder layer deeper than the main head: well below unigram (it may even beat the next-token head).
        assert got["mtp_ppl"] < 0.5 * got["unigram_ppl"], got
    # The committed report quotes the same model (FP8 values) on the same first sequences.
    report = builtin.builtin_report(preset)
    assert math.isclose(got["nll"], report["heldout_fp8_checkpoint_small"]["nll"], rel_tol=1e-4)


def test_the_committed_draft_is_the_weaker_model(data):
    """A draft that predicted as well as the target would make the target pointless: the smaller model stays
    clearly worse on held-out text (measured here, on the small evaluation)."""
    target, draft = (evaluate(_trained_model(p), data, seq_len=RECIPES[p].seq_len, max_sequences=SMALL_EVAL_SEQUENCES)
                     for p in ("tiny", "tiny-draft"))
    assert draft["ppl"] > 1.1 * target["ppl"], (draft["ppl"], target["ppl"])


def test_tokenizer_is_the_one_trained_on_the_shipped_corpus():
    from builder.model.tokenizer import train_tokenizer

    assert train_tokenizer(vocab_size=1024).to_str() == builtin.load_tokenizer().to_str()


@pytest.mark.parametrize("preset", ["tiny", "tiny-draft"])
def test_export_has_the_real_layout_and_exactly_the_committed_values(preset, cache_dir):
    ckpt = ensure_tiny(cache_dir / "models", preset_name=preset)
    cfg = tiny_config(preset)
    validate_checkpoint(ckpt, expected=catalog_by_name(cfg))
    committed = builtin.load_builtin(preset)
    exported = dict(iter_dequantized(ckpt))
    assert set(exported) == set(committed)
    for name, value in committed.items():
        assert torch.equal(exported[name], value), name
    router_bias = [v for n, v in committed.items() if n.endswith("e_score_correction_bias")]
    assert router_bias and all(b.abs().max() > 0 for b in router_bias)


@pytest.mark.parametrize("preset", ["tiny", "tiny-draft"])
def test_transformers_reproduces_the_training_time_heldout_loss(preset, cache_dir, data, tmp_path):
    """HF's DeepseekV32ForCausalLM on the exported checkpoint = our model on it (same function), and both are
    within FP8 rounding of the float model's held-out loss measured at the end of training."""
    ckpt = ensure_tiny(cache_dir / "models", preset_name=preset)
    hf = load_hf_model(write_dequantized_checkpoint(ckpt, tmp_path / "f32"))
    ids = data.heldout_batches(seq_len=RECIPES[preset].seq_len, max_sequences=SMALL_EVAL_SEQUENCES)
    with torch.no_grad():
        logits = hf(input_ids=ids).logits
    hf_nll = float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))
    ours = evaluate(_trained_model(preset), data, seq_len=RECIPES[preset].seq_len, max_sequences=SMALL_EVAL_SEQUENCES)
    assert abs(hf_nll - ours["nll"]) < 2e-3, (hf_nll, ours["nll"])
    float_nll = builtin.builtin_report(preset)["heldout_float_small"]["nll"]
    assert abs(hf_nll - float_nll) < 0.03, (hf_nll, float_nll)


def test_training_is_reproducible_from_the_seed(data):
    cfg = with_steps(TrainConfig(preset="tiny-draft", batch_size=2, seq_len=32, dense_steps=1, eval_sequences=2), 3)
    a = train(cfg, data, evaluate_at_end=False)
    b = train(cfg, data, evaluate_at_end=False)
    c = train(TrainConfig(**{**cfg.to_dict(), "seed": 1}), data, evaluate_at_end=False)
    assert a.losses == b.losses
    assert all(torch.equal(a.weights[n], b.weights[n]) for n in a.weights)
    assert a.losses[-1] < a.losses[0] or a.losses != c.losses
    assert any(not torch.equal(a.weights[n], c.weights[n]) for n in a.weights)


# A step of the tiny recipe takes ~30 s on 2 cores: make test checks the first two recorded steps (data order,
# init, optimizer and schedule start all show in them), make test-full all five.
@pytest.mark.parametrize("preset,steps", [
    ("tiny", 2), ("tiny-draft", 2),
    pytest.param("tiny", None, marks=pytest.mark.slow), pytest.param("tiny-draft", None, marks=pytest.mark.slow)])
def test_retraining_reproduces_the_committed_runs_first_steps(preset, steps, data):
    report = builtin.builtin_report(preset)
    first = report["first_losses"][:steps]
    assert steps is None or len(first) == steps
    cfg = TrainConfig(**report["recipe"])
    assert cfg == RECIPES[preset], "the committed model was trained with another recipe than RECIPES says"
    got = train(with_steps(cfg, len(first)), data, evaluate_at_end=False).losses
    # Bit-identical on the machine kind it was trained on; bf16 kernels may round differently on other CPUs.
    assert got == pytest.approx(first, abs=2e-3)
