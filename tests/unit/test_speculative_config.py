"""``speculative_config`` in llm_api.yaml (TensorRT-LLM 1.2.1): MTP and draft-target blocks, checked by the
per-version allow-list contract, golden renders, and the draft-model bundle the build stage writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from builder.errors import SpecError
from builder.model.config import preset
from builder.specs import RunSpec
from builder.trtllm import PINNED_VERSION, llm_api
from builder.trtllm.contract import check

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "trtllm"
V32 = dict(model="deepseek-ai/DeepSeek-V3.2", tp=8, pp=1, ep=8, attention_dp=True, gpu="h200-sxm", concurrency=64)


@pytest.mark.parametrize("name,kw", [
    ("v32-h200-tp8-ep8-adp-mtp3", dict(spec="mtp", draft_len=3)),
    ("v32-h200-tp8-ep8-adp-draft4", dict(spec="draft", draft_len=4, draft_model="/models/small-draft")),
])
def test_speculative_render_matches_golden_file(name, kw):
    text = llm_api.render(RunSpec(**V32, **kw), preset("deepseek-v3.2")).to_yaml()
    path = GOLDEN / f"{name}.yaml"
    if os.environ.get("DSBUILD_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name}: rendering changed; rerun with DSBUILD_UPDATE_GOLDEN=1 if intended"


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_mtp_block_conforms_and_sizes_follow_the_draft_length(n):
    cfg = preset("deepseek-v3.2")
    plain = llm_api.render(RunSpec(**V32), cfg).options
    o = llm_api.render(RunSpec(**V32, spec="mtp", draft_len=n), cfg).options
    assert check(o, version=PINNED_VERSION) == []
    assert o["speculative_config"] == {"decoding_type": "MTP", "num_nextn_predict_layers": n,
                                       "mtp_eagle_one_model": True}
    assert o["max_seq_len"] == plain["max_seq_len"] + n
    assert o["max_num_tokens"] >= plain["max_num_tokens"]


@pytest.mark.parametrize("n", [1, 4])
def test_draft_target_block_conforms(n):
    o = llm_api.render(RunSpec(**V32, spec="draft", draft_len=n, draft_model="tiny-draft"),
                       preset("deepseek-v3.2")).options
    assert check(o, version=PINNED_VERSION) == []
    assert o["speculative_config"] == {"decoding_type": "DraftTarget", "max_draft_len": n,
                                       "speculative_model": "draft-quantized"}
    # 1.2.1's DecodingBaseConfig.from_dict knows DraftTarget only (docs/tensorrt-llm-contract.md#C-LLMARGS-8).
    wrong = {**o, "speculative_config": {**o["speculative_config"], "decoding_type": "Draft_Target"}}
    assert any("decoding_type" in p for p in check(wrong, version=PINNED_VERSION))


def test_mtp_for_a_model_without_the_module_is_refused():
    with pytest.raises(SpecError, match="needs a model with an MTP module"):
        llm_api.render(RunSpec(model="tiny-draft", tp=1, pp=1, spec="mtp"), preset("tiny-draft"))


def test_no_speculative_block_without_spec():
    assert "speculative_config" not in llm_api.render(RunSpec(**V32), preset("deepseek-v3.2")).options
