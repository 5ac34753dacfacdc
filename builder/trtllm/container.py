"""The container dsbuild's GPU deployments run in, and how dsbuild itself goes into it: the one source that the
README, the GPU-host hand-off of ``dsbuild run``, the rendered Dockerfile and the launch files' messages use
(``tests/unit/test_container_source.py`` holds the README to it).

NVIDIA's Triton image with TensorRT-LLM (its tag is in the pinned version's allow-list data file) already has torch,
transformers and TensorRT-LLM; dsbuild goes in without its dependencies so that those stay the container's own.
The OpenAI-compatible endpoint needs three client/server packages that image lacks.
"""

from __future__ import annotations

from builder.trtllm import PINNED_VERSION
from builder.trtllm.contract import allow_list

CONTAINER_IMAGE: str = allow_list(PINNED_VERSION)["container"]
INSTALL_DSBUILD = "pip install --no-deps <dsbuild checkout>"
INSTALL_OPENAI_DEPS = "pip install 'tritonclient[grpc]' starlette 'uvicorn[standard]'"


def container_text() -> str:
    """One line naming the container and the install step (for messages)."""
    return (f"NVIDIA's Triton container with TensorRT-LLM {PINNED_VERSION} ({CONTAINER_IMAGE}), with dsbuild "
            f"installed there by `{INSTALL_DSBUILD}` (the container keeps its own torch and transformers)")
