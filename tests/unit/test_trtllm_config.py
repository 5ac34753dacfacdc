"""llm_api.yaml for TensorRT-LLM 1.2.1: golden renders, the key/type contract against the version's allow-list
(read from llm_args.py, source named in the data file), and TensorRT-LLM's own validation where importable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from builder.model.config import preset
from builder.specs import RunSpec
from builder.trtllm import PINNED_VERSION, llm_api
from builder.trtllm.contract import allow_list, check

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "trtllm"
CASES = {
    "tiny-cpu-tp2pp2": ("tiny", dict()),
    "v32-h200-tp8-ep8-adp": ("deepseek-v3.2", dict(model="deepseek-ai/DeepSeek-V3.2", tp=8, pp=1, ep=8,
                                                    attention_dp=True, gpu="h200-sxm", concurrency=256, isl=4096,
                                                    osl=1024)),
    "v32-b200-tp8pp2-ep4-bf16kv": ("deepseek-v3.2", dict(model="deepseek-ai/DeepSeek-V3.2", tp=8, pp=2, ep=4,
                                                          gpu="b200", kv_cache_dtype="bf16", concurrency=100,
                                                          kv_cache_free_fraction=0.85)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_config_matches_golden_file(name):
    model, kw = CASES[name]
    text = llm_api.render(RunSpec(**kw), preset(model)).to_yaml()
    path = GOLDEN / f"{name}.yaml"
    if os.environ.get("DSBUILD_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name}: rendering changed; rerun with DSBUILD_UPDATE_GOLDEN=1 if intended"


@pytest.mark.parametrize("quant", ["fp8", "w4afp8", "nvfp4", "bf16"])
@pytest.mark.parametrize("gpu", [None, "h100-sxm", "h200-sxm", "b200"])
@pytest.mark.parametrize("layout", [(8, 1, 8, True), (16, 1, 16, True), (4, 2, 2, False), (1, 1, 1, False)])
def test_every_emitted_key_and_type_is_allowed_by_the_pinned_version(quant, gpu, layout):
    tp, pp, ep, adp = layout
    cfg = preset("deepseek-v3.2")
    rendered = llm_api.render(RunSpec(tp=tp, pp=pp, ep=ep, attention_dp=adp, gpu=gpu, quant=quant), cfg)
    assert check(rendered.options, version=PINNED_VERSION) == []
    o = rendered.options
    assert (o["tensor_parallel_size"], o["pipeline_parallel_size"], o["moe_expert_parallel_size"],
            o["moe_tensor_parallel_size"]) == (tp, pp, ep, tp // ep)
    sizes = o["cuda_graph_config"]["batch_sizes"]
    # batch_sizes alone: with max_batch_size too, 1.2.1 demands its own generated list (contract C-LLMARGS-5).
    assert sizes == sorted(set(sizes)) and max(sizes) == o["max_batch_size"]
    assert "max_batch_size" not in o["cuda_graph_config"]
    assert o["moe_config"]["backend"] != "AUTO"
    assert ("pp_partition" in o) == (pp > 1) and sum(o.get("pp_partition", [61])) == 61
    assert any("not verified upstream" in w for w in rendered.warnings) == (pp > 1)
    for legacy in allow_list(PINNED_VERSION)["rejected_legacy_keys"]:
        assert legacy not in o


def test_yaml_round_trips_and_names_the_version(tmp_path):
    rendered = llm_api.render(RunSpec(tp=2, pp=2), preset("deepseek-v3.2"))
    text = rendered.to_yaml()
    assert "TensorRT-LLM 1.2.1" in text.splitlines()[0]
    assert yaml.safe_load(text) == rendered.options


@pytest.mark.parametrize("config,problem", [
    ({"use_cuda_graph": True}, "use_cuda_graph: not a TensorRT-LLM 1.2.1 LLM-API key"),
    ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype: not a"),
    ({"tensor_parallel_size": "8"}, "is not of type int"),
    ({"enable_attention_dp": 1}, "is not of type bool"),
    ({"kv_cache_config": {"dtype": "int3"}}, "kv_cache_config.dtype"),
    ({"kv_cache_config": {"free_gpu_memory_fractions": 0.9}}, "free_gpu_memory_fractions: not a"),
    ({"cuda_graph_config": {"batch_sizes": [1, "2"]}}, "batch_sizes"),
    ({"moe_config": {"backend": "MAGIC"}}, "moe_config.backend"),
    ({"attention_backend": "TRTLLM"}, "attention_backend: not a"),
    # The map of DecodingBaseConfig.from_dict knows DraftTarget, not Draft_Target (contract C-LLMARGS-8).
    ({"speculative_config": {"decoding_type": "Draft_Target", "max_draft_len": 3, "speculative_model": "d"}},
     "decoding_type: must be one of"),
    ({"speculative_config": {"decoding_type": "DraftTarget", "max_draft_len": 3}}, "DraftTarget needs"),
    ({"moe_config": {"backend": "AUTO"}}, "moe_config.backend"),  # no AUTO in 1.2.1 (C-LLMARGS-6)
    ({"cuda_graph_config": {"batch_sizes": [1, 2, 4], "max_batch_size": 4}}, "batch_sizes and a non-zero"),
    ({"kv_cache_config": {"dtype": "bfloat16"}}, "kv_cache_config.dtype"),  # only fp8/auto take effect (C-LLMARGS-4)
    ({"speculative_config": {"decoding_type": "MTP", "num_nextn_predict_layer": 1}}, "num_nextn_predict_layer: not a"),
])
def test_contract_refuses_unknown_keys_and_wrong_types(config, problem):
    problems = check(config, version=PINNED_VERSION)
    assert any(problem in p for p in problems), problems


def test_contract_admits_the_speculative_and_dsa_blocks_the_hook_may_emit():
    ok = {"speculative_config": {"decoding_type": "MTP", "num_nextn_predict_layers": 3},
          "sparse_attention_config": {"algorithm": "dsa", "index_topk": 2048},
          "attn_backend": "TRTLLM", "torch_compile_config": {"enable_fullgraph": True}}
    assert check(ok, version=PINNED_VERSION) == []
    draft = {"speculative_config": {"decoding_type": "DraftTarget", "max_draft_len": 3, "speculative_model": "/m"}}
    assert check(draft, version=PINNED_VERSION) == []


def test_unknown_version_is_refused():
    from builder.errors import PackageError

    with pytest.raises(PackageError, match="no TensorRT-LLM key allow-list for version '0.9'"):
        check({}, version="0.9")


def test_build_writes_llm_api_yaml(tiny_ckpt, tmp_path):
    from builder.rundir import LLM_API_FILE
    from builder.stages.build import write_llm_api

    info = write_llm_api(RunSpec(tp=2, pp=2, ep=2), tiny_ckpt, tmp_path, log=lambda m: None)
    data = yaml.safe_load((tmp_path / LLM_API_FILE).read_text())
    assert data["pp_partition"] == [2, 2] and data["moe_expert_parallel_size"] == 2
    assert info["trtllm_version"] == "1.2.1" and info["warnings"]


def test_tensorrt_llm_itself_accepts_the_config(tiny_ckpt):
    pytest.importorskip("tensorrt_llm")  # only inside NVIDIA's TensorRT-LLM containers
    from builder.trtllm.validate import validate_with_trtllm

    rendered = llm_api.render(RunSpec(tp=1, pp=1, gpu="h200-sxm"), preset("tiny"))
    assert validate_with_trtllm(rendered.options, model_dir=tiny_ckpt) is not None


# --- real-model numbers (the deepseek-v3.2 preset), one test per conformance item of issue 17 ---

V32 = dict(model="deepseek-ai/DeepSeek-V3.2")


@pytest.mark.parametrize("gpu,quant,layout,backend", [
    (None, "fp8", (8, 1, 8, False), "CUTLASS"),          # no GPU named: 1.2.1's default, never AUTO
    ("h200-sxm", "fp8", (8, 1, 8, True), "CUTLASS"),     # H100/H200 FP8 -> CUTLASS (contract C-MOE-4)
    ("h100-sxm", "w4afp8", (16, 1, 16, True), "CUTLASS"),
    ("b200", "fp8", (8, 1, 8, False), "DEEPGEMM"),       # B200 EP<=8 FP8 -> DEEPGEMM
    ("b200", "nvfp4", (8, 1, 8, True), "TRTLLM"),
    ("gb200", "nvfp4", (16, 1, 16, True), "WIDEEP"),     # EP > 8 on Blackwell -> WIDEEP
])
def test_moe_backend_follows_the_support_matrix_and_names_the_kv_b_proj_handling(gpu, quant, layout, backend):
    tp, pp, ep, adp = layout
    rendered = llm_api.render(RunSpec(**V32, tp=tp, pp=pp, ep=ep, attention_dp=adp, gpu=gpu, quant=quant),
                              preset("deepseek-v3.2"))
    assert rendered.options["moe_config"] == {"backend": backend}
    excluded = "*kv_b_proj*" in rendered.info["fp8_exclude_modules"]
    assert excluded == (backend == "TRTLLM")  # TensorRT-LLM excludes kv_b_proj only for TRTLLM (C-MCFG-3)
    assert ("dequantized to BF16" in rendered.info["kv_b_proj"]) == excluded
    assert f"MoE backend {backend}" in rendered.to_yaml()


def _admitted(options: dict, prompt_len: int) -> bool:
    """TensorRT-LLM 1.2.1's admission rule for the PyTorch backend (BaseLLM._check_arguments, contract C-LLM-1)."""
    return options["enable_chunked_prefill"] or prompt_len <= options["max_num_tokens"]


