"""What every command shares: the params sections, the options, logging, errors."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import (
    ConfigError,
    Params,
    Section,
    load_params,
    section,
)
from ..engines.vllm_server import VllmConfig
from ..evaluation.config import EvaluateConfig
from ..evaluation.gates import GatesConfig
from ..evaluation.judge import JudgeConfig
from ..online.cache.config import CacheConfig
from ..online.monitor.config import MonitorConfig
from ..online.route.config import RouteConfig
from ..online.serve.config import ServeConfig
from ..release.promote import PromoteConfig
from ..stages.base_model import ModelConfig
from ..stages.cache_eval import CacheEvalConfig
from ..stages.cost import CostConfig
from ..stages.distil import DistilConfig
from ..stages.prepare import PrepareConfig
from ..stages.register import RegisterConfig
from ..tracking import MlflowConfig
from ..training.config import TrainConfig

# Every params.yaml section and the typed config it loads into (tests/test_config.py checks
# params.yaml and every shipped profile against this).
SECTIONS: dict[str, type[Section]] = {
    "model": ModelConfig,
    "prepare": PrepareConfig,
    "distil": DistilConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "judge": JudgeConfig,
    "gates": GatesConfig,
    "mlflow": MlflowConfig,
    "register": RegisterConfig,
    "promote": PromoteConfig,
    "serve": ServeConfig,
    "cache": CacheConfig,
    "cache_eval": CacheEvalConfig,
    "route": RouteConfig,
    "cost": CostConfig,
    "monitor": MonitorConfig,
    "vllm": VllmConfig,
}

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="The params file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-S",
        metavar="KEY=VALUE",
        help="Override a param (repeatable), e.g. -S prepare.max_tokens=256.",
    ),
]
PARAMS = Path("params.yaml")

# Loggers that talk at INFO about things a user does not need (one line per HTTP request:
# the openai/anthropic SDKs log through `httpx2` as well as `httpx`), and known-harmless
# warnings of dependencies. All of it comes back with TEMPER_LOG_LEVEL=DEBUG.
NOISY_LOGGERS = (
    "absl",  # rouge-score: "Using default tokenizer." at every call
    "httpx",
    "httpx2",
    "httpcore",
    "urllib3",
    "filelock",
    "datasets",
    "openai",
    "anthropic",
    "mlflow",
    "alembic",
    "accelerate",
    "peft",
    "transformers",
    "torch",
)
# bitsandbytes >= 0.49 warns at every import that optional hub kernels are missing: harmless
# (STACK-FACTS), and `kernels` must not be installed (it fetches from the hub).
SILENT_LOGGERS = ("bitsandbytes",)
HARMLESS_WARNINGS = (
    (FutureWarning, ""),
    (DeprecationWarning, ""),
    (UserWarning, ".*gemv_4bit.*"),  # bitsandbytes on CPU, see train docs
    (UserWarning, ".*TypedStorage is deprecated.*"),
)


def setup_logging() -> None:
    """Logging at TEMPER_LOG_LEVEL (default INFO), dependencies quiet unless it is DEBUG.

    Runs before any command's body (the app callback), so before the heavy imports: some
    libraries read their settings from the environment when they are imported.
    """
    level = os.environ.get("TEMPER_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    if level == "DEBUG":
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in SILENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    # Read at import: transformers' messages, MLflow's own logger (it sets INFO on import),
    # and the bars of sub-second steps (loading weights, `datasets` maps). The long steps
    # keep theirs: training, generation, teacher calls, the GGUF conversion.
    quiet = {
        "TRANSFORMERS_VERBOSITY": "error",
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    }
    for key, value in quiet.items():
        os.environ.setdefault(key, value)
    # Not the HF_HUB_DISABLE_PROGRESS_BARS variable: it would win over the base_model stage
    # turning the bar back on for its one long step. transformers reads this when imported.
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


def load(params: Path, overrides: list[str] | None) -> Params:
    try:
        return load_params(params, overrides)
    except ConfigError as err:
        raise typer.BadParameter(str(err)) from None


def fail(err: Exception, code: int = 1) -> None:
    typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def task_of(values: dict[str, Any]) -> Any:
    from ..task import load_task

    return load_task(values.get("task") or "configs/tasks/clause_review.yaml")


def model_dir(values: dict[str, Any]) -> str:
    return section(values, "model", ModelConfig).dir
