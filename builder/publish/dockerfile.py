"""The ``Dockerfile`` that layers a run directory onto NVIDIA's Triton + TensorRT-LLM image.

For teams that ship images rather than artifacts. Rendered by the one strict renderer (``builder.render``): every
``@@{name}`` placeholder must be given and every given value used, and a value may not carry a newline, a quote or a
``$`` that would break or re-interpret the line it lands on; any of these is a PackageError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from builder.errors import PackageError
from builder.render import render_text
from builder.trtllm import PINNED_VERSION
from builder.trtllm.container import CONTAINER_IMAGE, INSTALL_DSBUILD, INSTALL_OPENAI_DEPS

TENSORRT_LLM_VERSION = PINNED_VERSION
TRITON_IMAGE = CONTAINER_IMAGE
TEMPLATE = Path(__file__).with_name("Dockerfile.tmpl")
_MULTILINE_OK = {"copy_lines", "command", "flavour_note"}


def render_strict(template: str, values: Mapping[str, str], *, name: str) -> str:
    for key, value in values.items():
        if key not in _MULTILINE_OK and (not isinstance(value, str) or any(c in value for c in '\n\r"\\$`')):
            raise PackageError(f"{name}: value for {key} ({value!r}) is not a single line without quotes or $")
    return render_text(template, values, name=name, exact=True)


DEPLOY_DIR = "/opt/dsbuild"


def dockerfile_values(*, annotations: Mapping[str, str], run_name: str, stage_dirs: list[str],
                      flavour: str | None = None, files: list[str] | None = None) -> dict[str, str]:
    """The values of ``Dockerfile.tmpl``. The image's deploy directory is /opt/dsbuild. A GPU-flavour image copies
    what TensorRT-LLM and the launch files use — never the reference engine's rank shards — and serves through
    ``package/launch/serve.sh``; without the quantized checkpoint (no --include-weights) it must be mounted at
    /opt/dsbuild/quantized."""
    copies = ["COPY manifest.json ./manifest.json"]
    for d in stage_dirs:
        if flavour == "gpu" and files is not None and d == "engines":
            copies += [f"COPY {f} ./{f}" for f in sorted(files) if f.startswith("engines/")]
        else:
            copies.append(f"COPY {d}/ ./{d}/")
    repo = f"{DEPLOY_DIR}/package/triton_repo" if "package" in stage_dirs else f"{DEPLOY_DIR}/triton_repo"
    if flavour == "gpu":
        command = '["bash", "/opt/dsbuild/package/launch/serve.sh"]'
        note = ("# GPU flavour: serve.sh starts this node's replica(s); the checkpoint is "
                + ("in the image (quantized/)." if "quantized" in stage_dirs else
                   "NOT in the image: mount it at /opt/dsbuild/quantized (docker run -v CKPT:/opt/dsbuild/quantized)."))
    else:
        command = f'["tritonserver", "--model-repository={repo}"]'
        note = "# CPU flavour: the reference engine's rank shards are in engines/."
    return {
        "base_image": TRITON_IMAGE, "trtllm_version": TENSORRT_LLM_VERSION, "run_name": run_name,
        "created": annotations["org.opencontainers.image.created"],
        "model_id": annotations["io.dsbuild.model.id"],
        "model_revision": annotations.get("io.dsbuild.model.revision", "unknown"),
        "quantization": annotations["io.dsbuild.quantization"], "layout": annotations["io.dsbuild.layout"],
        "gpu": annotations["io.dsbuild.gpu"], "dsbuild_version": annotations["io.dsbuild.version"],
        "model_repository": repo, "copy_lines": "\n".join(copies), "deploy_dir": DEPLOY_DIR, "command": command,
        "flavour_note": note,
        "install_dsbuild": INSTALL_DSBUILD.replace("<dsbuild checkout>", "/opt/dsbuild-src"),
        "install_openai_deps": INSTALL_OPENAI_DEPS,
    }


def render_dockerfile(values: Mapping[str, Any]) -> str:
    return render_strict(TEMPLATE.read_text(encoding="utf-8"), values, name="Dockerfile")
