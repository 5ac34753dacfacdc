#!/usr/bin/env bash
# dsbuild 0.1.0: serve run deepseek-v3.2-fp8-tp8pp2ep1 with Triton + TensorRT-LLM 1.2.1 on bare hosts.
# Deployment tp8pp2ep1: 1 replica(s) of 16 rank(s), each on 2 node(s) x
# 8 GPU(s); 1 replica(s) per node.
# Run it inside nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3 with the deploy directory mounted anywhere, e.g.
#   docker run --rm --gpus all --ipc=host --shm-size=16g --ulimit memlock=-1 --net=host \
#     -v /srv/deploy:/deploy nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3 bash /deploy/package/launch/serve.sh
# The deploy directory is --deploy-dir DIR, else $DSBUILD_DEPLOY_DIR, else the directory holding package/.
# One-node replicas: run it on every node; it starts that node's replica(s), each on its own GPUs and ports
# (replica slot s serves HTTP/gRPC/metrics on 8000+10s/8001+10s/8002+10s). Multi-node replicas: run it on the first
# node of each replica with --hosts HOST1,HOST2,... (that replica's nodes, this one first); its ranks start through
# mpirun (ssh between the hosts) and trtllm-llmapi-launch, and rank 0 runs tritonserver.
set -euo pipefail

REPLICAS=1
NODES_PER_REPLICA=2
GPUS_PER_NODE=8
SLOTS_PER_NODE=1
WORLD_SIZE=16

USAGE="usage: serve.sh [--deploy-dir DIR] [--hosts HOST1,HOST2,...] [--openai-port N]"
usage() { echo "serve.sh: $1 ($USAGE)" >&2; exit 2; }
DEPLOY_DIR="${DSBUILD_DEPLOY_DIR:-}"
HOSTS="${HOSTS:-}"
# Optional: dsbuild's OpenAI-compatible endpoint beside each replica's Triton (--openai-port N, or OPENAI_PORT=N;
# replica slot s serves it on N+10s).
OPENAI_PORT="${OPENAI_PORT:-}"
while [ "$#" -gt 0 ]; do
  case "$1" in
    --deploy-dir) [ "$#" -ge 2 ] || usage "--deploy-dir needs a directory"; DEPLOY_DIR="$2"; shift 2 ;;
    --hosts) [ "$#" -ge 2 ] || usage "--hosts needs a host list"; HOSTS="$2"; shift 2 ;;
    --openai-port) [ "$#" -ge 2 ] || usage "--openai-port needs a port"; OPENAI_PORT="$2"; shift 2 ;;
    --openai-port=*) OPENAI_PORT="${1#*=}"; shift ;;
    *) usage "unknown argument $1" ;;
  esac
done
case "$OPENAI_PORT" in
  ''|[0-9]|[0-9][0-9]|[0-9][0-9][0-9]|[0-9][0-9][0-9][0-9]|[0-9][0-9][0-9][0-9][0-9]) ;;
  *) usage "--openai-port must be a port number" ;;
esac
if [ -z "$DEPLOY_DIR" ]; then
  DEPLOY_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)"
fi
DEPLOY_DIR="$(cd -- "$DEPLOY_DIR" && pwd)"
REPO="$DEPLOY_DIR/package/triton_repo"
if [ ! -d "$REPO" ]; then
  echo "serve.sh: $DEPLOY_DIR is not a dsbuild deployment (no package/triton_repo); pass --deploy-dir" >&2
  exit 2
fi
export DSBUILD_DEPLOY_DIR="$DEPLOY_DIR"  # model.py resolves model.yaml's paths under it

start_openai() {  # start_openai OFFSET: the endpoint for the replica whose Triton serves on ports + OFFSET
  [ -n "$OPENAI_PORT" ] || return 0
  python3 -c 'import triton_repo.openai_api.app' || { echo "serve.sh: the OpenAI endpoint needs dsbuild in this container: pip install --no-deps <dsbuild checkout> && pip install 'tritonclient[grpc]' starlette 'uvicorn[standard]' (docs/serving-openai.md)" >&2; exit 2; }
  python3 -m builder.cli openai --repo "$REPO" --host 0.0.0.0 --port "$(( OPENAI_PORT + $1 ))" --triton-url "127.0.0.1:$(( 8001 + $1 ))" &
}

server_args() {  # server_args SLOT: tritonserver's arguments for replica slot SLOT, in ARGS (one word each)
  local offset=$(( $1 * 10 ))
  ARGS=(--model-repository="$REPO" --http-port=$(( 8000 + offset )) --grpc-port=$(( 8001 + offset ))
        --metrics-port=$(( 8002 + offset )) --exit-on-error=false)
}

if [ "$NODES_PER_REPLICA" -eq 1 ]; then
  if [ "$SLOTS_PER_NODE" -eq 1 ]; then
    start_openai 0
    server_args 0
    exec tritonserver "${ARGS[@]}"
  fi
  pids=()
  for slot in $(seq 0 $(( SLOTS_PER_NODE - 1 ))); do
    first=$(( slot * GPUS_PER_NODE ))
    start_openai $(( slot * 10 ))
    server_args "$slot"
    CUDA_VISIBLE_DEVICES="$(seq -s, "$first" $(( first + GPUS_PER_NODE - 1 )))" tritonserver "${ARGS[@]}" &
    pids+=("$!")
  done
  trap 'kill "${pids[@]}" 2>/dev/null' TERM INT
  wait -n
  status=$?
  kill "${pids[@]}" 2>/dev/null || true
  exit "$status"
fi

if [ -z "$HOSTS" ]; then
  echo "serve.sh: a replica needs $NODES_PER_REPLICA nodes; pass --hosts HOST1,HOST2,... (or use slurm.sbatch / lws.yaml)" >&2
  exit 2
fi
HOSTLIST=""
COUNT=0
IFS=',' read -r -a HOST_ARRAY <<< "$HOSTS"
for h in "${HOST_ARRAY[@]}"; do
  HOSTLIST="${HOSTLIST:+$HOSTLIST,}$h:$GPUS_PER_NODE"
  COUNT=$((COUNT + 1))
done
if [ "$COUNT" -ne "$NODES_PER_REPLICA" ]; then
  echo "serve.sh: --hosts lists $COUNT hosts, a replica needs $NODES_PER_REPLICA" >&2
  exit 2
fi
start_openai 0  # rank 0 (tritonserver) runs on this host, the first of --hosts
server_args 0
exec mpirun --allow-run-as-root -H "$HOSTLIST" -n "$WORLD_SIZE" -x DSBUILD_DEPLOY_DIR \
  trtllm-llmapi-launch tritonserver "${ARGS[@]}"
