#!/usr/bin/env bash
# dsbuild: Open MPI's rsh agent for Kubernetes (mpirun -mca plm_rsh_agent kubexec.sh): instead of ssh, start the
# command in the named pod with `kubectl exec` — the start-up of LeaderWorkerSet's own TensorRT-LLM example, which
# needs no sshd and no keys, only a ServiceAccount allowed to exec into pods (lws.yaml carries it). Open MPI calls it
# like ssh: AGENT [ssh options] HOST COMMAND...; HOST is a pod's DNS name <pod>.<subdomain>.<namespace>.
set -euo pipefail
while [ "$#" -gt 0 ]; do
  case "$1" in
    -p|-l|-i|-o|-F|-E|-b|-c|-J|-L|-R|-S|-W|-w) shift 2 ;;  # ssh options with a value
    -*) shift ;;
    *) break ;;
  esac
done
if [ "$#" -lt 2 ]; then
  echo "kubexec.sh: usage: kubexec.sh [ssh options] HOST COMMAND..." >&2
  exit 2
fi
host="$1"
shift
exec kubectl exec -i --namespace "${POD_NAMESPACE:?POD_NAMESPACE is not set}" -c server "${host%%.*}" -- \
  /bin/bash -c "$*"
