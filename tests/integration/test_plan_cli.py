"""`dsbuild plan` and the plan stage through the real CLI: JSON, exit codes, plot, refusal, --allow-infeasible."""

from __future__ import annotations

import json

import pytest

from tests.unit.test_plan_rank_bytes import header_tensor_bytes

PNG = b"\x89PNG\r\n\x1a\n"


def test_plan_json_table_and_plot(dsbuild, tmp_path):
    res = dsbuild("plan", "--model", "deepseek-v3.2", "--gpu", "h200-sxm", "--nodes", "2", "--json",
                  "--plot", "p.png")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["recommended"]["feasible"] and d["recommended"]["gpus"] == 16
    assert d["cluster"] == {"nodes": 2, "gpus_per_node": 8, "gpus": 16}
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG
    table = dsbuild("plan", "--model", "deepseek-v3.2", "--gpu", "h200-sxm", "--nodes", "2", "--top", "3")
    assert table.returncode == 0 and "Recommended " + d["recommended"]["name"] in " ".join(table.stdout.split())


def test_fixed_layout_from_flags_or_config_is_the_only_one_evaluated(dsbuild, tmp_path):
    res = dsbuild("plan", "--model", "deepseek-v3.2", "--gpu", "h200-sxm", "--nodes", "2", "--tp", "8", "--pp", "2",
                  "--ep", "8", "--no-attention-dp", "--json")
    layouts = json.loads(res.stdout)["layouts"]
    assert [(x["tp"], x["pp"], x["ep"], x["attention_dp"]) for x in layouts] == [(8, 2, 8, False)]
    (tmp_path / "c.yaml").write_text("tp: 8\n")
    res = dsbuild("plan", "--model", "deepseek-v3.2", "--gpu", "h200-sxm", "--config", "c.yaml", "--json")
    assert {x["tp"] for x in json.loads(res.stdout)["layouts"]} == {8}


def test_no_feasible_layout_exits_nonzero_with_the_reasons(dsbuild):
    res = dsbuild("plan", "--model", "deepseek-v3.2", "--gpu", "h100-sxm", "--json")
    assert res.returncode == 2
    d = json.loads(res.stdout)
    assert d["recommended"] is None and d["feasible_count"] == 0
    assert "out of memory" in res.stderr and "79.6 GiB of a h100-sxm" in res.stderr
    res = dsbuild("plan", "--model", "deepseek-v3.2", "--gpu", "h200-sxm", "--quant", "nvfp4")
    assert res.returncode == 2 and "needs Blackwell" in res.stderr


def test_run_refuses_an_infeasible_layout_unless_allowed(dsbuild, tmp_path):
    # `build` stops before the launch files: an infeasible layout is refused unless --allow-infeasible, and the
    # refusal offers the flag and layouts the planner finds feasible.
    res = dsbuild("build", "--gpu", "h100-sxm", "--gpus-per-node", "2")
    assert res.returncode == 2
    assert "layout tp2pp2ep1 is not feasible" in res.stderr and "needs 4 GPUs" in res.stderr
    assert "--allow-infeasible" in res.stderr and "feasible instead: " in res.stderr
    assert not (tmp_path / "build").exists()  # refused before any stage ran, nothing left behind
    ok = dsbuild("build", "--gpu", "h100-sxm", "--gpus-per-node", "2", "--allow-infeasible", "--json")
    assert ok.returncode == 0, ok.stderr
    run_dir = tmp_path / json.loads(ok.stdout)["run_dir"]
    plan = json.loads((run_dir / "plan" / "plan.json").read_text())
    assert plan["requested"]["feasible"] is False and plan["allowed_infeasible"] is True
    # `run` renders launch files, which cannot spread 4 ranks over 2-GPU nodes: refused up front, with or without
    # the flag, and the flag is not suggested (it would not help); --nodes 2 is, and so are feasible layouts.
    for extra in ((), ("--allow-infeasible",)):
        pkg = dsbuild("run", "--gpu", "h100-sxm", "--gpus-per-node", "2", *extra)
        assert pkg.returncode == 2 and "cannot build tp2pp2ep1" in pkg.stderr, pkg.stderr
        assert "the layout needs 4 GPUs (TP 2 x PP 2); the cluster has 2" in pkg.stderr
        assert "--nodes 2 or more" in pkg.stderr
        assert "allow-infeasible" not in pkg.stderr
        assert "package" not in json.loads((run_dir / "manifest.json").read_text())["stages"]
    suggested = pkg.stderr.split("feasible instead: ")[1]
    flags = suggested.split(", ")[0].split("(")[1].rstrip(")").split()
    assert dsbuild("run", "--gpu", "h100-sxm", "--gpus-per-node", "2", *flags, "--dry-run").returncode == 0
    assert dsbuild("run", "--gpu", "h100-sxm", "--gpus-per-node", "2", "--nodes", "2",
                   "--dry-run").returncode == 0
    # The flag is not part of any key: dropping it again still refuses, even though every stage is cached.
    again = dsbuild("build", "--gpu", "h100-sxm", "--gpus-per-node", "2")
    assert again.returncode == 2 and "not feasible" in again.stderr


