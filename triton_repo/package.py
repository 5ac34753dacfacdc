"""Render a run's Triton model repository and launch files (the ``package`` stage's work).

GPU flavour: TensorRT-LLM's ``llmapi`` layout for NVIDIA's Triton container — ``tensorrt_llm/config.pbtxt``
(python backend), ``1/model.py`` (dsbuild's, see its docstring) and ``1/model.yaml`` = the build's LLM-API
configuration with ``model:`` pointing at the quantized checkpoint on the cluster, plus ``triton_config``.
CPU flavour: the same model name and tensor interface, served by dsbuild's reference engine over the rank shards.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from builder.errors import PackageError
from builder.layout import Layout
from builder.safeio import dumps_json
from builder.specs import DEFAULT_KUBECTL_IMAGE, check_value
from builder.trtllm.contract import require_conforming
from builder.trtllm.speculative import DEPLOY_RELATIVE_PATHS
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
    model_path: str  # the checkpoint the GPU servers load: relative to the deploy directory (or absolute)
    engine_dir_rel: str = "../../../engines"  # CPU: from package/triton_repo/tensorrt_llm to the run's engines/
    dsbuild_src: str = ""  # CPU: directory holding the ``builder`` package (empty: installed dsbuild)
    engine_max_batch_size: int = 16
    batch_window_ms: float = 5.0
    stream_interval: int = 1  # CPU: a streamed response every N tokens (llm_api.yaml's stream_interval)
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
    k8s_kubectl_image: str = DEFAULT_KUBECTL_IMAGE
    replicas: int | None = None  # None: as many as the cluster holds (the plan's count)
    openai_port: int | None = None  # GPU launch files: start dsbuild's OpenAI-compatible endpoint on this port
    dsbuild_version: str = field(default_factory=lambda: __import__("builder").__version__)

    @property
    def triton_image(self) -> str:
        return self.image or self.pin.triton_image


def topology_of(p: PackageInputs) -> launch.Topology:
    return launch.topology(p.layout, nodes=p.nodes, node_gpus=p.node_gpus, replicas=p.replicas)


def common_values(p: PackageInputs, topo: launch.Topology | None) -> dict[str, Any]:
    check_value("run_name", p.run_name)
    check_value("image", p.triton_image)
    check_value("model_path", p.model_path)
    values = {
        "dsbuild_version": p.dsbuild_version, "trtllm_version": p.pin.version, "triton_image": p.triton_image,
        "run_name": p.run_name, "model_name": interface.MODEL_NAME,
        "inputs": interface.pbtxt_inputs(), "outputs": interface.pbtxt_outputs(), "world_size": p.layout.world_size,
        "layout": p.layout.name,
    }
    if topo is not None:
        values.update(layout=f"{p.layout.name}x{topo.replicas}" if topo.replicas > 1 else p.layout.name,
                      replicas=topo.replicas, nodes=topo.nodes, nodes_per_replica=topo.nodes_per_replica,
                      gpus_per_node=topo.gpus_per_node, slots_per_node=topo.slots_per_node)
    return values


def model_yaml(p: PackageInputs) -> str:
    config = {"model": p.model_path}
    config.update((k, v) for k, v in p.llm_api.items() if k not in ("model", "triton_config"))
    require_conforming(config, version=p.pin.version)  # every LLM() key known to the pinned TensorRT-LLM
    # Paths are relative to the deploy directory; model.py makes them absolute there before LLM() (a relative path
    # would be read against tritonserver's working directory, then as a Hub id: docs/tensorrt-llm-contract.md#C-TRITON-2).
    # An absolute path the user chose (--model-path /lustre/...) names shared storage and stays as given.
    paths = [k for k in DEPLOY_RELATIVE_PATHS
             if isinstance(value := _dotted(config, k), str) and not value.startswith("/")]
    config["triton_config"] = {**TRITON_CONFIG, "deploy_relative_paths": paths}
    header = (f"# dsbuild {p.dsbuild_version}: LLM() arguments for TensorRT-LLM {p.pin.version} (run {p.run_name}),\n"
              "# read by model.py; triton_config sets the model's max_batch_size and decoupled policy. The paths\n"
              "# in deploy_relative_paths are relative to the deploy directory ($DSBUILD_DEPLOY_DIR, else the\n"
              "# directory holding package/).\n")
    return header + yaml.safe_dump(config, sort_keys=False, width=120)


def _dotted(config: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def render_repository(p: PackageInputs, out: Path) -> list[Path]:
    """Write ``out/tensorrt_llm/...`` for ``p.flavour``."""
    if p.flavour not in ("gpu", "cpu"):
        raise PackageError(f"unknown repository flavour {p.flavour!r}; choose gpu or cpu")
    topo = topology_of(p) if p.flavour == "gpu" else None
    values = common_values(p, topo)
    if p.flavour == "cpu":
        values.update(engine_dir=p.engine_dir_rel, dsbuild_src=p.dsbuild_src,
                      engine_max_batch_size=p.engine_max_batch_size, batch_window_ms=p.batch_window_ms,
                      stream_interval=p.stream_interval, max_seq_len=p.max_seq_len, threads_per_rank=0, speculative_mode=p.speculative_mode,
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
    topo = topology_of(p)
    values = common_values(p, topo)
    for name in ("slurm_time", "slurm_partition", "slurm_account", "k8s_pvc", "k8s_namespace", "k8s_kubectl_image"):
        check_value(name, getattr(p, name))  # before any file is written (the CLI's spec already checked them)
    # The endpoint's command in the scripts' start_openai OFFSET: replica slot s uses ports + OFFSET (10 s).
    values.update(openai_port=p.openai_port or "", openai_missing=launch.OPENAI_MISSING,
                  openai_command=launch.openai_command(repo='"$REPO"', port='"$(( OPENAI_PORT + $1 ))"',
                                                       triton_url='"127.0.0.1:$(( 8001 + $1 ))"'))
    emit("serve.sh.tmpl", "serve.sh", values)
    model = p.model_path
    extra_mounts = (f'MOUNTS="$MOUNTS",{shlex.quote(f"{model}:{model}")}  # the checkpoint, outside the deploy directory'
                    if model.startswith("/") else "# (the checkpoint is inside the deploy directory)")
    if model.startswith("/") and ("," in model or ":" in model):
        raise PackageError(f"model path {model!r} may not contain ',' or ':' (pyxis --container-mounts syntax)")
    emit("slurm.sbatch.tmpl", "slurm.sbatch", {
        **values, "slurm_time": p.slurm_time,
        "slurm_extra": launch.slurm_extra(partition=p.slurm_partition, account=p.slurm_account),
        "job_name": f"dsbuild-{p.run_name}"[:128], "tasks_per_node": topo.gpus_per_node * topo.slots_per_node,
        "extra_mounts": extra_mounts})
    agent = out / launch.KUBEXEC
    agent.write_bytes((tdir / launch.KUBEXEC).read_bytes())
    agent.chmod(0o755)
    written.append(agent)
    docs = launch.lws_manifests(run_name=p.run_name, topo=topo, image=p.triton_image, pvc=p.k8s_pvc,
                                namespace=p.k8s_namespace, kubectl_image=p.k8s_kubectl_image,
                                openai_port=p.openai_port)
    header = (f"dsbuild {p.dsbuild_version}: LeaderWorkerSet for run {p.run_name} (layout {p.layout.name}): "
              f"{topo.replicas} replica group(s) of {topo.nodes_per_replica} pod(s) x {topo.gpus_per_node} GPU(s).\n"
              f"Needs the LeaderWorkerSet controller and a ReadWriteMany PVC {p.k8s_pvc!r} whose root is the deploy "
              f"directory (mounted at {launch.DEPLOY_MOUNT} in every pod).")
    if model.startswith("/"):
        header += f"\nThe checkpoint {model} must be present at that path in the pods (e.g. a volume you add)."
    target = out / "lws.yaml"
    target.write_text(launch.dump_manifests(docs, header), encoding="utf-8")
    written.append(target)
    return written


def describe(p: PackageInputs) -> dict[str, Any]:
    info: dict[str, Any] = {"flavour": p.flavour, "trtllm_version": p.pin.version, "model": interface.MODEL_NAME,
                            "world_size": p.layout.world_size}
    if p.flavour == "gpu":
        topo = topology_of(p)
        info.update(image=p.triton_image, replicas=topo.replicas, replicas_chosen=p.replicas is not None,
                    nodes=topo.nodes, nodes_per_replica=topo.nodes_per_replica, gpus_per_node=topo.gpus_per_node,
                    replicas_per_node=topo.slots_per_node, total_gpus=topo.total_gpus, model_path=p.model_path,
                    deploy_dir="chosen at launch: serve.sh --deploy-dir / slurm.sbatch DIR / DSBUILD_DEPLOY_DIR",
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
