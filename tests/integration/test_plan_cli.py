"""`dsbuild plan` and the plan stage through the real CLI: JSON, exit codes, plot, refusal, --allow-infeasible."""

from __future__ import annotations

import json

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
    res = dsbuild("run", "--gpu", "h100-sxm", "--gpus-per-node", "2")
    assert res.returncode == 2
    assert "layout tp2pp2ep1 is not feasible" in res.stderr and "needs 4 GPUs" in res.stderr
    assert "--allow-infeasible" in res.stderr
    assert not list(tmp_path.rglob("manifest.json"))  # refused before any stage ran
    # Allowed through the plan, the stages up to build run; package still refuses to render launch files for a
    # cluster shape that cannot host the ranks (its own check, with its own message).
    ok = dsbuild("build", "--gpu", "h100-sxm", "--gpus-per-node", "2", "--allow-infeasible", "--json")
    assert ok.returncode == 0, ok.stderr
    pkg = dsbuild("run", "--gpu", "h100-sxm", "--gpus-per-node", "2", "--allow-infeasible")
    assert pkg.returncode != 0 and "need 4 GPUs per node, but nodes have 2" in pkg.stderr
    run_dir = tmp_path / json.loads(ok.stdout)["run_dir"]
    plan = json.loads((run_dir / "plan" / "plan.json").read_text())
    assert plan["requested"]["feasible"] is False and plan["allowed_infeasible"] is True
    # The flag is not part of any key: dropping it again still refuses, even though every stage is cached.
    again = dsbuild("build", "--gpu", "h100-sxm", "--gpus-per-node", "2")
    assert again.returncode == 2 and "not feasible" in again.stderr


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
