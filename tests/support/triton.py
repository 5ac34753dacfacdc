"""Helpers for tests of the Triton repository: Triton's own ModelConfig protobuf and fixed package inputs."""

from __future__ import annotations

from pathlib import Path

from builder.layout import Layout
from triton_repo.package import PackageInputs
from triton_repo.versions import pin


def parse_config_pbtxt(path: Path):
    """Parse with Triton's ModelConfig protobuf (raises on any unknown field or syntax error)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def check_repository_layout(repo: Path) -> list:
    """Triton's repository rules: name == directory, numeric version dirs; returns the parsed configs."""
    configs = []
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir()):
        cfg = parse_config_pbtxt(model_dir / "config.pbtxt")
        assert cfg.name == model_dir.name, (cfg.name, model_dir.name)
        versions = [p.name for p in model_dir.iterdir() if p.is_dir()]
        assert versions and all(v.isdigit() and not v.startswith("0") for v in versions), versions
        configs.append(cfg)
    return configs


def fixed_inputs(flavour: str, version: str, **over) -> PackageInputs:
    """Package inputs with nothing machine-specific, for golden files."""
    base = dict(
        flavour=flavour, pin=pin(version), run_name="deepseek-v3.2-fp8-tp8pp1ep8", layout=Layout(tp=8, pp=1, ep=8),
        nodes=1, node_gpus=8,
        llm_api={"tensor_parallel_size": 8, "pipeline_parallel_size": 1,
                 "moe_expert_parallel_size": 8, "enable_attention_dp": False, "max_batch_size": 64,
                 "kv_cache_config": {"free_gpu_memory_fraction": 0.9, "dtype": "fp8"}},
        deploy_dir="/shared/dsbuild/deepseek-v3.2-fp8-tp8pp1ep8",
        model_path="/shared/dsbuild/deepseek-v3.2-fp8-tp8pp1ep8/quantized",
        dsbuild_src="/opt/dsbuild", engine_max_batch_size=16, max_seq_len=163840, dsbuild_version="0.1.0",
    )
    base.update(over)
    return PackageInputs(**base)
