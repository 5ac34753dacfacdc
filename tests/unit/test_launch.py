"""Launch files deploy exactly the plan (issue 17 items 11-14): replicas x (nodes per replica x GPUs) in serve.sh,
slurm.sbatch and lws.yaml; every path relative to a deploy directory chosen at launch; multi-node Kubernetes without
ssh (LWS's own kubectl-exec pattern, docs/tensorrt-llm-contract.md#C-LWS-3); the manifests against the Kubernetes
schemas (core/v1 and rbac/v1 via kubernetes-validate; the LeaderWorkerSet CRD's own OpenAPI schema); the scripts run
with stand-in tritonserver/srun/kubectl/mpirun; hostile values refused or quoted (issue 18 item 9)."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from builder.errors import LayoutError, PackageError, SpecError
from builder.layout import Layout
from builder.specs import resolve_spec
from tests.support.triton import fixed_inputs
from triton_repo.launch import topology
from triton_repo.package import render_launch, write_package

K8S_VERSION = "1.30.0"
LWS_SCHEMA = Path(__file__).resolve().parent.parent / "data" / "lws-v0.9.0-leaderworkerset-v1.schema.json.gz"

# (tp, pp, ep, adp, cluster nodes, node GPUs) -> (replicas, nodes per replica, GPUs per node, replicas per node)
LAYOUTS = [
    ((8, 1, 8, False, 1, 8), (1, 1, 8, 1)),
    ((8, 1, 8, True, 2, 8), (2, 1, 8, 1)),  # the case: TP8 x2 on 2 x 8 H200, TP inside each node
    ((4, 1, 1, False, 1, 8), (2, 1, 4, 2)),  # two replicas share a node
    ((8, 2, 1, False, 2, 8), (1, 2, 8, 1)),
    ((16, 1, 16, True, 2, 8), (1, 2, 8, 1)),  # attention-DP over 16 ranks on two nodes
    ((16, 2, 8, False, 8, 8), (2, 4, 8, 1)),
    ((8, 1, 1, False, 2, 4), (1, 2, 4, 1)),  # 4-GPU nodes
    ((2, 2, 1, False, 1, None), (2, 1, 4, 2)),  # default 8 GPUs per node
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


def inputs(tp, pp, ep, adp, nodes, node_gpus, **over):
    return fixed_inputs("gpu", "1.2.1", nodes=nodes, node_gpus=node_gpus,
                        layout=Layout(tp=tp, pp=pp, ep=ep, attention_dp=adp), **over)


def render(tmp_path, *layout, **over) -> Path:
    out = tmp_path / "launch"
    render_launch(inputs(*layout, **over), out)
    return out


def docs(out: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((out / "lws.yaml").read_text())}


@pytest.mark.parametrize("layout,expect", LAYOUTS)
def test_every_launch_file_deploys_the_planned_replicas(tmp_path, layout, expect):
    replicas, per_replica, per_node, slots = expect
    tp, pp = layout[0], layout[1]
    world = tp * pp
    assert per_replica * per_node == world
    out = render(tmp_path, *layout)
    sbatch = (out / "slurm.sbatch").read_text()
    total_nodes = -(-replicas // slots) * per_replica
    assert f"#SBATCH --nodes={total_nodes}\n" in sbatch
    assert f"#SBATCH --ntasks-per-node={per_node * slots}\n" in sbatch
    for var, value in (("REPLICAS", replicas), ("NODES_PER_REPLICA", per_replica), ("GPUS_PER_NODE", per_node),
                       ("SLOTS_PER_NODE", slots), ("WORLD_SIZE", world)):
        assert f"\n{var}={value}\n" in sbatch and f"\n{var}={value}\n" in (out / "serve.sh").read_text(), var
    lws = docs(out)["LeaderWorkerSet"]
    assert lws["spec"]["replicas"] == replicas
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert lwt["size"] == per_replica
    for tmpl in [lwt["workerTemplate"]] + ([lwt["leaderTemplate"]] if "leaderTemplate" in lwt else []):
        (c,) = tmpl["spec"]["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == per_node
    leader = (lwt.get("leaderTemplate") or lwt["workerTemplate"])["spec"]["containers"][0]["command"][-1]
    if per_replica > 1:
        assert f"-np {world} --host" in leader and "trtllm-llmapi-launch tritonserver" in leader
    else:
        assert leader.startswith("exec tritonserver")


def test_replicas_option_deploys_fewer_and_refuses_more(tmp_path):
    out = render(tmp_path, 8, 1, 8, False, 4, 8, replicas=3)
    assert "\nREPLICAS=3\n" in (out / "slurm.sbatch").read_text() and "#SBATCH --nodes=3\n" in (out / "slurm.sbatch").read_text()
    assert docs(out)["LeaderWorkerSet"]["spec"]["replicas"] == 3
    with pytest.raises(LayoutError, match="--replicas 5: 4 node"):
        render(tmp_path / "x", 8, 1, 8, False, 4, 8, replicas=5)
    spec = resolve_spec(cli={"replicas": 2, "tp": 8, "pp": 1, "ep": 8})
    assert spec.replicas == 2 and "replicas" in spec.stage_fields("package")


@pytest.mark.parametrize("tp,pp,nodes,gpus,msg", [
    (16, 1, 1, 8, "one replica of 16 ranks needs 2 nodes of 8 GPUs, the cluster has 1; use --nodes 2"),
    (12, 1, 2, 8, "do not fill whole nodes of 8 GPUs"),
    (8, 2, 1, None, "needs 2 nodes"),
])
def test_impossible_topologies_are_refused(tp, pp, nodes, gpus, msg):
    with pytest.raises(LayoutError, match=re.escape(msg)):
        topology(Layout(tp=tp, pp=pp), nodes=nodes, node_gpus=gpus)


@pytest.mark.parametrize("layout", [LAYOUTS[1][0], LAYOUTS[3][0], LAYOUTS[4][0]])
def test_manifests_validate_against_kubernetes_schemas(tmp_path, layout):
    import jsonschema
    import kubernetes_validate

    out = render(tmp_path, *layout)
    by_kind = docs(out)
    lws = by_kind.pop("LeaderWorkerSet")
    for doc in by_kind.values():  # Service, and for multi-node replicas ServiceAccount, Role, RoleBinding
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
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
    lws = docs(out)["LeaderWorkerSet"]
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
    role = docs(out)["Role"]
    role["rules"][0]["verb"] = ["get"]
    with pytest.raises(Exception, match="verb"):
        kubernetes_validate.validate(role, K8S_VERSION, strict=True)


def test_multi_node_kubernetes_needs_no_ssh(tmp_path):
    """LWS's TensorRT-LLM example pattern: the leader's mpirun starts remote ranks through kubectl exec (RBAC for
    pods/exec), workers only wait; no sshd, no keys, no Secret."""
    out = render(tmp_path, 8, 2, 1, False, 2, 8)
    text = (out / "lws.yaml").read_text()
    assert "sshd" not in text and "ssh-keygen" not in text and "Secret" not in text
    by_kind = docs(out)
    lwt = by_kind["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]
    leader = lwt["leaderTemplate"]["spec"]
    script = leader["containers"][0]["command"][-1]
    assert "-mca plm_rsh_agent /deploy/package/launch/kubexec.sh" in script
    assert 'kubectl wait pod --namespace "$POD_NAMESPACE" --for=condition=Ready --timeout=3600s -l "$WORKERS"' in script
    # the leader waits for its workers only (its own readiness probe is tritonserver's, started after the wait)
    assert ('WORKERS="leaderworkerset.sigs.k8s.io/group-key=$GROUP_KEY,leaderworkerset.sigs.k8s.io/worker-index!=0"'
            in script)
    assert leader["serviceAccountName"] == by_kind["ServiceAccount"]["metadata"]["name"]
    assert leader["initContainers"][0]["name"] == "kubectl"
    rules = {r["resources"][0]: r["verbs"] for r in by_kind["Role"]["rules"]}
    assert rules == {"pods": ["get", "list", "watch"], "pods/exec": ["create"]}
    assert by_kind["RoleBinding"]["roleRef"]["name"] == by_kind["Role"]["metadata"]["name"]
    worker = lwt["workerTemplate"]["spec"]["containers"][0]["command"][-1]
    assert "sleep" in worker and "mpirun" not in worker
    single = docs(render(tmp_path / "one", 8, 1, 8, False, 2, 8))
    assert set(single) == {"LeaderWorkerSet", "Service"}  # one pod per replica: no launcher, no RBAC


def _fake_bin(root: Path, name: str, body: str) -> None:
    path = root / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_lws_leader_script_waits_for_its_workers_then_starts_every_rank(tmp_path):
    """The leader's start-up run with stand-in kubectl/mpirun: it waits for the group's workers (not for itself),
    then starts TP x PP ranks over every pod of its group through the kubectl-exec agent."""
    out = render(tmp_path, 8, 2, 1, False, 2, 8)
    script = docs(out)["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0][
        "command"][-1]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_bin(bin_dir, "kubectl", 'echo "$*" >> "$LOG.kubectl"\n[ "$1" = get ] && echo "pod-1 1/1 Running"\nexit 0\n')
    _fake_bin(bin_dir, "mpirun", 'printf "%s\\n" "$@" > "$LOG.mpirun"\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LOG": str(tmp_path / "log"), "POD_NAMESPACE": "llm",
           "GROUP_KEY": "k0", "LWS_GROUP_SIZE": "2", "LWS_LEADER_ADDRESS": "dsbuild-r-0.dsbuild-r.llm"}
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "log.kubectl").read_text().splitlines()
    selector = "leaderworkerset.sigs.k8s.io/group-key=k0,leaderworkerset.sigs.k8s.io/worker-index!=0"
    assert calls[0] == f"get pods --namespace llm -l {selector} --no-headers"
    assert calls[-1] == f"wait pod --namespace llm --for=condition=Ready --timeout=3600s -l {selector}"
    argv = (tmp_path / "log.mpirun").read_text().splitlines()
    assert argv[argv.index("-np") + 1] == "16"
    assert argv[argv.index("--host") + 1] == "dsbuild-r-0.dsbuild-r.llm:8,dsbuild-r-0-1.dsbuild-r.llm:8"
    assert argv[argv.index("plm_rsh_agent") + 1] == "/deploy/package/launch/kubexec.sh"


def test_kubexec_agent_turns_open_mpis_ssh_call_into_kubectl_exec(tmp_path):
    out = render(tmp_path, 8, 2, 1, False, 2, 8)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_bin(bin_dir, "kubectl", 'printf "%s\\n" "$@" > "$KUBECTL_LOG"\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "POD_NAMESPACE": "llm", "KUBECTL_LOG": str(tmp_path / "log")}
    proc = subprocess.run(["bash", str(out / "kubexec.sh"), "-x", "-p", "22", "dsbuild-r-0-1.dsbuild-r.llm",
                           "orted", "--hnp-uri", "'1.2;tcp://10.0.0.1:5000'"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "log").read_text().splitlines() == [
        "exec", "-i", "--namespace", "llm", "-c", "server", "dsbuild-r-0-1", "--", "/bin/bash", "-c",
        "orted --hnp-uri '1.2;tcp://10.0.0.1:5000'"]


# --- relocatable: a deploy directory chosen at launch -------------------------------------------------------------

def _package(tmp_path: Path, *layout, **over) -> Path:
    deploy = tmp_path / "built" / "run"
    write_package(inputs(*layout, **over), deploy / "package")
    return deploy


def test_no_generated_file_names_the_build_machine(tmp_path):
    deploy = _package(tmp_path, 8, 2, 1, False, 2, 8)
    for path in (deploy / "package").rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert str(tmp_path) not in text, path
            assert "/shared/" not in text, path


@pytest.mark.parametrize("how", ["default", "argument", "environment"])
def test_serve_sh_runs_from_wherever_the_deployment_lands(tmp_path, how):
    built = _package(tmp_path, 8, 1, 8, False, 1, 8)
    moved = tmp_path / "srv" / "deploy"
    shutil.move(str(built), moved)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_bin(bin_dir, "tritonserver", 'echo "$DSBUILD_DEPLOY_DIR|$*" > "$LOG"\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LOG": str(tmp_path / "log")}
    args = ["bash", str(moved / "package/launch/serve.sh")]
    if how == "argument":
        args = ["bash", str(tmp_path / "copy.sh"), "--deploy-dir", str(moved)]
        shutil.copy(moved / "package/launch/serve.sh", tmp_path / "copy.sh")
    elif how == "environment":
        args = ["bash", str(tmp_path / "copy.sh")]
        shutil.copy(moved / "package/launch/serve.sh", tmp_path / "copy.sh")
        env["DSBUILD_DEPLOY_DIR"] = str(moved)
    proc = subprocess.run(args, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    deploy, argv = (tmp_path / "log").read_text().strip().split("|")
    assert deploy == str(moved)
    assert f"--model-repository={moved}/package/triton_repo" in argv and "--http-port=8000" in argv


def test_serve_sh_starts_each_replica_of_a_shared_node_on_its_own_gpus_and_ports(tmp_path):
    deploy = _package(tmp_path, 4, 1, 1, False, 1, 8)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_bin(bin_dir, "tritonserver", 'echo "$CUDA_VISIBLE_DEVICES|$*" >> "$LOG"; sleep 1\n')
    proc = subprocess.run(["bash", str(deploy / "package/launch/serve.sh")], capture_output=True, text=True,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", "LOG": str(tmp_path / "log")})
    assert proc.returncode == 0, proc.stderr
    lines = sorted((tmp_path / "log").read_text().splitlines())
    assert [l.split("|")[0] for l in lines] == ["0,1,2,3", "4,5,6,7"]
    assert "--http-port=8000" in lines[0] and "--http-port=8010" in lines[1] and "--metrics-port=8012" in lines[1]


def test_slurm_job_runs_one_step_per_replica_on_its_own_nodes(tmp_path):
    deploy = _package(tmp_path, 8, 1, 8, True, 2, 8)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_bin(bin_dir, "srun", 'echo "$*" >> "$LOG"\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LOG": str(tmp_path / "log"), "SLURM_SUBMIT_DIR": str(deploy)}
    proc = subprocess.run(["bash", str(deploy / "package/launch/slurm.sbatch")], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    steps = (tmp_path / "log").read_text().splitlines()
    assert len(steps) == 2
    for i, step in enumerate(sorted(steps, key=lambda s: re.search(r"--relative=(\d+)", s)[1])):
        assert f"--exact --nodes=1 --relative={i} --ntasks=8 --ntasks-per-node=8 --gpus-per-node=8 --mpi=pmix" in step
        assert f"--container-mounts={deploy}:{deploy}" in step and f"DSBUILD_DEPLOY_DIR={deploy}" in step
        assert "trtllm-llmapi-launch tritonserver" in step
    bad = subprocess.run(["bash", str(deploy / "package/launch/slurm.sbatch"), str(tmp_path)], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "is not a dsbuild deployment" in bad.stderr


@pytest.mark.parametrize("layout", [(8, 1, 8, False, 1, 8), (8, 2, 1, False, 2, 8)])
def test_scripts_pass_bash_syntax_check(tmp_path, layout):
    out = render(tmp_path, *layout)
    for name in ("slurm.sbatch", "serve.sh", "kubexec.sh"):
        proc = subprocess.run(["bash", "-n", str(out / name)], capture_output=True, text=True)
        assert proc.returncode == 0, (name, proc.stderr)


def test_bash_check_catches_a_broken_script(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("if [ 1 -eq 1 ]; then\n  echo x\n")
    assert subprocess.run(["bash", "-n", str(bad)], capture_output=True).returncode != 0


def test_multi_node_serve_sh_refuses_missing_hosts(tmp_path):
    deploy = _package(tmp_path, 8, 2, 1, False, 2, 8)
    proc = subprocess.run(["bash", str(deploy / "package/launch/serve.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "--hosts" in proc.stderr


# --- hostile values (issue 18 item 9) ----------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("slurm_time", "04:00:00\n#SBATCH --uid=0"),
    ("slurm_time", "1:00:00; rm -rf /"),
    ("slurm_partition", "gpu\n#SBATCH --exclusive"),
    ("slurm_account", "a b"),
    ("image", "nvcr.io/x:1\"; touch /tmp/pwned; \""),
    ("image", "$(touch /tmp/pwned)"),
    ("k8s_pvc", "Run Dir"),
    ("k8s_namespace", "llm\n  hostNetwork: true"),
    ("k8s_kubectl_image", "k\nubectl"),
    ("model_path", "/data/ckpt\nrm -rf /"),
])
def test_hostile_values_are_refused_as_options(field, value):
    with pytest.raises(SpecError, match=f"invalid {field.replace('_', '-')}"):
        resolve_spec(cli={field: value})


def test_values_that_reach_a_shell_are_quoted(tmp_path):
    """A checkpoint path outside the deploy directory, with a space and shell syntax, stays one literal word."""
    model = "/data/my ckpt/$(touch PWNED)`id`"
    deploy = _package(tmp_path, 8, 1, 8, False, 1, 8, model_path=model)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_bin(bin_dir, "srun", 'for a in "$@"; do echo "$a"; done >> "$LOG"\n')
    proc = subprocess.run(["bash", str(deploy / "package/launch/slurm.sbatch"), str(deploy)], cwd=tmp_path,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", "LOG": str(tmp_path / "log")},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "log").read_text().splitlines()
    assert f"--container-mounts={deploy}:{deploy},{model}:{model}" in args
    assert not (tmp_path / "PWNED").exists() and not list(tmp_path.glob("**/PWNED"))
    with pytest.raises(PackageError, match="may not contain ','"):
        _package(tmp_path / "x", 8, 1, 8, False, 1, 8, model_path="/data/a,b")
    with pytest.raises(SpecError, match="invalid run-name"):
        write_package(inputs(8, 1, 8, False, 1, 8, run_name="r\n#SBATCH --uid=0"), tmp_path / "y")
    os.environ.pop("PWNED", None)


# --- dsbuild's OpenAI-compatible endpoint beside Triton --------------------------------------------------------------

@pytest.mark.parametrize("layout", [(8, 1, 8, False, 1, 8), (8, 2, 1, False, 2, 8)])
def test_openai_endpoint_beside_every_replicas_triton(tmp_path, layout):
    out = render(tmp_path, *layout, openai_port=9000)
    command = "python3 -m builder.cli openai --repo"
    by_kind = docs(out)
    lwt = by_kind["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]
    leader = (lwt.get("leaderTemplate") or lwt["workerTemplate"])["spec"]["containers"][0]
    script = leader["command"][-1]
    # Started in the background before Triton (rank 0 runs on the leader), on the port the Service exposes.
    assert script.index(f"{command} /deploy/package/triton_repo") < script.index("exec ")
    assert "--port 9000 --triton-url 127.0.0.1:8001 &" in script
    assert {"name": "openai", "containerPort": 9000} in leader["ports"]
    assert {"name": "openai", "port": 9000, "targetPort": 9000} in by_kind["Service"]["spec"]["ports"]
    if "leaderTemplate" in lwt:
        assert command not in lwt["workerTemplate"]["spec"]["containers"][0]["command"][-1]
    sbatch = (out / "slurm.sbatch").read_text()
    assert 'OPENAI_PORT="${OPENAI_PORT:-9000}"' in sbatch
    assert sbatch.index("srun --overlap --nodes=1 --ntasks=1") < sbatch.index("trtllm-llmapi-launch tritonserver")
    serve = (out / "serve.sh").read_text()
    assert 'OPENAI_PORT="${OPENAI_PORT:-9000}"' in serve and command in serve
    for name in ("slurm.sbatch", "serve.sh"):
        assert subprocess.run(["bash", "-n", str(out / name)], capture_output=True).returncode == 0, name


def test_launch_files_without_openai_port_start_no_endpoint(tmp_path):
    out = render(tmp_path, 8, 1, 1, False, 1, 8)
    by_kind = docs(out)
    assert "openai" not in yaml.safe_dump(by_kind["LeaderWorkerSet"])
    assert [p["name"] for p in by_kind["Service"]["spec"]["ports"]] == ["http", "grpc", "metrics"]
    assert 'OPENAI_PORT="${OPENAI_PORT:-}"' in (out / "serve.sh").read_text()


def test_each_replica_sharing_a_node_gets_its_own_openai_endpoint(tmp_path):
    """Two TP4 replicas on one node: endpoint i on 9000+10i talks to Triton i's gRPC port 8001+10i, every step of
    slurm.sbatch too (stand-in python3/tritonserver/srun)."""
    deploy = _package(tmp_path, 4, 1, 1, False, 1, 8, openai_port=9000)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_bin(bin_dir, "python3", '[ "$1" = -c ] && exit 0\necho "$*" >> "$LOG.openai"; sleep 1\n')
    _fake_bin(bin_dir, "tritonserver", 'sleep 1\n')
    proc = subprocess.run(["bash", str(deploy / "package/launch/serve.sh")], capture_output=True, text=True,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", "LOG": str(tmp_path / "log")}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    time.sleep(0.5)
    lines = sorted((tmp_path / "log.openai").read_text().splitlines())
    assert [re.search(r"--port (\d+) --triton-url (\S+)", l).groups() for l in lines] == [
        ("9000", "127.0.0.1:8001"), ("9010", "127.0.0.1:8011")]
    assert all(f"--repo {deploy}/package/triton_repo" in l for l in lines)
    _fake_bin(bin_dir, "srun", 'echo "$*" >> "$LOG.srun"\n')
    proc = subprocess.run(["bash", str(deploy / "package/launch/slurm.sbatch"), str(deploy)], capture_output=True,
                          text=True, env={"PATH": f"{bin_dir}:/usr/bin:/bin", "LOG": str(tmp_path / "log")},
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    steps = (tmp_path / "log.srun").read_text().splitlines()
    openai = sorted(s for s in steps if "--overlap" in s)
    assert len(openai) == 2 and all("--relative=0" in s for s in openai)
    assert {re.search(r"--port (\d+)", s).group(1) for s in openai} == {"9000", "9010"}


@pytest.mark.parametrize("args, words", [
    (["--colour", "red"], "unknown argument --colour"),
    (["--openai-port", "90x"], "--openai-port must be a port number"),
    (["--openai-port", "9000"], "needs dsbuild in this container"),
    (["--openai-port=9000"], "needs dsbuild in this container"),
])
def test_serve_sh_arguments(tmp_path, args, words):
    """A python3 without dsbuild (the system one, run away from this checkout) stops serve.sh before Triton."""
    deploy = _package(tmp_path, 8, 1, 1, False, 1, 8)
    proc = subprocess.run(["bash", str(deploy / "package/launch/serve.sh"), *args], capture_output=True, text=True,
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr
