"""Launch files for a packaged run: one node (``serve.sh``), Slurm (``slurm.sbatch``) and Kubernetes
(``lws.yaml``: a LeaderWorkerSet plus the Service in front of its leader).

GPU counts: TensorRT-LLM runs one rank per GPU and ``world = tp x pp`` (attention-DP reuses the TP ranks for
data-parallel attention, so it changes nothing here; EP splits experts inside the TP group). The ranks are spread
evenly over the nodes, so ``world`` must divide by the node count and each node's share must fit its GPUs.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from builder.errors import LayoutError
from builder.layout import Layout
from builder.trtllm.container import INSTALL_DSBUILD, INSTALL_OPENAI_DEPS

DEFAULT_GPUS_PER_NODE = 8
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"


@dataclass(frozen=True)
class Topology:
    world_size: int
    nodes: int
    gpus_per_node: int  # GPUs (= ranks) used on each node
    node_gpus: int  # GPUs each node has

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


def topology(layout: Layout, *, nodes: int, node_gpus: int | None) -> Topology:
    world = layout.world_size
    have = node_gpus or DEFAULT_GPUS_PER_NODE
    if world % nodes:
        raise LayoutError(f"{world} ranks (TP {layout.tp} x PP {layout.pp}) cannot be spread evenly over {nodes} nodes")
    per_node = world // nodes
    if per_node > have:
        raise LayoutError(f"{world} ranks over {nodes} node(s) need {per_node} GPUs per node, but nodes have {have}; "
                          f"use --nodes {-(-world // have)} or more")
    return Topology(world_size=world, nodes=nodes, gpus_per_node=per_node, node_gpus=have)


def slurm_extra(*, partition: str | None, account: str | None) -> str:
    lines = []
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    return "\n".join(lines) if lines else "# (no partition/account given: the cluster's defaults apply)"


def openai_command(*, repo: str, port: str, triton_url: str) -> str:
    """The shell command that starts dsbuild's OpenAI-compatible endpoint beside Triton (all launch files use
    it). It binds every interface, as tritonserver's own ports do in these launch files."""
    return (f"python3 -m builder.cli openai --repo {repo} --host 0.0.0.0 --port {port} "
            f"--triton-url {triton_url}")


OPENAI_MISSING = (f"the OpenAI endpoint needs dsbuild in this container: {INSTALL_DSBUILD} && {INSTALL_OPENAI_DEPS} "
                  "(docs/serving-openai.md)")


