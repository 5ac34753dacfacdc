#!/usr/bin/env bash
# dsbuild 0.1.0: serve run deepseek-v3.2-fp8-tp8pp2ep1 with Triton + TensorRT-LLM 1.2.1.
# Layout tp8pp2ep1: 16 ranks = 2 node(s) x 8 GPU(s).
# Run inside nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3, with /shared/dsbuild/deepseek-v3.2-fp8-tp8pp1ep8 mounted at the same path, e.g.
#   docker run --rm --gpus all --ipc=host --shm-size=16g --ulimit memlock=-1 --net=host \
#     -v /shared/dsbuild/deepseek-v3.2-fp8-tp8pp1ep8:/shared/dsbuild/deepseek-v3.2-fp8-tp8pp1ep8 nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3 bash /shared/dsbuild/deepseek-v3.2-fp8-tp8pp1ep8/package/launch/serve.sh
# One node: tritonserver starts the LLM API, which spawns its own worker per GPU. Several nodes: list them in
# HOSTS (host1,host2,...) and the ranks start through mpirun + trtllm-llmapi-launch (rank 0 runs tritonserver).
set -euo pipefail

REPO="/shared/dsbuild/deepseek-v3.2-fp8-tp8pp1ep8/package/triton_repo"
NODES=2
GPUS_PER_NODE=8
WORLD_SIZE=16
HTTP_PORT="${HTTP_PORT:-8000}"
GRPC_PORT="${GRPC_PORT:-8001}"
METRICS_PORT="${METRICS_PORT:-8002}"
SERVER_ARGS=(--model-repository="$REPO" --http-port="$HTTP_PORT" --grpc-port="$GRPC_PORT"
             --metrics-port="$METRICS_PORT" --exit-on-error=false)

# Optional: dsbuild's OpenAI-compatible endpoint beside Triton (serve.sh --openai-port N, or OPENAI_PORT=N).
OPENAI_PORT="${OPENAI_PORT:-}"
while [ "$#" -gt 0 ]; do
  case "$1" in
    --openai-port) OPENAI_PORT="${2:?--openai-port needs a port}"; shift 2 ;;
    --openai-port=*) OPENAI_PORT="${1#*=}"; shift ;;
    *) echo "serve.sh: unknown argument $1 (usage: serve.sh [--openai-port N])" >&2; exit 2 ;;
  esac
done
start_openai() {  # $1: the host of Triton's rank 0
  [ -n "$OPENAI_PORT" ] || return 0
  python3 -c 'import triton_repo.openai_api.app' || { echo "serve.sh: the OpenAI endpoint needs dsbuild in this container: pip install --no-deps <dsbuild checkout> && pip install 'tritonclient[grpc]' starlette 'uvicorn[standard]' (docs/serving-openai.md)" >&2; exit 2; }
  python3 -m builder.cli openai --repo "$REPO" --host 0.0.0.0 --port "$OPENAI_PORT" --triton-url "$1:$GRPC_PORT" &
}

if [ "$NODES" -eq 1 ]; then
  start_openai 127.0.0.1
  exec tritonserver "${SERVER_ARGS[@]}"
fi

if [ -z "${HOSTS:-}" ]; then
  echo "serve.sh: this layout needs $NODES nodes; set HOSTS=host1,host2,... (or use slurm.sbatch / lws.yaml)" >&2
  exit 2
fi
HOSTLIST=""
COUNT=0
IFS=',' read -r -a HOST_ARRAY <<< "$HOSTS"
for h in "${HOST_ARRAY[@]}"; do
  HOSTLIST="${HOSTLIST:+$HOSTLIST,}$h:$GPUS_PER_NODE"
  COUNT=$((COUNT + 1))
done
if [ "$COUNT" -ne "$NODES" ]; then
  echo "serve.sh: HOSTS lists $COUNT hosts, this layout needs $NODES" >&2
  exit 2
fi
start_openai "${HOST_ARRAY[0]}"
exec mpirun --allow-run-as-root -H "$HOSTLIST" -n "$WORLD_SIZE" \
  trtllm-llmapi-launch tritonserver "${SERVER_ARGS[@]}"
