"""TensorRT-LLM versions dsbuild renders Triton repositories for. The version itself and its container come from
``builder.trtllm`` (``PINNED_VERSION`` and the version's allow-list data file); this adds what only the Triton
model needs to know about a release."""

from __future__ import annotations

from dataclasses import dataclass

from builder.errors import PackageError
from builder.trtllm.contract import allow_list


@dataclass(frozen=True)
class TrtllmPin:
    version: str
    commit: str  # NVIDIA/TensorRT-LLM commit of the release tag (docs/tensorrt-llm-contract.md#C-PIN-1)
    triton_image: str  # NVIDIA's Triton container that ships this TensorRT-LLM
    # Known defects of the release's own Triton model that dsbuild's model.py avoids.
    notes: tuple[str, ...] = ()


_RELEASES = {
    "1.2.1": dict(commit="376f7e1bd8ed543f75014309e3fd4b237e9b0e73", notes=(
        "the release's llmapi model.py passes `streaming` positionally into generate_async's lora_request slot; "
        "dsbuild's model.py passes it by keyword",)),
}


def pin(version: str) -> TrtllmPin:
    if version not in _RELEASES:
        raise PackageError(f"no Triton templates for TensorRT-LLM {version}; pinned: {', '.join(sorted(_RELEASES))}")
    return TrtllmPin(version=version, triton_image=allow_list(version)["container"], **_RELEASES[version])


def pinned_versions() -> list[str]:
    return sorted(_RELEASES)