@pytest.mark.parametrize("kw", [
    dict(tp=8, pp=1, ep=8, attention_dp=True, gpu="h200-sxm", concurrency=256, isl=4096, osl=1024),
    dict(tp=8, pp=1, ep=8, gpu="h200-sxm", concurrency=8, isl=1024, osl=8192),   # long answers: isl << max_seq_len
    dict(tp=8, pp=1, ep=8, gpu="h200-sxm", concurrency=64, isl=2048, osl=2048, spec="mtp", draft_len=3),
    dict(tp=16, pp=1, ep=16, attention_dp=True, gpu="h100-sxm", quant="w4afp8", concurrency=1024, isl=128, osl=128),
])
def test_every_prompt_max_seq_len_allows_is_admitted(kw):
    rendered = llm_api.render(RunSpec(**V32, **kw), preset("deepseek-v3.2"))
    o = rendered.options
    assert o["enable_chunked_prefill"] is False
    longest = o["max_seq_len"] - 1  # at least one token is generated
    assert _admitted(o, longest), (o["max_num_tokens"], o["max_seq_len"])
    assert rendered.info["max_prompt_tokens"] == longest
    # The cost is stated: activations grow with max_num_tokens, and the plan/llm_api.yaml say by how much.
    assert 0 < rendered.info["activation_bytes"] < 40 * 2**30
    assert "activations ~" in rendered.to_yaml()


