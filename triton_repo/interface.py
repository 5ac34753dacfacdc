"""The tensor interface of the ``tensorrt_llm`` model, shared by both flavours (TensorRT-LLM 1.2.x ``llmapi``:
``triton_backend/all_models/llmapi/tensorrt_llm/config.pbtxt``; docs/tensorrt-llm-contract.md#C-TRITON-7), plus two
token-count outputs. Clients written for NVIDIA's model work unchanged against either flavour."""

from __future__ import annotations

from dataclasses import dataclass

MODEL_NAME = "tensorrt_llm"


@dataclass(frozen=True)
class TensorDef:
    name: str
    dtype: str  # Triton TYPE_* without the prefix
    dims: tuple[int, ...]
    optional: bool = False


INPUTS: tuple[TensorDef, ...] = (
    TensorDef("text_input", "STRING", (-1,)),
    TensorDef("streaming", "BOOL", (1,), True),
    TensorDef("sampling_param_best_of", "INT32", (1,), True),
    TensorDef("sampling_param_temperature", "FP32", (1,), True),
    TensorDef("sampling_param_top_k", "INT32", (1,), True),
    TensorDef("sampling_param_top_p", "FP32", (1,), True),
    TensorDef("sampling_param_frequency_penalty", "FP32", (1,), True),
    TensorDef("sampling_param_presence_penalty", "FP32", (1,), True),
    TensorDef("sampling_param_max_tokens", "INT32", (1,), True),
    TensorDef("sampling_param_stop", "STRING", (-1,), True),
    TensorDef("sampling_param_seed", "UINT64", (1,), True),
    TensorDef("sampling_param_exclude_input_from_output", "BOOL", (1,), True),
    TensorDef("sampling_param_return_perf_metrics", "BOOL", (1,), True),
    TensorDef("return_finish_reason", "BOOL", (1,), True),
    TensorDef("return_stop_reason", "BOOL", (1,), True),
    TensorDef("return_cumulative_logprob", "BOOL", (1,), True),
    TensorDef("stop", "BOOL", (1,), True),
)

OUTPUTS: tuple[TensorDef, ...] = (
    TensorDef("text_output", "STRING", (-1,)),
    TensorDef("finish_reason", "STRING", (-1,)),
    TensorDef("stop_reason", "STRING", (-1,)),
    TensorDef("cumulative_logprob", "FP32", (-1,)),
    TensorDef("kv_cache_reused_block", "INT32", (-1,)),
    TensorDef("kv_cache_missed_block", "INT32", (-1,)),
    TensorDef("kv_cache_alloc_new_blocks", "INT32", (-1,)),
    TensorDef("kv_cache_alloc_total_blocks", "INT32", (-1,)),
    TensorDef("kv_cache_hit_rate", "FP32", (-1,)),
    TensorDef("arrival_time_ns", "INT64", (1,)),
    TensorDef("first_scheduled_time_ns", "INT64", (1,)),
    TensorDef("first_token_time_ns", "INT64", (1,)),
    TensorDef("last_token_time_ns", "INT64", (1,)),
    TensorDef("acceptance_rate", "FP32", (1,)),
    TensorDef("total_accepted_draft_tokens", "INT32", (1,)),
    TensorDef("total_draft_tokens", "INT32", (1,)),
    # dsbuild's additions (both flavours' model.py fill them): prompt and generated token counts, named as Triton's
    # OpenAI frontend reads them for `usage` (docs/serving-openai.md).
    TensorDef("num_input_tokens", "INT32", (1,)),
    TensorDef("num_output_tokens", "INT32", (1,)),
)


def _block(kind: str, tensors: tuple[TensorDef, ...]) -> str:
    items = []
    for t in tensors:
        dims = ", ".join(str(d) for d in t.dims)
        lines = [f'    name: "{t.name}"', f"    data_type: TYPE_{t.dtype}", f"    dims: [ {dims} ]"]
        if t.optional:
            lines.append("    optional: true")
        items.append("  {\n" + "\n".join(lines) + "\n  }")
    return f"{kind} [\n" + ",\n".join(items) + "\n]"


def pbtxt_inputs() -> str:
    return _block("input", INPUTS)


def pbtxt_outputs() -> str:
    return _block("output", OUTPUTS)
