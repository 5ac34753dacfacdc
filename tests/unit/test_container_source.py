"""One source for the serving container and dsbuild's install step in it (issue 21 item 10): the README, the docs,
the GPU-host hand-off, the Dockerfile and the launch files' messages all say the same."""

from __future__ import annotations

import re

from builder.hostfit import HostFit, gpu_host_instructions, instructions_text
from builder.publish.dockerfile import dockerfile_values, render_dockerfile
from builder.specs import resolve_spec
from builder.trtllm.container import CONTAINER_IMAGE, INSTALL_DSBUILD, INSTALL_OPENAI_DEPS
from tests.conftest import REPO
from triton_repo.launch import OPENAI_MISSING

IMAGE = re.compile(r"nvcr\.io/[a-z0-9./_-]+(?::[A-Za-z0-9._-]+)?")


def test_every_image_named_in_the_project_is_the_one_container():
    texts = [REPO / "README.md", *(REPO / "docs").glob("*.md"),
             *(p for pkg in ("builder", "triton_repo", "quantize") for p in (REPO / pkg).rglob("*")
               if p.suffix in (".py", ".tmpl", ".yaml", ".sh") and "__pycache__" not in p.parts)]
    found = {(str(p.relative_to(REPO)), m) for p in texts for m in IMAGE.findall(p.read_text(encoding="utf-8"))}
    assert found, "the walk found no image name"
    assert {m for _, m in found} == {CONTAINER_IMAGE}, sorted(found)


def test_readme_and_docs_use_the_install_steps():
    readme = (REPO / "README.md").read_text()
    for text in (readme, (REPO / "docs" / "serving-openai.md").read_text()):
        steps = set(re.findall(r"pip install --no-deps [^`\s)]+(?: [^`\s)]+)?", text))
        assert steps == {INSTALL_DSBUILD}, steps
    assert INSTALL_OPENAI_DEPS in readme


def test_gpu_host_hand_off_dockerfile_and_launch_messages_use_them(tmp_path):
    spec = resolve_spec(cli={"model": "deepseek-ai/DeepSeek-V3.2", "gpu": "h200-sxm", "out": tmp_path / "run"},
                        environ={})
    fit = HostFit(deferred=("quantize", "build", "package"), checkpoint_bytes=10**12, limit_bytes=10**10, cores=2,
                  ram_bytes=10**10, gpu=False)
    info = gpu_host_instructions(spec, fit, commit="abc")
    text = instructions_text(info)
    assert CONTAINER_IMAGE in text and INSTALL_DSBUILD in text
    assert (info["container"], info["install"]) == (CONTAINER_IMAGE, INSTALL_DSBUILD)
    docker = render_dockerfile(dockerfile_values(
        annotations={"org.opencontainers.image.created": "2026-01-01T00:00:00Z", "io.dsbuild.model.id": "m",
                     "io.dsbuild.quantization": "fp8", "io.dsbuild.layout": "tp8pp1ep8", "io.dsbuild.gpu": "h200-sxm",
                     "io.dsbuild.version": "0"}, run_name="r", stage_dirs=["engines", "package"]))
    assert docker.splitlines()[5] == f"FROM {CONTAINER_IMAGE}"
    assert "pip install --no-deps /opt/dsbuild-src" in docker and INSTALL_OPENAI_DEPS in docker
    assert INSTALL_DSBUILD in OPENAI_MISSING and INSTALL_OPENAI_DEPS in OPENAI_MISSING
