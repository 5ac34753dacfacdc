"""package stage: the Triton model repository and launch files in ``package/``.

``package/triton_repo/`` (GPU flavour: TensorRT-LLM's llmapi model for NVIDIA's Triton container; CPU flavour: the
reference engine behind the same interface), ``package/launch/`` (``serve.sh``, ``slurm.sbatch``, ``lws.yaml``) and
``package/package.json``. The GPU flavour's ``model.yaml`` is the build's ``engines/llm_api.yaml`` when the build
wrote one, else the LLM-API configuration derived here from the spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from builder.errors import PackageError
from builder.pipeline import Stage, StageContext
from builder.specs import RunSpec

VERSION = "1"
LLM_API_FILE = "llm_api.yaml"


def flavour_of(spec: RunSpec) -> str:
    if spec.flavour != "auto":
        return spec.flavour
    return "gpu" if spec.gpu else "cpu"


def derived_llm_api(spec: RunSpec) -> dict[str, Any]:
    """LLM() arguments (TensorRT-LLM 1.2.x ``llm_args.py`` names, FACTS §2b) when the build wrote none."""
    config: dict[str, Any] = {
        "backend": "pytorch",
        "tensor_parallel_size": spec.tp, "pipeline_parallel_size": spec.pp,
        "moe_expert_parallel_size": spec.ep, "moe_tensor_parallel_size": spec.tp // spec.ep,
        "enable_attention_dp": spec.attention_dp,
        "max_batch_size": spec.concurrency, "max_seq_len": spec.isl + spec.osl,
        "kv_cache_config": {"free_gpu_memory_fraction": 0.9,
                            "dtype": "fp8" if spec.kv_cache_dtype == "fp8" else "auto"},
    }
    if spec.spec == "mtp":
        config["speculative_config"] = {"decoding_type": "MTP", "num_nextn_predict_layers": spec.draft_len}
    elif spec.spec == "draft":
        config["speculative_config"] = {"decoding_type": "Draft_Target", "max_draft_len": spec.draft_len,
                                        "speculative_model": spec.draft_model}
    return config


def llm_api_config(spec: RunSpec, engines: Path) -> tuple[dict[str, Any], str]:
    path = engines / LLM_API_FILE
    if path.is_file():
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise PackageError(f"{path} is not a mapping of LLM() arguments")
        return data, f"engines/{LLM_API_FILE}"
    return derived_llm_api(spec), "derived from the spec"


def package_inputs(spec: RunSpec, run_dir: Path, engines: Path):
    from triton_repo.package import PackageInputs, relative_engine_dir
    from triton_repo.versions import pin

    deploy_dir = spec.deploy_dir or str(run_dir.resolve())
    model_path = spec.model_path or f"{deploy_dir.rstrip('/')}/quantized"
    llm_api, source = llm_api_config(spec, engines)
    max_seq_len = _max_positions(engines)
    import builder

    return PackageInputs(
        flavour=flavour_of(spec), pin=pin(spec.trtllm_version), run_name=run_dir.name, layout=spec.layout_name(),
        tp=spec.tp, pp=spec.pp, nodes=spec.nodes, node_gpus=spec.gpus_per_node, llm_api=llm_api,
        deploy_dir=deploy_dir, model_path=model_path,
        engine_dir_rel=relative_engine_dir(run_dir / "package", engines),
        dsbuild_src=str(Path(builder.__file__).resolve().parent.parent),
        engine_max_batch_size=min(spec.concurrency, 64), max_seq_len=max_seq_len, image=spec.image,
        slurm_partition=spec.slurm_partition, slurm_account=spec.slurm_account, slurm_time=spec.slurm_time,
        k8s_pvc=spec.k8s_pvc, k8s_namespace=spec.k8s_namespace,
    ), source


def _max_positions(engines: Path) -> int:
    import json

    data = json.loads((engines / "config.json").read_text())
    model = data.get("model", data)
    return int(model.get("max_position_embeddings", 0) or 0)


def run(ctx: StageContext) -> dict[str, Any]:
    from triton_repo.package import write_package

    p, source = package_inputs(ctx.spec, ctx.run_dir, ctx.inputs["build"])
    info = write_package(p, ctx.out)
    info["llm_api_source"] = source
    return info


def key_inputs(spec: RunSpec, upstream: dict[str, Any]) -> dict[str, Any]:
    """The templates' content (an edited template re-renders) and, for the CPU flavour, where dsbuild lives."""
    import hashlib

    import builder
    from triton_repo.render import template_dir

    h = hashlib.sha256()
    root = template_dir(spec.trtllm_version)
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return {"templates": h.hexdigest(), "dsbuild_src": str(Path(builder.__file__).resolve().parent.parent)}


def describe(spec: RunSpec, extra: dict[str, Any]) -> str:
    return f"render the {flavour_of(spec)} Triton repository (TensorRT-LLM {spec.trtllm_version}) and launch files"


STAGE = Stage(name="package", version=VERSION, output="package", upstream=("build",), run=run,
              tools=("nvidia-pytriton",), key_inputs=key_inputs, describe=describe)
