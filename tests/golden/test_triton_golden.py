"""Golden files of the rendered Triton repository and launch files, one set per pinned TensorRT-LLM version.

Regenerate after an intended change with ``DSBUILD_UPDATE_GOLDEN=1 pytest tests/golden`` and review the diff.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from builder.check import check_run
from builder.layout import Layout
from tests.support.triton import check_repository_layout, fixed_inputs
from triton_repo import interface
from triton_repo.package import write_package
from triton_repo.versions import pinned_versions

GOLDEN = Path(__file__).resolve().parent
CASES = {
    # name: (flavour, overrides)
    "gpu-tp8ep8": ("gpu", {}),
    "gpu-tp8pp2-2nodes": ("gpu", dict(nodes=2, layout=Layout(tp=8, pp=2), run_name="deepseek-v3.2-fp8-tp8pp2ep1",
                                      slurm_partition="gpu", slurm_account="infra", k8s_namespace="llm")),
    # The planner's recommendation on 2 x 8 H200: two replicas of TP8 (each inside one node's NVLink).
    "gpu-tp8ep8-2nodes-x2": ("gpu", dict(nodes=2, layout=Layout(tp=8, pp=1, ep=8, attention_dp=True),
                                         run_name="deepseek-v3.2-fp8-tp8pp1ep8adp")),
    "gpu-tp8ep8-openai": ("gpu", dict(openai_port=9000)),
    "cpu-tp2pp1": ("cpu", dict(layout=Layout(tp=2, pp=1), run_name="tiny-fp8-tp2pp1ep1", max_seq_len=512,
                               engine_dir_rel="../../../engines")),
}


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("version", pinned_versions())
@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_package_matches_golden(tmp_path, version, case):
    flavour, over = CASES[case]
    out = tmp_path / "package"
    write_package(fixed_inputs(flavour, version, **over), out)
    golden = GOLDEN / f"trtllm-{version}" / case
    if os.environ.get("DSBUILD_UPDATE_GOLDEN"):
        shutil.rmtree(golden, ignore_errors=True)
        shutil.copytree(out, golden)
    got, want = files(out), files(golden)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{case}/{name} differs from the golden file"


@pytest.mark.parametrize("version", pinned_versions())
@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_repository_parses_with_tritons_protobuf(version, case):
    flavour, _ = CASES[case]
    repo = GOLDEN / f"trtllm-{version}" / case / "triton_repo"
    (cfg,) = check_repository_layout(repo)
    assert cfg.name == interface.MODEL_NAME and cfg.backend == "python"
    assert [i.name for i in cfg.input] == [t.name for t in interface.INPUTS]
    assert [o.name for o in cfg.output] == [t.name for t in interface.OUTPUTS]
    text_input = cfg.input[0]
    assert not text_input.optional and all(i.optional for i in cfg.input[1:])
    if flavour == "cpu":
        assert cfg.model_transaction_policy.decoupled and cfg.max_batch_size == 0
        assert {"engine_dir", "dsbuild_src", "engine_max_batch_size", "max_seq_len"} <= set(cfg.parameters)
    else:
        # GPU: set by model.py's auto_complete_config from model.yaml, as TensorRT-LLM's llmapi model does.
        assert not cfg.HasField("model_transaction_policy") and cfg.max_batch_size == 0
        import yaml

        model_yaml = yaml.safe_load((repo / "tensorrt_llm/1/model.yaml").read_text())
        assert model_yaml["triton_config"] == {"max_batch_size": 0, "decoupled": True,
                                               "deploy_relative_paths": ["model"]}
        assert model_yaml["model"] == "quantized"  # relative to the deploy directory (contract C-TRITON-2)


def test_gpu_model_py_passes_streaming_by_keyword():
    """The 1.2.x defect (docs/tensorrt-llm-contract.md#C-TRITON-5): streaming went positionally into generate_async's lora_request slot."""
    import ast

    src = (GOLDEN / "trtllm-1.2.1/gpu-tp8ep8/triton_repo/tensorrt_llm/1/model.py").read_text()
    calls = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and n.func.attr == "generate_async"]
    assert calls, "model.py must call generate_async"
    for call in calls:
        assert len(call.args) == 1, "only the prompt may be positional"
        assert {k.arg for k in call.keywords} >= {"sampling_params", "streaming"}


@pytest.mark.parametrize("case", sorted(c for c, (flavour, _) in CASES.items() if flavour == "gpu"))
def test_golden_gpu_package_agrees_with_itself(tmp_path, case):
    """Issue 17 item 14: model.yaml's TP x PP is the world every launch file starts per replica (dsbuild check on the
    golden package), and a golden package that said otherwise would be caught."""
    run = tmp_path / "run"
    shutil.copytree(GOLDEN / "trtllm-1.2.1" / case, run / "package")
    model_yaml = yaml.safe_load((run / "package/triton_repo/tensorrt_llm/1/model.yaml").read_text())
    (run / "engines").mkdir()
    (run / "engines/llm_api.yaml").write_text(yaml.safe_dump(
        {k: v for k, v in model_yaml.items() if k not in ("model", "triton_config")}))
    report = check_run(run)
    assert report.ok, report.lines
    assert {"package/launch/serve.sh", "package/launch/slurm.sbatch", "package/launch/lws.yaml"} <= set(report.checked)
    bad = dict(model_yaml, tensor_parallel_size=model_yaml["tensor_parallel_size"] // 2)
    (run / "package/triton_repo/tensorrt_llm/1/model.yaml").write_text(yaml.safe_dump(bad))
    lines = check_run(run).lines
    for launcher in ("serve.sh", "slurm.sbatch", "lws.yaml"):
        assert any(line.startswith(f"package/launch/{launcher}: starts") for line in lines), lines
