"""Shared fixtures: the real base model and a small real prepared dataset, built once per run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from temper.params import TemperParams

# Nothing in the tests may reach a hub or phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]

# Fixtures that load or build the real base model (or run a stage on it): a test using one
# must be marked slow, so that `pytest -m "not slow"` stays fast.
REAL_MODEL_FIXTURES = {"base_model_dir", "prepared_dir"}


def pytest_collection_modifyitems(config, items):
    unmarked = [
        item.nodeid
        for item in items
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("slow") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "these use the real model but are not marked slow: " + ", ".join(unmarked)
        )


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a safetensors folder (`models/base`, built if absent)."""
    from temper.stages import base_model

    cfg = base_model.ModelConfig(dir=str(ROOT / "models" / "base"))
    if not (Path(cfg.dir) / "temper_source.json").exists():
        base_model.run(cfg)
    return Path(cfg.dir)


@pytest.fixture(scope="session")
def task():
    from temper.task import load_task

    return load_task(ROOT / "configs" / "tasks" / "clause_review.yaml")


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, base_model_dir, task) -> Path:
    """A small prepared dataset from the real CUAD files (train 64, validation 32, test 32)."""
    from temper.config import load_params
    from temper.stages.prepare import run

    out = tmp_path_factory.mktemp("prepared")
    params = load_params(ROOT / "params.yaml")
    cfg = TemperParams.of(params).prepare.model_copy(
        update={
            "sources": [str(ROOT / s) for s in params["prepare"]["sources"]],
            "out_dir": str(out),
            "metrics": str(out / "prepare.json"),
            "max_examples": {"train": 64, "validation": 32, "test": 32},
        }
    )
    run(cfg, task, base_model_dir)
    return out
