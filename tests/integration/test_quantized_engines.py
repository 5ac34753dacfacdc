"""Engine bundles of every quantized format run by the reference engine against transformers on the same quantized
checkpoint (dequantized by ``quantize.dequant``): logits within 1e-4 relative and identical greedy tokens. This is
what shows that each format's scales are sliced with their weights (INT4 group scales and packed nibbles split by
moe-TP, per-tensor and NVFP4 global scales replicated) and fused with them (per-part scales of a fused GEMM)."""

from __future__ import annotations

import pytest

from builder.sampling_params import SamplingParams
from tests.support.engines import GEN_TOKENS, REL_TOL, build_bundle, fixed_prompts, hf_reference, max_rel_err

MODES = ["w4afp8", "int4-awq", "fp8-tensor", "nvfp4"]


@pytest.fixture(scope="module")
def quantized(tiny_ckpt, tmp_path_factory):
    from builder.model.hf_compat import write_dequantized_checkpoint
    from quantize.modes import QuantJob, quantize

    root = tmp_path_factory.mktemp("quantized-engines")
    made = {}

    def get(mode: str):
        if mode not in made:
            out = root / mode
            out.mkdir()
            quantize(QuantJob(src=tiny_ckpt, out=out, mode=mode, log=lambda m: None, calib_size=4, calib_seq_len=32,
                              report_logits=False, gpu="b200" if mode == "nvfp4" else None))
            prompts = fixed_prompts()
            made[mode] = out, hf_reference(write_dequantized_checkpoint(out, root / f"{mode}-float"), prompts)
        return made[mode]
    return get


def check(quantized, mode: str, bundle, tmp_layout: str) -> None:
    from builder.engine.service import EngineService, GenerationRequest

    _, (ref_logits, ref_greedy) = quantized(mode)
    prompts = fixed_prompts()
    with EngineService(bundle, threads_per_rank=1) as svc:
        logits = svc.prompt_logits(prompts)
        res = svc.generate([GenerationRequest(prompt_ids=p, sampling=SamplingParams(max_tokens=GEN_TOKENS)) for p in prompts])
    err = max_rel_err(logits, ref_logits)
    assert err < REL_TOL, f"{mode} {tmp_layout}: max relative logit error {err:.2e}"
    assert [r.token_ids for r in res] == ref_greedy, f"{mode} {tmp_layout}"


@pytest.mark.parametrize("mode", MODES)
def test_fused_tp2_bundle_of_each_format_matches_transformers(quantized, mode, tmp_path):
    """TP2, EP1: every routed expert split in two (moe-TP), fused gate+up and q_a+kv_a+indexer.wk GEMMs."""
    src, _ = quantized(mode)
    check(quantized, mode, build_bundle(src, tmp_path / "b", tp=2, pp=1, ep=1), "tp2pp1ep1")


@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("mode", MODES)
def test_tp4_pp2_ep2_bundle_of_each_format_matches_transformers(quantized, mode, fused, tmp_path):
    from builder.shard.fusion import FusionOptions

    src, _ = quantized(mode)
    bundle = build_bundle(src, tmp_path / "b", tp=4, pp=2, ep=2, fusion=FusionOptions() if fused else FusionOptions.none())
    check(quantized, mode, bundle, "tp4pp2ep2")
