"""MTP speculative decoding in the speed model, against a hand computation.

A hardware file makes every kernel free (bandwidth and FLOPs ~infinite, no link latency) so that only the fixed
latencies remain: a step is then exactly ``(layers + draft_len) * layer_overhead + draft_len * draft_overhead``
(the MTP layer runs once per draft), and TPOT is that over the accepted tokens per step."""

from __future__ import annotations

import pytest

from builder.errors import SpecError
from builder.plan.search import plan_cluster
from builder.plan.perf import DEFAULT_ACCEPTANCE, Speculation

LAYER_US, DRAFT_US = 100.0, 300.0
FREE = ("gpus:\n  h200-sxm: {hbm_tb_s: 1.0e9, bf16_tflops: 1.0e12, fp8_tflops: 1.0e12, scale_up_gb_s: 1.0e12, "
        f"scale_up_latency_us: 0, layer_overhead_us: {LAYER_US}, draft_overhead_us: {DRAFT_US}}}\n")


def plan(tmp_path, **kw):
    hw = tmp_path / "hw.yaml"
    hw.write_text(FREE)
    (lp,) = plan_cluster(model="deepseek-v3.2", gpu="h200-sxm", hardware_file=hw, tp=8, pp=1, ep=8,
                         attention_dp=False, concurrency=1, **kw).layouts
    assert lp.feasible, lp.reasons
    return lp


@pytest.mark.parametrize("draft_len,acceptance", [(0, None), (1, 1.92), (3, None), (3, 3.4), (5, 2.0)])
def test_step_and_tpot_match_the_hand_computation(tmp_path, draft_len, acceptance):
    lp = plan(tmp_path, draft_len=draft_len, acceptance=acceptance)
    step_ms = ((61 + draft_len) * LAYER_US + draft_len * DRAFT_US) / 1e3
    accepted = acceptance if acceptance is not None else DEFAULT_ACCEPTANCE[draft_len]
    assert lp.decode.step_ms == pytest.approx(step_ms, rel=1e-4)
    assert lp.decode.tpot_ms == pytest.approx(step_ms / accepted, rel=1e-4)
    assert lp.tokens_per_s_per_user == pytest.approx(1e3 * accepted / step_ms, rel=1e-4)
    d = lp.to_dict()
    assert d["draft_len"] == draft_len and d["accepted_tokens_per_step"] == pytest.approx(accepted)


def test_mtp3_speed_up_over_plain_decoding(tmp_path):
    """The published default for 3 drafts (2.82 tokens per step): 6.1 ms -> 7.3 ms a step, 2.59 ms per token."""
    plain = plan(tmp_path).tokens_per_s_per_user
    mtp3 = plan(tmp_path, draft_len=3).tokens_per_s_per_user
    assert plain == pytest.approx(1e3 / 6.1, rel=1e-4)
    assert mtp3 / plain == pytest.approx(6.1 / (7.3 / 2.82), rel=1e-4)  # 2.356x


def test_throughput_counts_steps_per_accepted_token(tmp_path):
    lp = plan(tmp_path, draft_len=2, acceptance=2.5, isl=1000, osl=500)
    steps = 500 / 2.5
    expected = 1 * 500 / (steps * lp.decode.step_ms / 1e3 + 1 * 1000 / lp.prefill.tokens_per_s)
    assert lp.tokens_per_s_replica == pytest.approx(expected, rel=1e-9)


def test_mtp_layer_weights_and_cache_count_only_with_mtp_decoding(tmp_path):
    off, on = plan(tmp_path), plan(tmp_path, draft_len=1)
    assert on.kv_bytes_per_token == off.kv_bytes_per_token * 62 // 61
    assert off.runtime_weight_detail["mtp_dropped"] > on.runtime_weight_detail["mtp_dropped"] > 0


def test_acceptance_defaults_and_bounds():
    assert Speculation().tokens_per_step == 1.0
    assert Speculation(3).tokens_per_step == 2.82  # tech blog 1, DeepSeek-R1 on a real dataset
    assert Speculation(9).tokens_per_step == DEFAULT_ACCEPTANCE[5]
    with pytest.raises(SpecError, match="between 1 and draft_len"):
        plan_cluster(model="deepseek-v3.2", gpu="h200-sxm", tp=8, pp=1, ep=8, attention_dp=False, draft_len=2,
                     acceptance=3.5)
    lp = plan_cluster(model="deepseek-v3.2", gpu="h200-sxm", tp=8, pp=1, ep=8, attention_dp=False, draft_len=2,
                      include_mtp=False).layouts[0]
    assert any("needs the model's MTP module" in r for r in lp.reasons)
