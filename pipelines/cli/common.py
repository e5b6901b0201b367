"""What every command shares: the params, the options, logging, and the one error handler."""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from ..errors import TemperError
from ..params import TemperParams

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


def load(params: Path, overrides: list[str] | None) -> TemperParams:
    """The params in effect, validated (`TemperParams.load`): an unreadable file or `-S`
    exits 2, a value that does not fit its field names the field and where it was set."""
    return TemperParams.load(params, overrides)


def fail(err: Exception, code: int = 1) -> None:
    """Print `error: ...` and exit with `code` (for outcomes that are not exceptions)."""
    typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def reports_errors(
    function: Callable[..., None],
    error_code: int = 1,
    on_error: Callable[[dict], None] | None = None,
) -> Callable[..., None]:
    """`function` as a command: a Temper error (or the tracking server refusing the
    credentials, `tracking.access`) becomes one line `error: ...` and its exit code, the one
    place the CLI catches them. `error_code` replaces the generic 1 for commands whose 1
    means a verdict (gate, promote: 1 = refused, 2 = cannot decide). `on_error(kwargs)` runs
    first on any failure (the pipeline stages mark their MLflow run failed)."""

    @functools.wraps(function)  # typer reads the signature through __wrapped__
    def command(*args: Any, **kwargs: Any) -> None:
        try:
            return function(*args, **kwargs)
        except Exception as err:
            failed = err.exit_code if isinstance(err, typer.Exit) else 1
            if on_error is not None and failed:
                on_error(kwargs)
            known = err if isinstance(err, TemperError) else _refused(err)
            if known is None:
                raise
            code = error_code if known.exit_code == 1 else known.exit_code
            typer.secho(f"error: {known}", err=True, fg=typer.colors.RED)
            raise typer.Exit(code) from None

    return command


def _refused(err: Exception) -> TemperError | None:
    from ..tracking.access import access_error

    return None if isinstance(err, click.exceptions.Exit) else access_error(err)