@pytest.mark.parametrize("args,reason", [
    (["--tp", "3"], "TP 3 does not divide the 16 attention heads"),
    (["--pp", "8"], "PP 8 is larger than the model's 4 layers"),
    (["--tp", "4", "--ep", "8"], "EP 8 must divide TP 4"),
    (["--quant", "nvfp4", "--gpu", "h200-sxm"], "nvfp4 needs Blackwell GPUs (b200, gb200); h200-sxm is hopper"),
    (["--quant", "nvfp4"], "nvfp4 needs Blackwell GPUs (b200, gb200); this build targets no GPU"),
])
def test_what_a_later_stage_refuses_is_refused_at_plan_and_only_what_works_is_suggested(dsbuild, tmp_path, args,
                                                                                         reason):
    for extra in ((), ("--allow-infeasible",)):
        res = dsbuild("run", *args, *extra)
        assert res.returncode == 2 and reason in res.stderr, res.stderr
        assert "pass --allow-infeasible" not in res.stderr
        assert not (tmp_path / "build").exists()
    if "feasible instead: " in res.stderr:  # every suggested layout passes the same checks, through package
        for option in res.stderr.split("feasible instead: ")[1].strip().split("), "):
            flags = option.split("(")[1].rstrip(")").split()
            other = [a for i, a in enumerate(args) if a not in ("--tp", "--pp", "--ep")
                     and (i == 0 or args[i - 1] not in ("--tp", "--pp", "--ep"))]
            ok = dsbuild("run", *other, *flags, "--dry-run")
            assert ok.returncode == 0, (flags, ok.stderr)


def test_run_writes_plan_json_and_png_whose_weights_match_the_rank_files(dsbuild, tmp_path):
    res = dsbuild("run", "--tp", "4", "--pp", "1", "--ep", "2", "--json")
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / json.loads(res.stdout)["run_dir"]
    plan = json.loads((run_dir / "plan" / "plan.json").read_text())
    assert (run_dir / "plan" / "plan.png").read_bytes()[:8] == PNG
    req = plan["requested"]
    assert (req["tp"], req["pp"], req["ep"], req["feasible"]) == (4, 1, 2, True)
    assert plan["hardware"]["gpu"] == "cpu" and plan["cluster"]["gpus"] == 4
    on_disk = [header_tensor_bytes(run_dir / "engines" / f"rank{r}.safetensors") for r in range(4)]
    assert req["weights_per_rank_bytes"] == on_disk


def test_plan_names_the_moe_backend_and_the_activation_cost_of_max_num_tokens(dsbuild):
    """Issue 17 items 6 and 7: the plan says which MoE backend the build uses (it decides whether TensorRT-LLM keeps
    kv_b_proj in FP8) and what max_num_tokens costs in activation memory."""
    res = dsbuild("plan", "--model", "deepseek-v3.2", "--gpu", "h200-sxm", "--nodes", "1", "--tp", "8", "--pp", "1",
                  "--ep", "8", "--attention-dp", "--isl", "4096", "--osl", "1024", "--concurrency", "256", "--json")
    assert res.returncode == 0, res.stderr
    t = json.loads(res.stdout)["trtllm"]
    assert t["layout"] == "tp8pp1ep8adp" and t["moe_backend"] == "CUTLASS" and t["kv_b_proj"].startswith("FP8")
    assert t["max_num_tokens"] >= 5120 and t["max_prompt_tokens"] == 5119
    assert 0.1 * 2**30 < t["activation_bytes"] < 16 * 2**30
    table = dsbuild("plan", "--model", "deepseek-v3.2", "--gpu", "b200", "--quant", "nvfp4", "--tp", "8", "--pp", "1",
                    "--ep", "8", "--no-attention-dp")
    assert "MoE backend TRTLLM: kv_b_proj excluded from FP8" in table.stdout
    assert "activations ~" in table.stdout
