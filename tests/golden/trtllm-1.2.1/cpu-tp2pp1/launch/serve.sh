#!/usr/bin/env bash
# dsbuild 0.1.0: serve run tiny-fp8-tp2pp1ep1 (CPU flavour, layout tp2pp1ep1: 2 engine ranks as
# processes on this host) with the tritonserver from the nvidia-pytriton wheel.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec dsbuild serve --repo "$HERE/../triton_repo" "$@"
