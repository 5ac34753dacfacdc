"""Validation by TensorRT-LLM itself: the only module that imports ``tensorrt_llm`` (optional, GPU hosts only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from builder.errors import PackageError


def trtllm_version() -> str | None:
    try:
        import tensorrt_llm  # noqa: F401  (NVIDIA's containers only; never installable here)
    except Exception:
        return None
    return getattr(tensorrt_llm, "__version__", "unknown")


def validate_with_trtllm(options: dict[str, Any], *, model_dir: str | Path) -> str | None:
    """Construct ``TorchLlmArgs`` the way ``trtllm-serve`` and the llmapi Triton model do (nested blocks through
    ``update_llm_args_with_extra_dict``, docs/tensorrt-llm-contract.md#C-LLMARGS-9); returns the TensorRT-LLM version
    used, or None when ``tensorrt_llm`` is not importable. Raises PackageError with TensorRT-LLM's own message."""
    version = trtllm_version()
    if version is None:
        return None
    from tensorrt_llm.llmapi.llm_args import TorchLlmArgs
    from tensorrt_llm.llmapi.llm_utils import update_llm_args_with_extra_dict

    try:
        TorchLlmArgs(**update_llm_args_with_extra_dict({"model": str(model_dir)}, dict(options)))
    except Exception as exc:  # pydantic ValidationError and TensorRT-LLM's own checks
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PackageError(f"TensorRT-LLM {version} rejects llm_api.yaml: {first}") from None
    return version
