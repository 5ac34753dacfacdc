"""package stage: the Triton model repository and launch files in ``package/``.

``package/triton_repo/`` (GPU flavour: TensorRT-LLM's llmapi model for NVIDIA's Triton container; CPU flavour: the
reference engine behind the same interface), ``package/launch/`` (``serve.sh``, ``slurm.sbatch``, ``lws.yaml``) and
``package/package.json``. The GPU flavour's ``model.yaml`` is the build's ``engines/llm_api.yaml`` (rendered for
``builder.trtllm.PINNED_VERSION``) with ``model:`` and ``triton_config`` added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

import builder
from builder.check import check_run, require_conformance
from builder.errors import LayoutError, PackageError
from builder.pipeline import Stage, StageContext
from builder.rundir import LLM_API_FILE, PACKAGE, QUANTIZED, RunDir
from builder.specs import RunSpec
from builder.trtllm import PINNED_VERSION
from triton_repo.launch import topology
from triton_repo.package import PackageInputs, relative_engine_dir, write_package
from triton_repo.render import template_dir
from triton_repo.versions import pin

VERSION = "1"


def flavour_of(spec: RunSpec) -> str:
    if spec.flavour != "auto":
        return spec.flavour
    return "gpu" if spec.gpu else "cpu"


def llm_api_config(engines: Path) -> dict[str, Any]:
    path = engines / LLM_API_FILE
    if not path.is_file():
        raise PackageError(f"{path} is missing; rebuild the engines (dsbuild build --force build)")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise PackageError(f"{path} is not a mapping of LLM() arguments")
    return data


def package_inputs(spec: RunSpec, run_dir: Path, engines: Path):
    model_path = spec.model_path or QUANTIZED  # relative to the deploy directory (model.py resolves it)
    llm_api = llm_api_config(engines)
    max_seq_len = _max_positions(engines)

    return PackageInputs(
        flavour=flavour_of(spec), pin=pin(PINNED_VERSION), run_name=run_dir.name, layout=spec.layout,
        nodes=spec.nodes, node_gpus=spec.gpus_per_node, llm_api=llm_api,
        model_path=model_path, replicas=spec.replicas, k8s_kubectl_image=spec.k8s_kubectl_image,
        engine_dir_rel=relative_engine_dir(RunDir(run_dir).package, engines),
        dsbuild_src=str(Path(builder.__file__).resolve().parent.parent),
        engine_max_batch_size=min(spec.concurrency, 64), max_seq_len=max_seq_len, image=spec.image,
        stream_interval=int(llm_api.get("stream_interval", 1)),
        speculative_mode=spec.spec, draft_len=spec.draft_len if spec.spec != "none" else 0,
        slurm_partition=spec.slurm_partition, slurm_account=spec.slurm_account, slurm_time=spec.slurm_time,
        k8s_pvc=spec.k8s_pvc, k8s_namespace=spec.k8s_namespace, openai_port=spec.openai_port,
    )


def _max_positions(engines: Path) -> int:
    import json

    data = json.loads((engines / "config.json").read_text())
    model = data.get("model", data)
    return int(model.get("max_position_embeddings", 0) or 0)


def run(ctx: StageContext) -> dict[str, Any]:
    p = package_inputs(ctx.spec, ctx.run_dir, ctx.inputs["build"])
    info = write_package(p, ctx.out)
    # The whole deployment against the plan and TensorRT-LLM's contract before it is published (dsbuild check).
    report = check_run(ctx.run_dir, package_dir=ctx.out)
    require_conformance(report, log=ctx.log)
    info["check"] = {"ok": True, "checked": report.checked, "notes": report.notes}
    return info


def key_inputs(spec: RunSpec, upstream: dict[str, Any]) -> dict[str, Any]:
    """The templates' content (an edited template re-renders) and, for the CPU flavour, where dsbuild lives."""
    import hashlib

    h = hashlib.sha256()

    root = template_dir(PINNED_VERSION)
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return {"templates": h.hexdigest(), "dsbuild_src": str(Path(builder.__file__).resolve().parent.parent)}


def preflight(spec: RunSpec, stages: tuple[str, ...] = ()) -> None:
    """The GPU flavour's launch files spread the ranks over the nodes: refuse a shape they cannot take up front
    (``triton_repo.launch.topology``, the check rendering them makes)."""
    if flavour_of(spec) == "gpu":
        topology(spec.layout, nodes=spec.nodes, node_gpus=spec.gpus_per_node)


def refusal(spec: RunSpec) -> str | None:
    """:func:`preflight`'s refusal as a sentence, or None."""
    try:
        preflight(spec)
    except LayoutError as exc:
        return str(exc)
    return None


def describe(spec: RunSpec, extra: dict[str, Any]) -> str:
    return f"render the {flavour_of(spec)} Triton repository (TensorRT-LLM {PINNED_VERSION}) and launch files"


STAGE = Stage(name="package", version=VERSION, output=PACKAGE, upstream=("build",), run=run,
              tools=("nvidia-pytriton",), key_inputs=key_inputs, describe=describe, preflight=preflight)
