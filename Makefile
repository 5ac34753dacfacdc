# dsbuild: a thin veneer over the `dsbuild` CLI; all logic lives in Python.
.DELETE_ON_ERROR:
.PHONY: engine test test-full hardening serve bench bench-report push clean distclean setup help

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= tiny
TP     ?= 2
PP     ?= 2
EP     ?= 1
ADP    ?=
QUANT  ?= fp8
SPEC   ?= none
DRAFT_LEN ?= 3
GPU    ?=
NODES  ?= 1
GPUS_PER_NODE ?=
OUT    ?=
DSBUILD_FLAGS ?=
# make push: RUN (default build/latest) to oci://$(REGISTRY)/$(REPO)[:$(TAG)]; PLAIN_HTTP=1 for a plain-HTTP registry,
# INSECURE=1 for TLS without certificate verification (oras's --plain-http and --insecure).
RUN      ?= build/latest
REGISTRY ?=
REPO     ?= dsbuild
TAG      ?=
PLAIN_HTTP ?=
INSECURE ?=
PUSH_FLAGS ?=

# Optional flags only when set, so the CLI's own defaults (and --config / DSBUILD_* env) still apply.
RUN_FLAGS := --model $(MODEL) --tp $(TP) --pp $(PP) --ep $(EP) --quant $(QUANT) --spec $(SPEC) \
             --draft-len $(DRAFT_LEN) --nodes $(NODES) \
             $(if $(ADP),--attention-dp) $(if $(GPU),--gpu $(GPU)) $(if $(GPUS_PER_NODE),--gpus-per-node $(GPUS_PER_NODE)) \
             $(if $(OUT),--out $(OUT)) $(if $(DRAFT_MODEL),--draft-model $(DRAFT_MODEL)) $(DSBUILD_FLAGS)

help:
	@echo "make engine [MODEL=tiny TP=2 PP=2 EP=1 ADP=1 QUANT=fp8 GPU= NODES=1 GPUS_PER_NODE= OUT=]  whole pipeline"
	@echo "            [SPEC=none|mtp|draft DRAFT_LEN=3 DRAFT_MODEL=tiny-draft|hub-id|dir]  speculative decoding"
	@echo "make push REGISTRY=host[:port] [REPO=dsbuild TAG= RUN=build/latest PLAIN_HTTP=1 PUSH_FLAGS=--include-weights]"
	@echo "make test        fast test suite;   make test-full   everything"
	@echo "make serve       serve build/latest with tritonserver on 127.0.0.1 [SERVE_FLAGS=--http-port ...]"
	@echo "make bench       serve build/latest, benchmark it into build/latest/bench/ [BENCH_FLAGS=...]"
	@echo "make bench-report  every benchmark BENCH_REPEATS=3 times -> docs/benchmarks.md and the figures README/docs quote"
	@echo "                  [BENCH_ONLY=plan,engine,serve,push,fetch,quantize,train]"
	@echo "make clean       remove build/;     make distclean   also the virtualenv"

# The virtualenv is (re)installed whenever pyproject.toml changes.
$(BIN)/dsbuild: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/dsbuild

engine: $(BIN)/dsbuild
	$(BIN)/dsbuild run $(RUN_FLAGS)

test: $(BIN)/dsbuild
	$(BIN)/python -m pytest -q -m "not slow" -n 2 --dist loadgroup

test-full: $(BIN)/dsbuild
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

# Serve the latest run's Triton repository on 127.0.0.1 (HTTP 8000, gRPC 8001, metrics 8002) until Ctrl-C.
SERVE_FLAGS ?=
serve: $(BIN)/dsbuild
	$(BIN)/dsbuild serve --repo build/latest/package/triton_repo $(SERVE_FLAGS)

push: $(BIN)/dsbuild
	@test -n "$(REGISTRY)" || { echo "make push needs REGISTRY=host[:port] (e.g. REGISTRY=127.0.0.1:5000 PLAIN_HTTP=1)"; exit 2; }
	$(BIN)/dsbuild push $(RUN) oci://$(REGISTRY)/$(REPO)$(if $(TAG),:$(TAG)) $(if $(PLAIN_HTTP),--plain-http) $(if $(INSECURE),--insecure) $(PUSH_FLAGS)

# Serve build/latest in the background on free ports, benchmark it (results in build/latest/bench/), stop it.
BENCH_FLAGS ?= --concurrency 1,4,16 --isl 64 --osl 32 --num-requests 32
bench: $(BIN)/dsbuild
	$(BIN)/python -m triton_repo.bench.serve_and_bench --run build/latest -- $(BENCH_FLAGS)

# Every benchmark, several times, with the machine's load: docs/benchmarks.md, benchmarks/results/report.json, and
# every <!--fig:...--> figure in README.md and docs/ rewritten from them.
BENCH_ONLY    ?=
BENCH_REPEATS ?= 3
bench-report: $(BIN)/dsbuild
	PYTHONPATH=. $(BIN)/python benchmarks/report.py --repeats $(BENCH_REPEATS) $(if $(BENCH_ONLY),--only $(BENCH_ONLY))

clean:
	rm -rf build

distclean: clean
	rm -rf $(VENV)

# The full hardening suite (bad inputs, kills, concurrency, secrets, fuzz, serving load), then docs/hardening.md
# generated from what it ran.
hardening:
	rm -f .hardening-log.jsonl
	$(BIN)/python -m pytest -q tests/hardening -p no:randomly
	$(BIN)/python -m tests.hardening.report --log .hardening-log.jsonl --out docs/hardening.md
