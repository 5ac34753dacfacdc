"""``engines/llm_api.yaml``: the TensorRT-LLM LLM-API options for the cluster, for the pinned TensorRT-LLM
(``builder.trtllm.PINNED_VERSION``), from the run spec (layout, quantization, workload) and the model config.

The same file serves ``trtllm-serve --extra_llm_api_options`` (run from the run directory: its relative paths are
relative to it) and Triton's ``llmapi`` ``model.yaml``. Every choice follows a fact of docs/tensorrt-llm-contract.md:
- ``max_batch_size``: the target concurrency (per attention-DP rank when attention-DP splits requests).
- ``max_seq_len``: isl + osl (+ draft tokens), capped at the model's ``max_position_embeddings``.
- ``max_num_tokens`` / ``enable_chunked_prefill`` (C-LLM-1): without chunked prefill TensorRT-LLM refuses a prompt
  longer than ``max_num_tokens``, so it is at least ``max_seq_len`` (every prompt the configured length admits is
  served) and at least one mean prompt plus a decode step of the whole batch; with ``--chunked-prefill`` it is that
  per-iteration budget only. Either way its activation-memory cost is estimated (``activation_bytes``) and reported.
- ``cuda_graph_config``: ``batch_sizes`` only (C-LLMARGS-5: with ``max_batch_size`` too they must equal TensorRT-LLM's
  own list): 1, 2, 4, 8, every multiple of 8 up to 64, powers of two beyond, up to ``max_batch_size``.
- ``moe_config.backend`` (C-LLMARGS-6, C-MOE-4): always written, never AUTO; it decides which FP8 linears TensorRT-LLM
  excludes from quantization (C-MCFG-3, ``fp8_excludes``).
- ``kv_cache_config``: ``dtype`` fp8|auto (C-LLMARGS-4), ``tokens_per_block: 64`` (C-DSA-2), ``enable_block_reuse``
  written explicitly (C-DSA-3).
- ``pp_partition``: the layers of each PP stage (leading stages take the remainder), as the engine bundle uses.
- ``sparse_attention_config`` is left out: TensorRT-LLM sets DSA for ``model_type: deepseek_v32`` itself (C-MCFG-0).
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

BLACKWELL = ("b100", "b200", "b300", "gb200", "gb300")
PP_WARNING = ("pipeline_parallel_size > 1: every published DeepSeek recipe for TensorRT-LLM uses PP=1; PP for "
              "DeepSeek on the PyTorch backend (and PP together with MTP) is not verified upstream")
TOKENS_PER_BLOCK = 64  # DeepSeek-V3.2's indexer cache and FlashMLA need 64; valid for every path (C-DSA-2)
BLOCK_REUSE = True  # supported for DeepSeek-V3.2 at 1.2.1 (C-DSA-3); KvCacheConfig's default too
# What TensorRT-LLM leaves unquantized in DeepSeek's FP8 checkpoint, per MoE backend (C-MCFG-3).
FP8_EXCLUDES_TRTLLM = ["*kv_b_proj*", "*k_b_proj*", "*eh_proj"]
FP8_EXCLUDES_OTHER = ["*eh_proj"]
INDEXER_MAX_CHUNK = 32768  # DSA's indexer_max_chunk_size default (C-DSA-5)
ACTIVATION_BYTES = 2  # BF16 activations


@dataclass
class LlmApiConfig:
    options: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    version: str = PINNED_VERSION

    def to_yaml(self) -> str:
        head = [f"# TensorRT-LLM {self.version} LLM-API options (PyTorch backend), written by dsbuild.",
                "# Use with: trtllm-serve <checkpoint> --extra_llm_api_options llm_api.yaml (run from the run directory:",
                "# relative paths here are relative to it). Facts: docs/tensorrt-llm-contract.md."]
        head += [f"# {line}" for line in info_lines(self.info)]
        head += [f"# WARNING: {w}" for w in self.warnings]
        return "\n".join(head) + "\n" + yaml.safe_dump(self.options, sort_keys=False)


def info_lines(info: dict[str, Any]) -> list[str]:
    """The decisions a reader of the file (and of the plan) needs, one line each."""
    if not info:
        return []
    return [f"MoE backend {info['moe_backend']}: kv_b_proj {info['kv_b_proj']}",
            f"max_num_tokens {info['max_num_tokens']} ({'chunked prefill' if info['chunked_prefill'] else 'no chunked prefill'}"
            f"): prompts up to {info['max_prompt_tokens']} tokens are admitted; activations ~"
            f"{info['activation_bytes'] / 2**30:.2f} GiB per GPU at that many tokens (estimate)"]


def cuda_graph_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = {1, 2, 4, 8, max_batch_size}
    sizes.update(range(16, min(64, max_batch_size) + 1, 8))
    p = 128
    while p < max_batch_size:
        sizes.add(p)
        p *= 2
    return sorted(s for s in sizes if s <= max_batch_size)


def is_blackwell(gpu: str | None) -> bool:
    return bool(gpu) and gpu.lower().startswith(BLACKWELL)


def max_num_tokens_for(*, isl: int, max_batch_size: int, draft_len: int, max_seq_len: int | None = None,
                       chunked_prefill: bool = True) -> int:
    """Room for one mean prompt plus a decode step of the whole batch (each with its draft tokens), in 64s; without
    chunked prefill at least ``max_seq_len``: TensorRT-LLM refuses every prompt longer than max_num_tokens then
    (docs/tensorrt-llm-contract.md#C-LLM-1)."""
    step = isl + max_batch_size * (1 + draft_len)
    if not chunked_prefill and max_seq_len is not None:
        step = max(step, max_seq_len)
    return 64 * math.ceil(step / 64)


def moe_backend(*, gpu: str | None, quant: str, layout: Layout) -> str:
    """The MoE backend for the build (C-MOE-4's support matrix; CUTLASS, the 1.2.1 default, when no GPU is named)."""
    if is_blackwell(gpu) and layout.ep > 8:
        return "WIDEEP"
    if is_blackwell(gpu) and quant == "fp8":
        return "DEEPGEMM"
    if quant == "nvfp4":
        return "TRTLLM"
    return "CUTLASS"


def fp8_excludes(backend: str) -> list[str]:
    """The modules TensorRT-LLM keeps unquantized when it loads DeepSeek's block-FP8 checkpoint with ``backend``."""
    return list(FP8_EXCLUDES_TRTLLM if backend == "TRTLLM" else FP8_EXCLUDES_OTHER)


def activation_bytes(cfg: ModelConfig, layout: Layout, *, tokens: int, max_seq_len: int) -> int:
    """Estimated peak activation memory of one forward of ``tokens`` tokens on one GPU (dsbuild's estimate, not
    TensorRT-LLM's allocator): per token, in BF16, the residual stream and its norm (3 x hidden), the attention
    projections of the rank's heads (q, q in latent space, output), the routed copies of the token that land on the
    rank (top-k / EP of them, each with its gate+up intermediate and hidden-size input) or the dense MLP's
    intermediate, whichever is larger; plus, for DSA, one chunk of the indexer's float32 logits (tokens x keys)."""
    tp_attn = 1 if layout.attention_dp else layout.tp
    heads = max(1, cfg.num_attention_heads // tp_attn)
    attn = heads * (cfg.qk_head_dim + cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.v_head_dim)
    routed = cfg.num_experts_per_tok / layout.ep * (2 * cfg.moe_intermediate_size / layout.moe_tp + cfg.hidden_size)
    dense = 2 * cfg.intermediate_size / (1 if layout.attention_dp else layout.tp)
    per_token = 3 * cfg.hidden_size + attn + max(routed, dense)
    total = tokens * per_token * ACTIVATION_BYTES
    if cfg.has_indexer:
        total += min(tokens, INDEXER_MAX_CHUNK) * max_seq_len * 4 + tokens * cfg.index_n_heads * 4
    return int(total)


def plan_info(spec, cfg: ModelConfig, layout: Layout | None = None) -> dict[str, Any]:
    """What the plan reports about the TensorRT-LLM configuration ``spec`` builds (for ``layout`` when given): the MoE
    backend and its kv_b_proj handling, max_num_tokens and its activation-memory cost, and the warnings."""
    if layout is not None:
        spec = spec.model_copy(update={"tp": layout.tp, "pp": layout.pp, "ep": layout.ep,
                                       "attention_dp": layout.attention_dp})
    rendered = render(spec, cfg)
    return {**rendered.info, "layout": spec.layout.name, "lines": info_lines(rendered.info),
            "warnings": rendered.warnings}


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
    max_tokens = max_num_tokens_for(isl=spec.isl, max_batch_size=max_batch, draft_len=draft, max_seq_len=max_seq,
                                    chunked_prefill=bool(spec.chunked_prefill))
    backend = moe_backend(gpu=spec.gpu, quant=spec.quant, layout=layout)
    options: dict[str, Any] = {
        "tensor_parallel_size": layout.tp,
        "pipeline_parallel_size": layout.pp,
        "moe_expert_parallel_size": layout.ep,
        "moe_tensor_parallel_size": layout.moe_tp,
        "enable_attention_dp": layout.attention_dp,
        "max_batch_size": max_batch,
        "max_num_tokens": max_tokens,
        "max_seq_len": max_seq,
        "enable_chunked_prefill": bool(spec.chunked_prefill),
        "trust_remote_code": spec.trust_remote_code,  # --trust-remote-code; off by default
        "kv_cache_config": {
            "dtype": "fp8" if spec.kv_cache_dtype == "fp8" else "auto",
            "free_gpu_memory_fraction": float(spec.kv_cache_free_fraction),
            "enable_block_reuse": BLOCK_REUSE,
            "tokens_per_block": TOKENS_PER_BLOCK,
        },
        "cuda_graph_config": {"enable_padding": True, "batch_sizes": cuda_graph_batch_sizes(max_batch)},
        "moe_config": {"backend": backend},
    }
    if cfg.model_type == "deepseek_v32":
        options["custom_tokenizer"] = "deepseek_v32"
    if layout.pp > 1:
        options["pp_partition"] = [len(s) for s in layout.stage_layers(cfg.num_hidden_layers)]
        warnings.append(PP_WARNING)
    if spec_block:
        options["speculative_config"] = spec_block
    if spec.stream_interval != 1:  # 1 is TensorRT-LLM's default: left out, as the goldens are
        options["stream_interval"] = spec.stream_interval
    require_conforming(options, version=PINNED_VERSION)
    info = {
        "moe_backend": backend,
        "kv_b_proj": ("excluded from FP8, dequantized to BF16 at load" if "*kv_b_proj*" in fp8_excludes(backend)
                      else "FP8 (block-scaled BMM)"),
        "fp8_exclude_modules": fp8_excludes(backend),
        "max_num_tokens": max_tokens,
        "chunked_prefill": bool(spec.chunked_prefill),
        "max_prompt_tokens": max_seq - 1 if spec.chunked_prefill else min(max_tokens, max_seq - 1),
        "activation_bytes": activation_bytes(cfg, layout, tokens=max_tokens, max_seq_len=max_seq),
    }
    return LlmApiConfig(options, warnings, info)
