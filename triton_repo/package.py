"""Render a run's Triton model repository and launch files (the ``package`` stage's work).

GPU flavour: TensorRT-LLM's ``llmapi`` layout for NVIDIA's Triton container — ``tensorrt_llm/config.pbtxt``
(python backend), ``1/model.py`` (dsbuild's, see its docstring) and ``1/model.yaml`` = the build's LLM-API
configuration with ``model:`` pointing at the quantized checkpoint on the cluster, plus ``triton_config``.
CPU flavour: the same model name and tensor interface, served by dsbuild's reference engine over the rank shards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from builder.errors import PackageError
from builder.layout import Layout
from builder.safeio import dumps_json
from builder.trtllm.contract import require_conforming
from triton_repo import interface, launch
from triton_repo.render import render_text, render_tree, template_dir
from triton_repo.versions import TrtllmPin

# Triton's own batching stays off (as in TensorRT-LLM's llmapi model.yaml): the LLM API batches in flight.
TRITON_CONFIG = {"max_batch_size": 0, "decoupled": True}


@dataclass(frozen=True)
class PackageInputs:
    """Everything the rendered files depend on (and nothing else: golden tests build one of these)."""

    flavour: str  # "gpu" | "cpu"
    pin: TrtllmPin
    run_name: str
    layout: Layout
    nodes: int
    node_gpus: int | None
    llm_api: dict[str, Any]  # LLM() arguments (GPU flavour)
    deploy_dir: str  # the run directory's path on the cluster
    model_path: str  # the quantized checkpoint's path on the cluster
    engine_dir_rel: str = "../../../engines"  # CPU: from package/triton_repo/tensorrt_llm to the run's engines/
    dsbuild_src: str = ""  # CPU: directory holding the ``builder`` package (empty: installed dsbuild)
    engine_max_batch_size: int = 16
    batch_window_ms: float = 5.0
    max_seq_len: int = 0
    # CPU: speculative decoding in the reference engine, as the build configured it for TensorRT-LLM.
    speculative_mode: str = "none"  # none | mtp | draft
    draft_len: int = 0
    image: str | None = None
    slurm_partition: str | None = None
    slurm_account: str | None = None
    slurm_time: str = "04:00:00"
    k8s_pvc: str = "dsbuild-run"
    k8s_namespace: str | None = None
    openai_port: int | None = None  # GPU launch files: start dsbuild's OpenAI-compatible endpoint on this port
    dsbuild_version: str = field(default_factory=lambda: __import__("builder").__version__)

    @property
    def triton_image(self) -> str:
        return self.image or self.pin.triton_image


def common_values(p: PackageInputs, topo: launch.Topology | None) -> dict[str, Any]:
    return {
        "dsbuild_version": p.dsbuild_version, "trtllm_version": p.pin.version, "triton_image": p.triton_image,
        "run_name": p.run_name, "layout": p.layout.name, "model_name": interface.MODEL_NAME,
        "inputs": interface.pbtxt_inputs(), "outputs": interface.pbtxt_outputs(),
        "world_size": p.layout.world_size, "deploy_dir": p.deploy_dir, "model_path": p.model_path,
        "nodes": topo.nodes if topo else p.nodes, "gpus_per_node": topo.gpus_per_node if topo else 0,
    }


def model_yaml(p: PackageInputs) -> str:
    config = {"model": p.model_path}
    config.update((k, v) for k, v in p.llm_api.items() if k not in ("model", "triton_config"))
    require_conforming(config, version=p.pin.version)  # every LLM() key known to the pinned TensorRT-LLM
    config["triton_config"] = dict(TRITON_CONFIG)
    header = (f"# dsbuild {p.dsbuild_version}: LLM() arguments for TensorRT-LLM {p.pin.version} (run {p.run_name}),\n"
              "# read by model.py; triton_config sets the model's max_batch_size and decoupled policy.\n")
    return header + yaml.safe_dump(config, sort_keys=False, width=120)


def render_repository(p: PackageInputs, out: Path) -> list[Path]:
    """Write ``out/tensorrt_llm/...`` for ``p.flavour``."""
    if p.flavour not in ("gpu", "cpu"):
        raise PackageError(f"unknown repository flavour {p.flavour!r}; choose gpu or cpu")
    topo = launch.topology(p.layout, nodes=p.nodes, node_gpus=p.node_gpus) if p.flavour == "gpu" else None
    values = common_values(p, topo)
    if p.flavour == "cpu":
        values.update(engine_dir=p.engine_dir_rel, dsbuild_src=p.dsbuild_src,
                      engine_max_batch_size=p.engine_max_batch_size, batch_window_ms=p.batch_window_ms,
                      max_seq_len=p.max_seq_len, threads_per_rank=0, speculative_mode=p.speculative_mode,
                      draft_len=p.draft_len, draft_engine_dir=f"{p.engine_dir_rel}/draft")
    written = render_tree(template_dir(p.pin.version) / p.flavour, out, values)
    if p.flavour == "gpu":
        target = out / interface.MODEL_NAME / "1" / "model.yaml"
        target.write_text(model_yaml(p), encoding="utf-8")
        written.append(target)
    return written


def render_launch(p: PackageInputs, out: Path) -> list[Path]:
    """Write the launch files for ``p`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tdir = template_dir(p.pin.version) / "launch"
    written = []

    def emit(template: str, name: str, values: dict[str, Any]) -> None:
        target = out / name
        target.write_text(render_text((tdir / template).read_text(encoding="utf-8"), values, name=template),
                          encoding="utf-8")
        target.chmod(0o755)
        written.append(target)

    if p.flavour == "cpu":
        emit("serve-cpu.sh.tmpl", "serve.sh", common_values(p, None))
        return written
    topo = launch.topology(p.layout, nodes=p.nodes, node_gpus=p.node_gpus)
    values = common_values(p, topo)
    values.update(openai_port=p.openai_port or "", openai_missing=launch.OPENAI_MISSING,
                  openai_command=launch.openai_command(repo='"$REPO"', port='"$OPENAI_PORT"',
                                                       triton_url='"$1:$GRPC_PORT"'))
    emit("serve.sh.tmpl", "serve.sh", values)
    emit("slurm.sbatch.tmpl", "slurm.sbatch", {**values, "slurm_time": p.slurm_time,
                                               "slurm_extra": launch.slurm_extra(partition=p.slurm_partition,
                                                                                 account=p.slurm_account)})
    docs = launch.lws_manifests(run_name=p.run_name, topo=topo, image=p.triton_image, deploy_dir=p.deploy_dir,
                                model_path=p.model_path, pvc=p.k8s_pvc, namespace=p.k8s_namespace,
                                openai_port=p.openai_port)
    header = (f"dsbuild {p.dsbuild_version}: LeaderWorkerSet for run {p.run_name} (layout {p.layout.name}): "
              f"{topo.nodes} pod(s) x {topo.gpus_per_node} GPU(s).\n"
              f"Needs the LeaderWorkerSet controller and a ReadWriteMany PVC {p.k8s_pvc!r} holding the run "
              f"directory, mounted at {p.deploy_dir}.")
    target = out / "lws.yaml"
    target.write_text(launch.dump_manifests(docs, header), encoding="utf-8")
    written.append(target)
    return written


def describe(p: PackageInputs) -> dict[str, Any]:
    info: dict[str, Any] = {"flavour": p.flavour, "trtllm_version": p.pin.version, "model": interface.MODEL_NAME,
                            "world_size": p.layout.world_size}
    if p.flavour == "gpu":
        topo = launch.topology(p.layout, nodes=p.nodes, node_gpus=p.node_gpus)
        info.update(image=p.triton_image, nodes=topo.nodes, gpus_per_node=topo.gpus_per_node,
                    total_gpus=topo.total_gpus, model_path=p.model_path, deploy_dir=p.deploy_dir,
                    notes=list(p.pin.notes))
    return info


def write_package(p: PackageInputs, out: Path) -> dict[str, Any]:
    """The whole ``package/`` directory: ``triton_repo/``, ``launch/`` and ``package.json``."""
    render_repository(p, out / "triton_repo")
    render_launch(p, out / "launch")
    info = describe(p)
    (out / "package.json").write_text(dumps_json(info) + "\n", encoding="utf-8")
    return info


def relative_engine_dir(package_dir: Path, engines_dir: Path) -> str:
    """``engines/`` as seen from ``package/triton_repo/tensorrt_llm`` (the run directory moves as a whole)."""
    model_dir = package_dir / "triton_repo" / interface.MODEL_NAME
    return os.path.relpath(engines_dir, model_dir)
