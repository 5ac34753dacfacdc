"""TensorRT-LLM versions dsbuild renders for, with the matching Triton container (FACTS §2b)."""

from __future__ import annotations

from dataclasses import dataclass

from builder.errors import PackageError


@dataclass(frozen=True)
class TrtllmPin:
    version: str
    commit: str  # NVIDIA/TensorRT-LLM commit of the release tag
    triton_image: str  # NVIDIA's Triton container that ships this TensorRT-LLM
    # Known defects of the release's own Triton model that our model.py avoids.
    notes: tuple[str, ...] = ()


PINS: dict[str, TrtllmPin] = {
    "1.2.1": TrtllmPin(
        version="1.2.1", commit="376f7e1bd8", triton_image="nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3",
        notes=("the release's llmapi model.py passes `streaming` positionally into generate_async's lora_request "
               "slot; dsbuild's model.py passes it by keyword",),
    ),
}
DEFAULT_TRTLLM = "1.2.1"


def pin(version: str) -> TrtllmPin:
    if version not in PINS:
        raise PackageError(f"TensorRT-LLM {version} is not pinned; choose one of {', '.join(sorted(PINS))}")
    return PINS[version]
