"""``engines/llm_api.yaml``: the TensorRT-LLM LLM-API options for the cluster, for the pinned TensorRT-LLM
(``builder.trtllm.PINNED_VERSION``), from the run spec (layout, quantization, workload) and the model config.

The same file serves ``trtllm-serve --extra_llm_api_options`` and Triton's ``llmapi`` ``model.yaml``. Choices:
- ``max_batch_size``: the target concurrency (per attention-DP rank when attention-DP splits requests).
- ``max_seq_len``: isl + osl (+ draft tokens), capped at the model's ``max_position_embeddings``.
- ``max_num_tokens``: room for one full prompt plus a decode step of the whole batch (each with its draft tokens)
  per iteration, rounded up to 64 -- so a context request never has to be chunked behind a full decode batch.
- ``cuda_graph_config``: padded graphs for 1, 2, 4, 8, then every multiple of 8 up to 64 and powers of two beyond,
  up to and including ``max_batch_size`` (sorted, de-duplicated); ``max_batch_size`` = the largest.
- ``moe_config.backend``: DEEPGEMM for block FP8 on Blackwell, TRTLLM for NVFP4 (Blackwell), WIDEEP for large
  attention-DP expert parallelism (EP >= 16), CUTLASS otherwise on a GPU (Hopper block FP8, W4AFP8, BF16); AUTO
  when no GPU is named.
- ``kv_cache_config.dtype``: ``fp8`` for an FP8 KV cache, else ``auto`` (the model's dtype).
- ``pp_partition``: the layers of each PP stage (leading stages take the remainder), as the engine bundle uses.
- ``sparse_attention_config`` is left out: for ``model_type: deepseek_v32`` TensorRT-LLM fills DSA from the
  checkpoint (FACTS §2b).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from builder.layout import Layout
from builder.model.config import ModelConfig
from builder.trtllm import PINNED_VERSION
from builder.trtllm.contract import require_conforming
from builder.trtllm.speculative import speculative_config

BLACKWELL = ("b200", "b300", "gb200", "gb300")
PP_WARNING = ("pipeline_parallel_size > 1: every published DeepSeek recipe for TensorRT-LLM uses PP=1; PP for "
              "DeepSeek on the PyTorch backend (and PP together with MTP) is not verified upstream")


@dataclass
class LlmApiConfig:
    options: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    version: str = PINNED_VERSION

    def to_yaml(self) -> str:
        head = [f"# TensorRT-LLM {self.version} LLM-API options (PyTorch backend), written by dsbuild.",
                "# Use with: trtllm-serve <checkpoint> --extra_llm_api_options llm_api.yaml"]
        head += [f"# WARNING: {w}" for w in self.warnings]
        return "\n".join(head) + "\n" + yaml.safe_dump(self.options, sort_keys=False)


def cuda_graph_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = {1, 2, 4, 8, max_batch_size}
    sizes.update(range(16, min(64, max_batch_size) + 1, 8))
    p = 128
    while p < max_batch_size:
        sizes.add(p)
        p *= 2
    return sorted(s for s in sizes if s <= max_batch_size)


def max_num_tokens_for(*, isl: int, max_batch_size: int, draft_len: int) -> int:
    """Room for one full prompt plus a decode step of the whole batch (each with its draft tokens), in 64s."""
    return 64 * math.ceil((isl + max_batch_size * (1 + draft_len)) / 64)


def moe_backend(*, gpu: str | None, quant: str, layout: Layout) -> str:
    if not gpu:
        return "AUTO"
    blackwell = gpu.startswith(BLACKWELL)
    if quant == "nvfp4":
        return "TRTLLM"
    if layout.attention_dp and layout.ep >= 16:
        return "WIDEEP"
    if quant in ("fp8",) and blackwell:
        return "DEEPGEMM"
    return "CUTLASS"


def render(spec, cfg: ModelConfig) -> LlmApiConfig:
    """The LLM-API options for ``spec`` (a RunSpec) and ``cfg``; checked against the version's allow-list."""
    warnings: list[str] = []
    layout = spec.layout
    max_batch = max(1, math.ceil(spec.concurrency / layout.attention_dp_ranks))
    spec_block = speculative_config(spec, cfg)
    draft = int(spec_block.get("max_draft_len") or spec_block.get("num_nextn_predict_layers") or 0) if spec_block else 0
    max_seq = min(spec.isl + spec.osl + draft, cfg.max_position_embeddings)
    if spec.isl + spec.osl + draft > cfg.max_position_embeddings:
        warnings.append(f"isl + osl = {spec.isl + spec.osl} exceeds the model's {cfg.max_position_embeddings} "
                        "positions; max_seq_len is capped there")
    max_tokens = max_num_tokens_for(isl=spec.isl, max_batch_size=max_batch, draft_len=draft)
    options: dict[str, Any] = {
        "tensor_parallel_size": layout.tp,
        "pipeline_parallel_size": layout.pp,
        "moe_expert_parallel_size": layout.ep,
        "moe_tensor_parallel_size": layout.moe_tp,
        "enable_attention_dp": layout.attention_dp,
        "max_batch_size": max_batch,
        "max_num_tokens": max_tokens,
        "max_seq_len": max_seq,
        "trust_remote_code": spec.trust_remote_code,  # --trust-remote-code; off by default
        "kv_cache_config": {
            "dtype": "fp8" if spec.kv_cache_dtype == "fp8" else "auto",
            "free_gpu_memory_fraction": float(spec.kv_cache_free_fraction),
            "enable_block_reuse": True,
        },
        "cuda_graph_config": {"enable_padding": True, "batch_sizes": cuda_graph_batch_sizes(max_batch),
                              "max_batch_size": max_batch},
        "moe_config": {"backend": moe_backend(gpu=spec.gpu, quant=spec.quant, layout=layout)},
    }
    if cfg.model_type == "deepseek_v32":
        options["custom_tokenizer"] = "deepseek_v32"
    if layout.pp > 1:
        options["pp_partition"] = [len(s) for s in layout.stage_layers(cfg.num_hidden_layers)]
        warnings.append(PP_WARNING)
    if spec_block:
        options["speculative_config"] = spec_block
    require_conforming(options, version=PINNED_VERSION)
    return LlmApiConfig(options, warnings)
