"""``dsbuild check RUN_DIR`` (issue 17 "One conformance check"): a GPU-flavour run of the tiny model passes; each kind
of disagreement, made by editing one generated file, is reported as its own line and exits 14; the package stage runs
the same check; a deployment without quantized/ (pulled without --include-weights) is checked with a note."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from builder.check import check_run, quant_cfg_disagreements
from builder.model.config import preset
from quantize.w4afp8_config import quant_cfg

MODEL_YAML = "package/triton_repo/tensorrt_llm/1/model.yaml"


@pytest.fixture(scope="module")
def built(tmp_path_factory, cache_dir):
    from tests.conftest import run_dsbuild

    root = tmp_path_factory.mktemp("check")
    proc = run_dsbuild("run", "--model", "tiny", "--tp", "2", "--pp", "1", "--ep", "2", "--gpu", "h200-sxm",
                       "--nodes", "1", "--out", "run", "--json", cwd=root, timeout=1200,
                       env={"XDG_CACHE_HOME": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


@pytest.fixture
def run(built, tmp_path):
    """A copy of the run to edit (quantized/ linked, not copied, unless a test replaces it)."""
    copy = tmp_path / "run"
    shutil.copytree(built, copy, ignore=shutil.ignore_patterns("quantized", "weights", "rank*.safetensors"))
    (copy / "quantized").symlink_to(built / "quantized")
    return copy


def edit_yaml(path: Path, change) -> None:
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data, indent=2))
        return
    header = "".join(l for l in path.read_text().splitlines(keepends=True) if l.startswith("#"))
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))


def test_a_fresh_run_passes_and_the_cli_says_so(built, dsbuild):
    report = check_run(built)
    assert report.ok, report.lines
    assert {"plan/plan.json", "engines/llm_api.yaml", MODEL_YAML, "package/launch/slurm.sbatch",
            "package/launch/lws.yaml", "quantized/"} <= set(report.checked)
    proc = dsbuild("check", str(built))
    assert proc.returncode == 0 and proc.stdout == "" and "agree with the plan" in proc.stderr
    info = json.loads((built / "manifest.json").read_text())["stages"]["package"]["info"]
    assert info["check"]["ok"]  # the package stage ran the same check


MUTATIONS = {
    # the plan itself edited: every file built from it now disagrees
    "plan": ("plan/plan.json", lambda d: d["requested"].update(tp=4),
             ["engines/llm_api.yaml: tensor_parallel_size is 2 but plan/plan.json plans tp 4",
              "engines/config.json: mapping.tp is 2 but plan/plan.json plans 4"]),
    "engine mapping": ("engines/config.json", lambda d: d["mapping"].update(ep=1),
                       ["engines/config.json: mapping.ep is 1 but plan/plan.json plans 2"]),
    "engine model": ("engines/config.json", lambda d: d.pop("model"),
                     ["engines/config.json: holds no valid model config"]),
    "package replicas": ("package/package.json", lambda d: d.update(replicas=3),
                         ["package/package.json: replicas 3 but plan/plan.json plans 4"]),
    # plan <-> llm_api.yaml (and llm_api.yaml <-> model.yaml: both disagree with the plan now)
    "layout": ("engines/llm_api.yaml", lambda d: d.update(tensor_parallel_size=4),
               ["engines/llm_api.yaml: tensor_parallel_size is 4 but plan/plan.json plans tp 2",
                f"{MODEL_YAML}: tensor_parallel_size is 2 but engines/llm_api.yaml has 4"]),
    "backend": ("engines/llm_api.yaml", lambda d: d["moe_config"].update(backend="TRTLLM"),
                ["engines/llm_api.yaml: moe_config.backend is 'TRTLLM' but plan/plan.json names 'CUTLASS'"]),
    "model.yaml value": (MODEL_YAML, lambda d: d.update(max_num_tokens=128),
                         [f"{MODEL_YAML}: max_num_tokens is 128 but engines/llm_api.yaml has"]),
    "allow-list": (MODEL_YAML, lambda d: d.update(use_cuda_graph=True),
                   [f"{MODEL_YAML}: use_cuda_graph: not a TensorRT-LLM 1.2.1 LLM-API key"]),
    "auto backend": (MODEL_YAML, lambda d: d["moe_config"].update(backend="AUTO"),
                     [f"{MODEL_YAML}: moe_config.backend: 'AUTO' is not of type"]),
    "tokens_per_block": (MODEL_YAML, lambda d: d["kv_cache_config"].update(tokens_per_block=32),
                         [f"{MODEL_YAML}: kv_cache_config.tokens_per_block is 32 but DeepSeek-V3.2's DSA needs 64"]),
    "admission": (MODEL_YAML, lambda d: d.update(max_num_tokens=64, max_seq_len=512),
                  [f"{MODEL_YAML}: max_num_tokens 64 < max_seq_len 512 - 1 without chunked prefill"]),
    "absolute path": (MODEL_YAML, lambda d: d.update(model="/home/builder/run/quantized"),
                      [f"{MODEL_YAML}: model is the absolute path /home/builder/run/quantized"]),
    "triton_config": (MODEL_YAML, lambda d: d["triton_config"].pop("decoupled"),
                      [f"{MODEL_YAML}: triton_config needs max_batch_size and decoupled"]),
    "lws replicas": ("package/launch/lws.yaml", None,
                     ["package/launch/lws.yaml: deploys 1 replica(s) but plan/plan.json plans (tp2pp1ep2x4) 4"]),
    "lws gpus": ("package/launch/lws.yaml", None,
                 ["package/launch/lws.yaml: starts 4 ranks per replica but model.yaml's TP 2 x PP 1 is 2"]),
}


def _lws(run: Path, name: str) -> None:
    path = run / "package/launch/lws.yaml"
    docs = list(yaml.safe_load_all(path.read_text()))
    lws = docs[0]
    if name == "lws replicas":
        lws["spec"]["replicas"] = 1
    else:
        c = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
        c["resources"]["limits"]["nvidia.com/gpu"] = 4
    path.write_text("---\n".join(yaml.safe_dump(d) for d in docs))


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_each_kind_of_disagreement_is_one_line(run, name, dsbuild):
    rel, change, expected = MUTATIONS[name]
    if change is None:
        _lws(run, name)
    else:
        edit_yaml(run / rel, change)
    lines = check_run(run).lines
    for want in expected:
        assert any(line.startswith(want) for line in lines), (want, lines)
    proc = dsbuild("check", str(run))
    assert proc.returncode == 14 and proc.stdout.splitlines() == lines
    assert f"{len(lines)} disagreement(s)" in proc.stderr


def test_slurm_header_and_serve_sh_disagreements(run):
    sbatch = run / "package/launch/slurm.sbatch"
    sbatch.write_text(sbatch.read_text().replace("#SBATCH --ntasks-per-node=8", "#SBATCH --ntasks-per-node=4"))
    serve = run / "package/launch/serve.sh"
    serve.write_text(serve.read_text().replace("\nWORLD_SIZE=2\n", "\nWORLD_SIZE=4\n"))
    lines = check_run(run).lines
    assert "package/launch/slurm.sbatch: #SBATCH --ntasks-per-node=4 but 4 replica(s) per node of 2 rank(s) need 8" \
        in lines
    assert any(l.startswith("package/launch/serve.sh: starts 4 ranks per replica") for l in lines), lines


def test_checkpoint_disagreements(run, built, tmp_path):
    (run / "quantized").unlink()
    shutil.copytree(built / "quantized", run / "quantized")
    shard = sorted((run / "quantized").glob("model-00002-*.safetensors"))[0]
    from safetensors.torch import load_file, save_file

    tensors = load_file(shard)
    name = "model.layers.0.self_attn.indexer.weights_proj.weight"
    tensors[name] = tensors[name][:, :8].contiguous()
    shard.unlink()
    save_file(tensors, shard, metadata={"format": "pt"})
    (run / "quantized/hf_quant_config.json").write_text(json.dumps({"quantization": {
        "quant_algo": "FP8_BLOCK_SCALES", "kv_cache_quant_algo": "FP8",
        "exclude_modules": ["*kv_b_proj*", "*k_b_proj*", "*eh_proj"]}}))
    lines = check_run(run).lines
    assert any(l.startswith("quantized/: ") and name in l and "shape" in l for l in lines), lines
    assert any(l.startswith("quantized/hf_quant_config.json: exclude_modules") and "CUTLASS MoE backend needs "
               "['*eh_proj']" in l for l in lines), lines


def test_pulled_deployment_without_weights_is_checked_with_a_note(run):
    (run / "quantized").unlink()
    report = check_run(run)
    assert report.ok, report.lines
    assert any("quantized/ is not in this deployment" in n for n in report.notes)
    assert any("'quantized' is not in this deployment" in n for n in report.notes)


def test_quant_cfg_disagreements_follow_tensorrt_llms_rules(tmp_path):
    cfg = preset("deepseek-v3.2")
    good = quant_cfg(cfg, "FP8")
    (tmp_path / "quant_cfg.json").write_text(json.dumps(good))
    hq = {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": "FP8"}
    assert quant_cfg_disagreements(tmp_path, cfg, hq) == []
    layers = dict(good["quantized_layers"])
    del layers["model.layers.7.self_attn.indexer.wk"]  # the upstream script's gap
    layers["model.layers.9.self_attn.indexer.wk"] = {"quant_algo": "W4A8_AWQ"}
    (tmp_path / "quant_cfg.json").write_text(json.dumps({**good, "quantized_layers": layers,
                                                         "kv_cache_quant_algo": None}))
    lines = quant_cfg_disagreements(tmp_path, cfg, {**hq, "kv_cache_quant_algo": "FP8"})
    assert any("1 FP8 linear(s) not listed, e.g. model.layers.7.self_attn.indexer.wk" in l for l in lines), lines
    assert any(l.startswith("model.layers.9.self_attn.indexer.wk is {'quant_algo': 'W4A8_AWQ'}") for l in lines)
    (tmp_path / "quant_cfg.json").write_text(json.dumps({**good, "kv_cache_quant_algo": "INT8"}))
    assert any("TensorRT-LLM refuses to load" in l for l in quant_cfg_disagreements(tmp_path, cfg, hq))
