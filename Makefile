# The two commands of the README: `make run` (the main job) and `make test` (the tests).
# Both set up what they need on a fresh machine (virtualenv, install, base model) and are
# idempotent: a second run only re-does what changed.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.temper-installed
# torch stays at the CPU build that is on the machine: see constraints.txt.
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_DISABLE_TELEMETRY := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[dev]'
	touch $@

install: $(STAMP)

## The main job: every DVC stage on the embedded defaults (no API key, GPU or model hub).
run: install
	dvc repro

## The tests, slow end-to-end ones included (they use the real base model and data).
test: lint
	pytest

## ruff: the linter and the formatter (check only; `ruff format .` fixes the formatting).
lint: install
	ruff check .
	ruff format --check .

clean:
	rm -rf $(VENV) models data/prepared data/distilled metrics reports mlflow.db mlruns