def test_chunked_prefill_keeps_max_num_tokens_a_per_iteration_budget():
    kw = dict(tp=8, pp=1, ep=8, gpu="h200-sxm", concurrency=8, isl=1024, osl=8192)
    plain = llm_api.render(RunSpec(**V32, **kw), preset("deepseek-v3.2"))
    chunked = llm_api.render(RunSpec(**V32, **kw, chunked_prefill=True), preset("deepseek-v3.2"))
    assert chunked.options["enable_chunked_prefill"] is True
    assert chunked.options["max_num_tokens"] < plain.options["max_num_tokens"]
    assert chunked.info["activation_bytes"] < plain.info["activation_bytes"]
    assert _admitted(chunked.options, chunked.options["max_seq_len"] - 1)


def test_activation_estimate_grows_with_tokens_and_shrinks_with_parallelism():
    from builder.layout import Layout

    cfg = preset("deepseek-v3.2")
    small = llm_api.activation_bytes(cfg, Layout(tp=8, ep=8), tokens=1024, max_seq_len=4096)
    assert llm_api.activation_bytes(cfg, Layout(tp=8, ep=8), tokens=8192, max_seq_len=4096) > 7 * small
    assert llm_api.activation_bytes(cfg, Layout(tp=8, ep=8), tokens=1024, max_seq_len=4096) \
        < llm_api.activation_bytes(cfg, Layout(tp=8, ep=8, attention_dp=True), tokens=1024, max_seq_len=4096)


@pytest.mark.parametrize("gpu", [None, "h200-sxm", "b200"])
def test_kv_cache_block_size_64_and_block_reuse_explicit_for_v32(gpu):
    rendered = llm_api.render(RunSpec(**V32, tp=8, pp=1, ep=8, gpu=gpu, quant="nvfp4" if gpu == "b200" else "fp8"),
                              preset("deepseek-v3.2"))
    kv = rendered.options["kv_cache_config"]
    assert kv["tokens_per_block"] == 64  # DSA indexer cache / FlashMLA (contract C-DSA-2); default would be 32
    assert kv["enable_block_reuse"] is True  # written, not left to the default (C-DSA-3)
    assert rendered.options["custom_tokenizer"] == "deepseek_v32"


def test_draft_model_block_spelled_for_1_2_1_and_relative_to_the_deploy_directory():
    rendered = llm_api.render(RunSpec(**V32, tp=8, pp=1, ep=8, spec="draft", draft_model="tiny-draft", draft_len=4),
                              preset("deepseek-v3.2"))
    block = rendered.options["speculative_config"]
    assert block["decoding_type"] == "DraftTarget" and block["max_draft_len"] == 4
    assert block["speculative_model"] == "draft-quantized" and not block["speculative_model"].startswith("/")
