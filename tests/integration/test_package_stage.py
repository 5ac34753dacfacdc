"""`dsbuild package` through the CLI: flavours, caching, the LLM-API configuration, bad options."""

from __future__ import annotations

import json

import yaml

from tests.support.triton import check_repository_layout


def test_cpu_default_then_gpu_package(dsbuild, tmp_path):
    res = json.loads(dsbuild("run", "--tp", "2", "--pp", "1", "--out", "build/r", "--json", check=True).stdout)
    pkg = next(s for s in res["stages"] if s["stage"] == "package")
    assert pkg["status"] == "built" and pkg["info"]["flavour"] == "cpu"
    run = tmp_path / "build/r"
    (cfg,) = check_repository_layout(run / "package/triton_repo")
    engine_dir = cfg.parameters["engine_dir"].string_value
    assert (run / "package/triton_repo/tensorrt_llm" / engine_dir / "config.json").is_file()
    assert cfg.parameters["max_seq_len"].string_value == "512"
    assert sorted(p.name for p in (run / "package/launch").iterdir()) == ["serve.sh"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert {o["path"] for o in manifest["stages"]["package"]["outputs"]} >= {
        "package/triton_repo/tensorrt_llm/config.pbtxt", "package/triton_repo/tensorrt_llm/1/model.py"}

    again = json.loads(dsbuild("package", "--tp", "2", "--pp", "1", "--out", "build/r", "--json", check=True).stdout)
    assert {s["stage"]: s["status"] for s in again["stages"]}["package"] == "cached"

    gpu = json.loads(dsbuild("package", "--tp", "2", "--pp", "1", "--out", "build/r", "--gpu", "h200-sxm",
                             "--model-path", "/lustre/ckpt/ds32", "--json", check=True).stdout)
    info = {s["stage"]: s for s in gpu["stages"]}["package"]["info"]
    assert info["flavour"] == "gpu" and info["total_gpus"] == 8  # one node of 8: four TP2 replicas
    assert info["image"] == "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3"
    # model.yaml = the build's llm_api.yaml + model + triton_config
    model_yaml = yaml.safe_load((run / "package/triton_repo/tensorrt_llm/1/model.yaml").read_text())
    built = yaml.safe_load((run / "engines/llm_api.yaml").read_text())
    assert model_yaml["model"] == "/lustre/ckpt/ds32"
    # An absolute path the user chose is not resolved under the deploy directory.
    assert model_yaml["triton_config"] == {"max_batch_size": 0, "decoupled": True, "deploy_relative_paths": []}
    assert {k: v for k, v in model_yaml.items() if k not in ("model", "triton_config")} == built
    assert built["tensor_parallel_size"] == 2 and built["pipeline_parallel_size"] == 1
    assert sorted(p.name for p in (run / "package/launch").iterdir()) == ["kubexec.sh", "lws.yaml", "serve.sh",
                                                                       "slurm.sbatch"]


def test_bad_package_options_fail_cleanly(dsbuild, tmp_path):
    dsbuild("build", "--tp", "2", "--pp", "1", "--out", "build/r", check=True)
    # 3 nodes x 8 GPUs hold 12 TP2 replicas (replica-aware launch files); 13 cannot be deployed.
    too_many = dsbuild("package", "--tp", "2", "--pp", "1", "--out", "build/r", "--gpu", "h200-sxm", "--nodes", "3",
                       "--replicas", "13")
    assert too_many.returncode != 0 and "--replicas 13" in too_many.stderr, too_many.stderr
    assert not (tmp_path / "build/r/package").exists()
    assert not list((tmp_path / "build/r").glob(".package*"))


def test_generate_needs_exactly_one_target(dsbuild):
    both = dsbuild("generate", "--url", "127.0.0.1:1", "--engine", "x", "--prompt", "hi")
    neither = dsbuild("generate", "--prompt", "hi")
    for proc in (both, neither):
        assert proc.returncode == 2 and "exactly one of --url" in proc.stderr
    unreachable = dsbuild("generate", "--url", "127.0.0.1:9", "--protocol", "http", "--prompt", "hi")
    assert unreachable.returncode == 9 and "cannot reach" in unreachable.stderr
