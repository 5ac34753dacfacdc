"""Launch files: GPU and node counts for every layout (attention-DP included), the Kubernetes manifests against
the Kubernetes schemas (core/v1 via kubernetes-validate; the LeaderWorkerSet CRD's own OpenAPI schema), and the
shell scripts through ``bash -n``."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from builder.errors import LayoutError
from builder.layout import Layout
from tests.support.triton import fixed_inputs
from triton_repo.launch import topology
from triton_repo.package import render_launch

K8S_VERSION = "1.30.0"
LWS_SCHEMA = Path(__file__).resolve().parent.parent / "data" / "lws-v0.9.0-leaderworkerset-v1.schema.json.gz"

# (tp, pp, ep, attention_dp, nodes, node_gpus) -> expected GPUs per node
LAYOUTS = [
    (8, 1, 8, False, 1, 8, 8),
    (8, 1, 8, True, 1, 8, 8),  # attention-DP reuses the 8 TP ranks
    (4, 1, 1, False, 1, 8, 4),  # a partial node
    (8, 2, 1, False, 2, 8, 8),
    (16, 1, 16, True, 2, 8, 8),  # attention-DP over 16 ranks on two nodes
    (16, 2, 8, False, 4, 8, 8),
    (8, 1, 1, False, 2, 4, 4),  # 4-GPU nodes
    (2, 2, 1, False, 1, None, 4),  # default 8 GPUs per node
]


def lws_schema() -> dict:
    return json.loads(gzip.decompress(LWS_SCHEMA.read_bytes()))["openAPIV3Schema"]


def unknown_fields(obj, schema, path="") -> list[str]:
    """Fields a structural CRD schema would prune (kubectl --validate=strict rejects them)."""
    out = []
    if isinstance(obj, dict) and "properties" in schema:
        for k, v in obj.items():
            if k not in schema["properties"]:
                out.append(f"{path}.{k}")
            else:
                out += unknown_fields(v, schema["properties"][k], f"{path}.{k}")
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        for k, v in obj.items():
            out += unknown_fields(v, schema["additionalProperties"], f"{path}.{k}")
    elif isinstance(obj, list) and "items" in schema:
        for i, v in enumerate(obj):
            out += unknown_fields(v, schema["items"], f"{path}[{i}]")
    return out


def render(tmp_path, tp, pp, ep, adp, nodes, node_gpus, openai_port=None):
    p = fixed_inputs("gpu", "1.2.1", nodes=nodes, node_gpus=node_gpus, openai_port=openai_port,
                     layout=Layout(tp=tp, pp=pp, ep=ep, attention_dp=adp),
                     llm_api={"tensor_parallel_size": tp, "pipeline_parallel_size": pp,
                              "moe_expert_parallel_size": ep, "enable_attention_dp": adp})
    out = tmp_path / "launch"
    render_launch(p, out)
    return out


@pytest.mark.parametrize("tp,pp,ep,adp,nodes,node_gpus,per_node", LAYOUTS)
def test_counts_in_every_launch_file(tmp_path, tp, pp, ep, adp, nodes, node_gpus, per_node):
    out = render(tmp_path, tp, pp, ep, adp, nodes, node_gpus)
    world = tp * pp
    assert per_node * nodes == world
    sbatch = (out / "slurm.sbatch").read_text()
    assert f"#SBATCH --nodes={nodes}\n" in sbatch
    assert f"#SBATCH --ntasks-per-node={per_node}\n" in sbatch
    assert f"#SBATCH --gpus-per-node={per_node}\n" in sbatch
    assert re.search(rf"srun --nodes={nodes} --ntasks={world} --ntasks-per-node={per_node} --mpi=pmix", sbatch)
    assert "trtllm-llmapi-launch tritonserver --model-repository=" in sbatch
    assert "--container-image=" in sbatch
    lws, svc = list(yaml.safe_load_all((out / "lws.yaml").read_text()))
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert lwt["size"] == nodes
    for tmpl in [lwt["workerTemplate"]] + ([lwt["leaderTemplate"]] if "leaderTemplate" in lwt else []):
        (c,) = tmpl["spec"]["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == per_node
    leader = (lwt.get("leaderTemplate") or lwt["workerTemplate"])["spec"]["containers"][0]["command"][-1]
    if nodes > 1:
        assert f"-n {world} trtllm-llmapi-launch tritonserver" in leader
    else:
        assert leader.startswith("exec tritonserver")
    serve = (out / "serve.sh").read_text()
    assert f"NODES={nodes}\n" in serve and f"WORLD_SIZE={world}\n" in serve and f"GPUS_PER_NODE={per_node}\n" in serve


@pytest.mark.parametrize("openai_port", [None, 9000])
@pytest.mark.parametrize("tp,pp,ep,adp,nodes,node_gpus,per_node", [LAYOUTS[1], LAYOUTS[3], LAYOUTS[4]])
def test_manifests_validate_against_kubernetes_schemas(tmp_path, tp, pp, ep, adp, nodes, node_gpus, per_node,
                                                       openai_port):
    import jsonschema
    import kubernetes_validate

    out = render(tmp_path, tp, pp, ep, adp, nodes, node_gpus, openai_port)
    lws, svc = list(yaml.safe_load_all((out / "lws.yaml").read_text()))
    kubernetes_validate.validate(svc, K8S_VERSION, strict=True)
    schema = lws_schema()
    jsonschema.validate(lws, schema)
    assert unknown_fields(lws, schema) == []
    lwt = lws["spec"]["leaderWorkerTemplate"]
    for key in ("leaderTemplate", "workerTemplate"):
        if key in lwt:
            pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                            "template": lwt[key]}
            kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)


def test_schema_checks_can_fail(tmp_path):
    """The validators reject what is wrong: a misspelt LWS field, a bad container field, a wrong type."""
    import jsonschema
    import kubernetes_validate

    out = render(tmp_path, 8, 2, 1, False, 2, 8)
    lws, _ = list(yaml.safe_load_all((out / "lws.yaml").read_text()))
    lws["spec"]["leaderWorkerTemplate"]["groupSize"] = 2
    assert unknown_fields(lws, lws_schema()) == [".spec.leaderWorkerTemplate.groupSize"]
    lws["spec"]["leaderWorkerTemplate"]["size"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(lws, lws_schema())
    tmpl = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]
    tmpl["spec"]["containers"][0]["gpus"] = 8
    with pytest.raises(Exception, match="gpus"):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": tmpl}, K8S_VERSION, strict=True)


@pytest.mark.parametrize("openai_port", [None, 9000])
@pytest.mark.parametrize("tp,pp,nodes", [(8, 1, 1), (8, 2, 2)])
def test_scripts_pass_bash_syntax_check(tmp_path, tp, pp, nodes, openai_port):
    out = render(tmp_path, tp, pp, 1, False, nodes, 8, openai_port)
    for name in ("slurm.sbatch", "serve.sh"):
        proc = subprocess.run(["bash", "-n", str(out / name)], capture_output=True, text=True)
        assert proc.returncode == 0, (name, proc.stderr)


def test_bash_check_catches_a_broken_script(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("if [ 1 -eq 1 ]; then\n  echo x\n")
    assert subprocess.run(["bash", "-n", str(bad)], capture_output=True).returncode != 0


def test_multi_node_serve_sh_refuses_missing_hosts(tmp_path):
    out = render(tmp_path, 8, 2, 1, False, 2, 8)
    proc = subprocess.run(["bash", str(out / "serve.sh")], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "HOSTS" in proc.stderr


@pytest.mark.parametrize("tp,pp,nodes,gpus,msg", [
    (8, 1, 3, 8, "cannot be spread evenly over 3 nodes"),
    (16, 1, 1, 8, "need 16 GPUs per node, but nodes have 8; use --nodes 2"),
    (8, 2, 1, None, "need 16 GPUs per node"),
])
def test_impossible_topologies_are_refused(tp, pp, nodes, gpus, msg):
    with pytest.raises(LayoutError, match=re.escape(msg)):
        topology(Layout(tp=tp, pp=pp), nodes=nodes, node_gpus=gpus)


@pytest.mark.parametrize("nodes", [1, 2])
def test_openai_endpoint_beside_triton_in_every_launch_file(tmp_path, nodes):
    out = render(tmp_path, 8, nodes, 1, False, nodes, 8, openai_port=9000)
    command = "python3 -m builder.cli openai --repo"
    lws, svc = list(yaml.safe_load_all((out / "lws.yaml").read_text()))
    lwt = lws["spec"]["leaderWorkerTemplate"]
    leader = (lwt.get("leaderTemplate") or lwt["workerTemplate"])["spec"]["containers"][0]
    script = leader["command"][-1]
    # Started in the background before Triton (rank 0 runs on the leader), on the port the Service exposes.
    assert script.index(f"{command} /shared/") < script.index("exec ")
    assert "--port 9000 --triton-url 127.0.0.1:8001 &" in script
    assert {"name": "openai", "containerPort": 9000} in leader["ports"]
    assert {"name": "openai", "port": 9000, "targetPort": 9000} in svc["spec"]["ports"]
    if nodes > 1:
        (worker,) = lwt["workerTemplate"]["spec"]["containers"]
        assert command not in worker["command"][-1]
    sbatch = (out / "slurm.sbatch").read_text()
    assert 'OPENAI_PORT="${OPENAI_PORT:-9000}"' in sbatch
    assert sbatch.index("srun --overlap --nodes=1 --ntasks=1") < sbatch.index("trtllm-llmapi-launch tritonserver")
    serve = (out / "serve.sh").read_text()
    assert 'OPENAI_PORT="${OPENAI_PORT:-9000}"' in serve and command in serve


def test_launch_files_without_openai_port_start_no_endpoint(tmp_path):
    out = render(tmp_path, 8, 1, 1, False, 1, 8)
    lws, svc = list(yaml.safe_load_all((out / "lws.yaml").read_text()))
    assert "openai" not in yaml.safe_dump(lws) and [p["name"] for p in svc["spec"]["ports"]] == [
        "http", "grpc", "metrics"]
    assert 'OPENAI_PORT="${OPENAI_PORT:-}"' in (out / "serve.sh").read_text()


@pytest.mark.parametrize("args, words", [
    (["--colour", "red"], "unknown argument --colour"),
    (["--openai-port", "9000"], "needs dsbuild in this container"),
    (["--openai-port=9000"], "needs dsbuild in this container"),
])
def test_serve_sh_arguments(tmp_path, args, words):
    """A python3 without dsbuild (the system one, run away from this checkout) stops serve.sh before Triton."""
    out = render(tmp_path, 8, 1, 1, False, 1, 8)
    proc = subprocess.run(["bash", str(out / "serve.sh"), *args], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr
