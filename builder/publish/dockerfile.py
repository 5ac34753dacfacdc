"""The ``Dockerfile`` that layers a run directory onto NVIDIA's Triton + TensorRT-LLM image.

For teams that ship images rather than artifacts. Rendering is strict: every ``{{ name }}`` placeholder must be
given, every given value must be used, and a value may not carry a newline or a quote that would break the line
it lands on; any of these is a PackageError.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from builder.errors import PackageError
from builder.trtllm import PINNED_VERSION
from builder.trtllm.container import CONTAINER_IMAGE, INSTALL_DSBUILD, INSTALL_OPENAI_DEPS

TENSORRT_LLM_VERSION = PINNED_VERSION
TRITON_IMAGE = CONTAINER_IMAGE
TEMPLATE = Path(__file__).with_name("Dockerfile.tmpl")
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_MULTILINE_OK = {"copy_lines"}


def render_strict(template: str, values: Mapping[str, str], *, name: str) -> str:
    wanted = set(_PLACEHOLDER.findall(template))
    missing = sorted(wanted - set(values))
    if missing:
        raise PackageError(f"{name}: placeholder {{{{ {missing[0]} }}}} has no value")
    unused = sorted(set(values) - wanted)
    if unused:
        raise PackageError(f"{name}: value {unused[0]!r} has no placeholder")
    for key, value in values.items():
        if key not in _MULTILINE_OK and (not isinstance(value, str) or any(c in value for c in '\n\r"\\$`')):
            raise PackageError(f"{name}: value for {key} ({value!r}) is not a single line without quotes or $")
    out = _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
    if "{{" in out or "}}" in out:
        raise PackageError(f"{name}: an unfilled placeholder remains after rendering")
    return out


def dockerfile_values(*, annotations: Mapping[str, str], run_name: str, stage_dirs: list[str]) -> dict[str, str]:
    copies = ["COPY manifest.json ./manifest.json"] + [f"COPY {d}/ ./{d}/" for d in stage_dirs]
    repo = "/opt/dsbuild/package/triton_repo" if "package" in stage_dirs else "/opt/dsbuild/triton_repo"
    return {
        "base_image": TRITON_IMAGE, "trtllm_version": TENSORRT_LLM_VERSION, "run_name": run_name,
        "created": annotations["org.opencontainers.image.created"],
        "model_id": annotations["io.dsbuild.model.id"],
        "model_revision": annotations.get("io.dsbuild.model.revision", "unknown"),
        "quantization": annotations["io.dsbuild.quantization"], "layout": annotations["io.dsbuild.layout"],
        "gpu": annotations["io.dsbuild.gpu"], "dsbuild_version": annotations["io.dsbuild.version"],
        "model_repository": repo, "copy_lines": "\n".join(copies),
        "install_dsbuild": INSTALL_DSBUILD.replace("<dsbuild checkout>", "/opt/dsbuild-src"),
        "install_openai_deps": INSTALL_OPENAI_DEPS,
    }


def render_dockerfile(values: Mapping[str, Any]) -> str:
    return render_strict(TEMPLATE.read_text(encoding="utf-8"), values, name="Dockerfile")
