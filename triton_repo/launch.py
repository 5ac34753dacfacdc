"""Launch files for a packaged run: ``serve.sh`` (one replica on bare hosts), ``slurm.sbatch`` (one job step per
replica) and ``lws.yaml`` (a LeaderWorkerSet with one group per replica, the Service in front of the leaders and, for
multi-node replicas, the RBAC objects its kubectl-exec launcher needs).

The deployment is exactly the plan: ``replicas`` copies of one model replica of ``world = tp x pp`` ranks (one rank per
GPU; attention-DP reuses the TP ranks, EP splits experts inside them). A replica of up to one node's GPUs lives on one
node (several small replicas share a node, each with its own GPUs and ports); a larger one spans
``world / gpus_per_node`` whole nodes, so TP never straddles InfiniBand where the planner put it inside NVLink
(docs/tensorrt-llm-contract.md#C-LAUNCH-1, #C-SLURM-1, #C-LWS-1).

Every path is relative to one deploy directory chosen at launch (argument or ``DSBUILD_DEPLOY_DIR``; default: the
directory holding ``package/``), so a pulled deployment runs unchanged wherever it lands. Every value that reaches a
shell script is shell-quoted by the template; values that land in an ``#SBATCH`` directive or a Kubernetes name are
validated here (``check_value``).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import yaml

from builder.errors import LayoutError
from builder.layout import Layout
from builder.specs import check_value
from builder.trtllm.container import INSTALL_DSBUILD, INSTALL_OPENAI_DEPS

DEFAULT_GPUS_PER_NODE = 8
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
PORT_STRIDE = 10  # replicas sharing a node: slot s serves on 8000+10s, 8001+10s, 8002+10s
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
DEPLOY_MOUNT = "/deploy"  # where the deploy directory is mounted in Kubernetes pods
KUBEXEC = "kubexec.sh"  # Open MPI rsh agent over `kubectl exec` (package/launch/kubexec.sh)
KUBECTL_DIR = "/opt/dsbuild/bin"  # where the init container puts kubectl in multi-node leader pods
GROUP_KEY_LABEL = "leaderworkerset.sigs.k8s.io/group-key"  # LWS pod labels (docs/tensorrt-llm-contract.md#C-LWS-2)
WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"


@dataclass(frozen=True)
class Topology:
    """``replicas`` model replicas of ``world`` ranks; each spans ``nodes_per_replica`` nodes using ``gpus_per_node``
    of their ``node_gpus`` GPUs; ``slots_per_node`` replicas share a node when one needs at most half of it."""

    world_size: int
    replicas: int
    nodes_per_replica: int
    gpus_per_node: int  # GPUs (= ranks) of one replica on each of its nodes
    node_gpus: int  # GPUs each node has
    slots_per_node: int  # replicas per node (1 for a replica of one node or more)

    @property
    def nodes(self) -> int:
        """Nodes the whole deployment occupies."""
        return -(-self.replicas // self.slots_per_node) * self.nodes_per_replica

    @property
    def total_gpus(self) -> int:
        return self.replicas * self.world_size

    def slot(self, replica: int) -> int:
        return replica % self.slots_per_node

    def first_node(self, replica: int) -> int:
        return replica // self.slots_per_node * self.nodes_per_replica


def topology(layout: Layout, *, nodes: int, node_gpus: int | None, replicas: int | None = None) -> Topology:
    """The deployment of ``layout`` on a cluster of ``nodes`` x ``node_gpus``: as many replicas as fit (the plan's
    count) unless ``replicas`` asks for fewer."""
    world = layout.world_size
    have = node_gpus or DEFAULT_GPUS_PER_NODE
    if world <= have:
        per_replica, per_node, slots = 1, world, have // world
    elif world % have:
        raise LayoutError(f"{world} ranks (TP {layout.tp} x PP {layout.pp}) do not fill whole nodes of {have} GPUs; "
                          f"a replica must span whole nodes (choose TP x PP as a multiple of {have})")
    else:
        per_replica, per_node, slots = world // have, have, 1
    fit = nodes // per_replica * slots
    if fit == 0:
        raise LayoutError(f"one replica of {world} ranks needs {per_replica} nodes of {have} GPUs, the cluster has "
                          f"{nodes}; use --nodes {per_replica} or more")
    if replicas is not None and not 1 <= replicas <= fit:
        raise LayoutError(f"--replicas {replicas}: {nodes} node(s) of {have} GPUs hold 1 to {fit} replica(s) of "
                          f"{world} ranks")
    return Topology(world_size=world, replicas=replicas or fit, nodes_per_replica=per_replica,
                    gpus_per_node=per_node, node_gpus=have, slots_per_node=slots)


def slurm_extra(*, partition: str | None, account: str | None) -> str:
    lines = []
    if partition:
        lines.append(f"#SBATCH --partition={check_value('slurm_partition', partition)}")
    if account:
        lines.append(f"#SBATCH --account={check_value('slurm_account', account)}")
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


def lws_manifests(*, run_name: str, topo: Topology, image: str, pvc: str, namespace: str | None = None,
                  kubectl_image: str, openai_port: int | None = None) -> list[dict[str, Any]]:
    """The LeaderWorkerSet (``replicas`` groups of ``nodes_per_replica`` pods, one pod per node with that replica's
    GPUs), the Service in front of every group's leader and, when a replica spans several pods, the ServiceAccount,
    Role and RoleBinding of its launcher.

    Multi-pod start-up follows LWS's own TensorRT-LLM example (docs/tensorrt-llm-contract.md#C-LWS-3): no sshd and no
    keys. The leader waits until its group's pods are ready, then runs Open MPI's ``mpirun`` with
    ``plm_rsh_agent`` = ``package/launch/kubexec.sh``, which starts each remote rank with ``kubectl exec`` into the
    worker pod (kubectl copied in by an init container from ``kubectl_image``; the Role allows ``pods`` get/list and
    ``pods/exec`` create); workers only wait. One pod per replica runs ``tritonserver`` directly.
    ``openai_port``: every leader also runs dsbuild's OpenAI-compatible endpoint, exposed by the Service.
    """
    name = k8s_name(run_name)
    check_value("k8s_pvc", pvc)
    check_value("k8s_namespace", namespace)
    check_value("image", image)
    check_value("k8s_kubectl_image", kubectl_image)
    labels = {"app.kubernetes.io/name": "dsbuild", "app.kubernetes.io/instance": name}
    multi = topo.nodes_per_replica > 1
    repo = f"{DEPLOY_MOUNT}/package/triton_repo"
    server = (f"tritonserver --model-repository={repo} --http-port={HTTP_PORT} --grpc-port={GRPC_PORT} "
              f"--metrics-port={METRICS_PORT} --exit-on-error=false")
    openai: list[str] = []
    if openai_port:
        command = openai_command(repo=repo, port=str(openai_port), triton_url=f"127.0.0.1:{GRPC_PORT}")
        openai = [f"python3 -c 'import triton_repo.openai_api.app' || {{ echo \"{OPENAI_MISSING}\" >&2; exit 2; }}",
                  f"{command} &"]
    if not multi:
        leader_script = "\n".join([*openai, f"exec {server}"])
    else:
        gpus = topo.gpus_per_node
        leader_script = "\n".join([
            "set -euo pipefail",
            f'export PATH="{KUBECTL_DIR}:$PATH"',
            "# Every worker pod of this group (one per node) created and ready: the ranks are started into them by",
            "# kubectl exec. Not the leader itself: its readiness is tritonserver's, which starts below.",
            f'WORKERS="{GROUP_KEY_LABEL}=$GROUP_KEY,{WORKER_INDEX_LABEL}!=0"',
            'until [ "$(kubectl get pods --namespace "$POD_NAMESPACE" -l "$WORKERS" --no-headers | wc -l)" '
            '-ge $((LWS_GROUP_SIZE - 1)) ]; do sleep 5; done',
            'kubectl wait pod --namespace "$POD_NAMESPACE" --for=condition=Ready --timeout=3600s -l "$WORKERS"',
            f'HOSTS="$LWS_LEADER_ADDRESS:{gpus}"',
            "i=1",
            'while [ "$i" -lt "$LWS_GROUP_SIZE" ]; do',
            f'  HOSTS="$HOSTS,${{LWS_LEADER_ADDRESS/./-$i.}}:{gpus}"  # worker i: <leader>-<i>.<subdomain>.<ns>',
            "  i=$((i + 1))",
            "done",
            *openai,
            f"exec mpirun --allow-run-as-root -mca plm_rsh_agent {DEPLOY_MOUNT}/package/launch/{KUBEXEC} "
            f'-np {topo.world_size} --host "$HOSTS" -x DSBUILD_DEPLOY_DIR trtllm-llmapi-launch {server}',
        ])
    worker_script = "trap 'exit 0' TERM INT\nwhile true; do sleep 3600 & wait $!; done"
    volumes = [
        {"name": "deploy", "persistentVolumeClaim": {"claimName": pvc}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}},
    ]
    mounts = [{"name": "deploy", "mountPath": DEPLOY_MOUNT}, {"name": "shm", "mountPath": "/dev/shm"}]
    resources = {"limits": {"nvidia.com/gpu": topo.gpus_per_node}, "requests": {"nvidia.com/gpu": topo.gpus_per_node}}
    env = [{"name": "DSBUILD_DEPLOY_DIR", "value": DEPLOY_MOUNT}, {"name": "NCCL_DEBUG", "value": "WARN"}]
    downward = [
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "GROUP_KEY", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.labels['{GROUP_KEY_LABEL}']"}}},
    ]

    def pod(role: str, script: str, *, serves: bool, launcher: bool) -> dict[str, Any]:
        container: dict[str, Any] = {
            "name": "server", "image": image, "command": ["bash", "-c", script],
            "resources": copy.deepcopy(resources), "volumeMounts": copy.deepcopy(mounts),
            "env": copy.deepcopy(env) + (copy.deepcopy(downward) if launcher else []),
        }
        spec: dict[str, Any] = {"containers": [container], "volumes": copy.deepcopy(volumes)}
        if serves:
            container["ports"] = [{"name": "http", "containerPort": HTTP_PORT},
                                  {"name": "grpc", "containerPort": GRPC_PORT},
                                  {"name": "metrics", "containerPort": METRICS_PORT}]
            if openai_port:
                container["ports"].append({"name": "openai", "containerPort": openai_port})
            container["readinessProbe"] = {"httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT},
                                           "periodSeconds": 10, "failureThreshold": 3}
            container["startupProbe"] = {"httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT},
                                         "periodSeconds": 30, "failureThreshold": 240}  # first load can take an hour
        if launcher:
            spec["serviceAccountName"] = name
            spec["volumes"].append({"name": "kubectl", "emptyDir": {}})
            container["volumeMounts"].append({"name": "kubectl", "mountPath": KUBECTL_DIR})
            spec["initContainers"] = [{
                "name": "kubectl", "image": kubectl_image,
                "command": ["sh", "-c", f'cp "$(command -v kubectl)" {KUBECTL_DIR}/kubectl'],
                "volumeMounts": [{"name": "kubectl", "mountPath": KUBECTL_DIR}],
            }]
        return {"metadata": {"labels": {**labels, "dsbuild/role": role}}, "spec": spec}

    meta: dict[str, Any] = {"name": name, "labels": labels}
    if namespace:
        meta["namespace"] = namespace
    lws_spec: dict[str, Any] = {"size": topo.nodes_per_replica, "restartPolicy": "RecreateGroupOnPodRestart"}
    if multi:
        lws_spec["leaderTemplate"] = pod("leader", leader_script, serves=True, launcher=True)
        lws_spec["workerTemplate"] = pod("worker", worker_script, serves=False, launcher=False)
    else:
        lws_spec["workerTemplate"] = pod("leader", leader_script, serves=True, launcher=False)
    lws = {"apiVersion": LWS_API_VERSION, "kind": "LeaderWorkerSet", "metadata": meta,
           "spec": {"replicas": topo.replicas, "leaderWorkerTemplate": lws_spec}}
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": copy.deepcopy(meta),
        "spec": {"selector": {**labels, WORKER_INDEX_LABEL: "0"},
                 "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": HTTP_PORT},
                           {"name": "grpc", "port": GRPC_PORT, "targetPort": GRPC_PORT},
                           {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT}]},
    }
    if openai_port:
        service["spec"]["ports"].append({"name": "openai", "port": openai_port, "targetPort": openai_port})
    docs = [lws, service]
    if multi:
        docs += [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": copy.deepcopy(meta)},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": copy.deepcopy(meta),
             "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                       {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": copy.deepcopy(meta),
             "subjects": [{"kind": "ServiceAccount", "name": name, **({"namespace": namespace} if namespace else {})}],
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}},
        ]
    return docs


def dump_manifests(docs: list[dict[str, Any]], header: str) -> str:
    body = "---\n".join(yaml.safe_dump(d, sort_keys=False, width=120) for d in docs)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body