def k8s_name(run_name: str) -> str:
    """A DNS-1035 label from the run name (LWS names become pod and service host names)."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"dsbuild-{run_name}".lower()).strip("-")
    return name[:40].rstrip("-")


def lws_manifests(*, run_name: str, topo: Topology, image: str, deploy_dir: str, model_path: str, pvc: str,
                  namespace: str | None = None, openai_port: int | None = None) -> list[dict[str, Any]]:
    """The LeaderWorkerSet (group size = nodes, one pod per node with its GPUs) and the leader's Service.

    The leader pod runs ``mpirun`` over the group (workers wait in ``sshd``) with ``trtllm-llmapi-launch
    tritonserver``; a one-node layout runs ``tritonserver`` directly. The run directory comes from a shared
    ReadWriteMany volume mounted at the same path in every pod, so ``model.yaml``'s paths hold as written.
    ``openai_port``: the leader also runs dsbuild's OpenAI-compatible endpoint, exposed by the Service.
    """
    name = k8s_name(run_name)
    labels = {"app.kubernetes.io/name": "dsbuild", "app.kubernetes.io/instance": name}
    repo = f"{deploy_dir}/package/triton_repo"
    server = (f"tritonserver --model-repository={repo} --http-port={HTTP_PORT} --grpc-port={GRPC_PORT} "
              f"--metrics-port={METRICS_PORT} --exit-on-error=false")
    openai = ""
    if openai_port:
        command = openai_command(repo=repo, port=str(openai_port), triton_url=f"127.0.0.1:{GRPC_PORT}")
        openai = (f"python3 -c 'import triton_repo.openai_api.app' || {{ echo \"{OPENAI_MISSING}\" >&2; exit 2; }}\n"
                  f"{command} &\n")
    if topo.nodes == 1:
        leader_script = f"{openai}exec {server}"
    else:
        # Worker pods are <lws>-<group>-<i>.<lws>.<ns>; the leader is <lws>-<group>.<lws>.<ns> (LWS_LEADER_ADDRESS).
        leader_script = "\n".join([
            "set -euo pipefail",
            f'HOSTS="$LWS_LEADER_ADDRESS:{topo.gpus_per_node}"',
            "i=1",
            'while [ "$i" -lt "$LWS_GROUP_SIZE" ]; do',
            f'  HOSTS="$HOSTS,${{LWS_LEADER_ADDRESS/./-$i.}}:{topo.gpus_per_node}"',
            "  i=$((i + 1))",
            "done",
            *openai.splitlines(),
            f"exec mpirun --allow-run-as-root -H \"$HOSTS\" -n {topo.world_size} trtllm-llmapi-launch {server}",
        ])
    worker_script = "set -euo pipefail\nmkdir -p /run/sshd\nexec /usr/sbin/sshd -D -e"
    volumes = [
        {"name": "run", "persistentVolumeClaim": {"claimName": pvc}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}},
    ]
    mounts = [{"name": "run", "mountPath": deploy_dir}, {"name": "shm", "mountPath": "/dev/shm"}]
    if not model_path.startswith(deploy_dir.rstrip("/") + "/"):
        mounts.append({"name": "run", "mountPath": model_path, "subPath": Path(model_path).name, "readOnly": True})
    resources = {"limits": {"nvidia.com/gpu": topo.gpus_per_node}, "requests": {"nvidia.com/gpu": topo.gpus_per_node}}

    def pod(role: str, script: str, *, ports: bool) -> dict[str, Any]:
        container: dict[str, Any] = {
            "name": role, "image": image, "command": ["bash", "-c", script], "resources": copy.deepcopy(resources),
            "volumeMounts": copy.deepcopy(mounts), "env": [{"name": "NCCL_DEBUG", "value": "WARN"}],
        }
        if ports:
            container["ports"] = [{"name": "http", "containerPort": HTTP_PORT},
                                  {"name": "grpc", "containerPort": GRPC_PORT},
                                  {"name": "metrics", "containerPort": METRICS_PORT}]
            if openai_port:
                container["ports"].append({"name": "openai", "containerPort": openai_port})
            container["readinessProbe"] = {"httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT},
                                           "periodSeconds": 10, "failureThreshold": 3}
            container["startupProbe"] = {"httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT},
                                         "periodSeconds": 30, "failureThreshold": 240}  # first load can take an hour
        return {"metadata": {"labels": {**labels, "dsbuild/role": role}},
                "spec": {"containers": [container], "volumes": copy.deepcopy(volumes)}}

    meta: dict[str, Any] = {"name": name, "labels": labels}
    if namespace:
        meta["namespace"] = namespace
    lws_spec: dict[str, Any] = {"size": topo.nodes, "restartPolicy": "RecreateGroupOnPodRestart",
                                "workerTemplate": pod("worker" if topo.nodes > 1 else "leader",
                                                      worker_script if topo.nodes > 1 else leader_script,
                                                      ports=topo.nodes == 1)}
    if topo.nodes > 1:
        lws_spec["leaderTemplate"] = pod("leader", leader_script, ports=True)
    lws = {"apiVersion": LWS_API_VERSION, "kind": "LeaderWorkerSet", "metadata": meta,
           "spec": {"replicas": 1, "leaderWorkerTemplate": lws_spec}}
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": dict(meta),
        "spec": {"selector": {**labels, "leaderworkerset.sigs.k8s.io/worker-index": "0"},
                 "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": HTTP_PORT},
                           {"name": "grpc", "port": GRPC_PORT, "targetPort": GRPC_PORT},
                           {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT}]},
    }
    if openai_port:
        service["spec"]["ports"].append({"name": "openai", "port": openai_port, "targetPort": openai_port})
    return [lws, service]


def dump_manifests(docs: list[dict[str, Any]], header: str) -> str:
    body = "---\n".join(yaml.safe_dump(d, sort_keys=False, width=120) for d in docs)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body
