# Two commands: `make repro` (set up, then run the pipeline) and `make test` (set up, then test).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist

# dvc.yaml's `python -m stages.X` must find the venv's interpreter
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup dataset repro ablation test bench clean

setup: $(STAMP) dataset

# Idempotent: reinstalls only when the pins change.
# The pinned torch is the CUDA build (what the local wheel store holds): .venv takes about 6.6 GiB.
# A first install checks the space first, so a full disk is one clear line, not a pip OSError half-way.
NEED_MIB := 7168

$(STAMP): pyproject.toml requirements.lock
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1024)}'); \
	if [ ! -x $(BIN)/python ] && [ "$$free" -lt $(NEED_MIB) ]; then \
	  echo "setup: $$free MiB free in $(CURDIR); .venv needs about $(NEED_MIB) MiB (torch 2.14.1 with its CUDA libraries). Free some space, then rerun." >&2; \
	  exit 1; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

dataset:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist); \
	  else \
	    echo "Fashion-MNIST is not installed offline; run: sudo apt-get install -y dataset-fashion-mnist"; \
	    echo "(without it the download stage fetches the files from the network)"; \
	  fi; \
	fi

repro: setup
	$(BIN)/dvc repro

# The multi-space ablation (ablation/dvc.yaml): the default sweep again on single-space latents.
ablation: setup
	$(BIN)/dvc repro ablation/dvc.yaml

# Two xdist workers per core count: the end-to-end and Ray tests spend much of their time
# waiting on process start-up, so a second worker runs the unit tests meanwhile. loadfile
# keeps each file's tests (and its shared tiny repo or Ray cluster) on one worker.
test: setup
	$(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder --durations=10 tests

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf data models results metrics plots
