# dsbuild: a thin veneer over the `dsbuild` CLI; all logic lives in Python.
.DELETE_ON_ERROR:
.PHONY: engine test test-full serve bench push clean distclean setup help

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= tiny
TP     ?= 2
PP     ?= 2
EP     ?= 1
QUANT  ?= fp8
SPEC   ?= none
DRAFT_LEN ?= 3
GPU    ?=
NODES  ?= 1
GPUS_PER_NODE ?=
OUT    ?=
DSBUILD_FLAGS ?=

# Optional flags only when set, so the CLI's own defaults (and --config / DSBUILD_* env) still apply.
RUN_FLAGS := --model $(MODEL) --tp $(TP) --pp $(PP) --ep $(EP) --quant $(QUANT) --spec $(SPEC) \
             --draft-len $(DRAFT_LEN) --nodes $(NODES) \
             $(if $(GPU),--gpu $(GPU)) $(if $(GPUS_PER_NODE),--gpus-per-node $(GPUS_PER_NODE)) \
             $(if $(OUT),--out $(OUT)) $(if $(DRAFT_MODEL),--draft-model $(DRAFT_MODEL)) $(DSBUILD_FLAGS)

help:
	@echo "make engine [MODEL=tiny TP=2 PP=2 EP=1 QUANT=fp8 GPU= NODES=1 GPUS_PER_NODE= OUT=]  whole pipeline"
	@echo "            [SPEC=none|mtp|draft DRAFT_LEN=3 DRAFT_MODEL=tiny-draft|hub-id|dir]  speculative decoding"
	@echo "make test        fast test suite;   make test-full   everything"
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

clean:
	rm -rf build

distclean: clean
	rm -rf $(VENV)
