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
    assert sizes == sorted(set(sizes)) and o["cuda_graph_config"]["max_batch_size"] == max(sizes) == o["max_batch_size"]
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
    ({"speculative_config": {"decoding_type": "DraftTarget", "max_draft_len": 3}}, "decoding_type: must be one of"),
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
    draft = {"speculative_config": {"decoding_type": "Draft_Target", "max_draft_len": 3, "speculative_model": "/m"}}
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
