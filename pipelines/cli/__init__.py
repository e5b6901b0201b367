"""The `temper` command line: a thin layer over the stages' entry functions.

Each command loads `params.yaml` (override with `-S section.key=value`, as `dvc exp run -S`
does), validates the sections it needs into their typed configs, calls one entry function and
prints a one-line summary. `COMMANDS` below is the table of commands; the help text of each
lists every knob of its sections (generated from the typed configs), with the value in effect
(params.yaml, `-p`, `-S`) beside the default; `temper config` prints the resolved params. Heavy libraries are
imported inside the commands so `--help` stays fast. `stages.py` holds the commands dvc.yaml
runs, `release.py` the ones CI and people run around them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import typer

from . import cache, cost, exps, predict, release, serve, stages
from .common import PARAMS, SECTIONS, setup_logging
from .monitor import monitor_app
from .params_help import config_cmd, help_command

__all__ = ["COMMANDS", "SECTIONS", "app", "setup_logging"]


class _App(typer.Typer):
    """The command line, with one line and exit code 2 (not a traceback) when the tracking
    server refuses the credentials, whichever command met it (`tracking.access`)."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except Exception as err:
            from ..tracking.access import access_error

            denied = access_error(err)
            if denied is None:
                raise
            typer.secho(f"error: {denied}", err=True, fg=typer.colors.RED)
            raise SystemExit(2) from None


app = _App(
    help="Temper: distil, fine-tune (LoRA/QLoRA), evaluate, gate and register a self-hosted "
    "model for a task first prototyped on a frontier API. `dvc repro` runs the stages in order.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

# name, function, the params sections its --help lists in full.
COMMANDS: list[tuple[str, Callable[..., None], tuple[str, ...]]] = [
    ("base-model", stages.base_model_cmd, ("model",)),
    ("prepare", stages.prepare_cmd, ("prepare",)),
    ("distil", stages.distil_cmd, ("distil",)),
    ("train", stages.train_cmd, ("train",)),
    ("evaluate", stages.evaluate_cmd, ("evaluate", "judge", "gates")),
    ("route", stages.route_cmd, ("route",)),
    ("register", stages.register_cmd, ("register",)),
    ("gate", release.gate_cmd, ("gates",)),
    ("promote", release.promote_cmd, ("promote", "gates")),
    ("rollback", release.rollback_cmd, ("promote",)),
    ("pull", release.pull_cmd, ()),
    ("predict", predict.predict_cmd, ("evaluate",)),
    ("serve", serve.serve_cmd, ("serve", "route", "cache", "monitor")),
    ("cost", cost.cost_cmd, ("cost",)),
    ("cache-eval", cache.cache_eval_cmd, ("cache_eval", "cache")),
    ("merge", release.merge_cmd, ()),
    ("profile", release.profile_cmd, ()),
    ("exps", exps.exps_cmd, ()),
    ("ui", release.ui_cmd, ()),
    ("config", config_cmd, ()),
]


@app.callback()
def main() -> None:
    """Temper: distil, fine-tune (LoRA/QLoRA), evaluate, gate and register a self-hosted model."""
    setup_logging()


# The commands dvc.yaml runs under one MLflow pipeline run: when one fails, that run is
# marked FAILED (else it stays RUNNING forever; see `tracking.mark_failed`).
PIPELINE_STAGES = {"distil", "train", "evaluate", "route", "cache-eval", "cost", "register"}


def _marks_failure(stage: str, function: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(function)  # typer reads the signature through __wrapped__
    def run(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except typer.Exit as err:
            if err.exit_code:
                _mark_failed(stage, kwargs)
            raise
        except Exception:
            _mark_failed(stage, kwargs)
            raise

    return run


def _mark_failed(stage: str, kwargs: dict) -> None:
    from ..config import load_params
    from ..tracking import MlflowConfig, mark_failed

    try:
        values = load_params(kwargs.get("params", PARAMS), kwargs.get("set_"))
        mark_failed(MlflowConfig.model_validate(values.get("mlflow") or {}), values, stage)
    except Exception as err:  # noqa: BLE001 - never hide the stage's own error behind this
        logging.getLogger(__name__).debug("could not mark the pipeline run failed: %s", err)


for _name, _function, _sections in COMMANDS:
    if _name in PIPELINE_STAGES:
        _function = _marks_failure(_name, _function)
    if _sections:  # help built when asked for: it reads the params in effect then
        app.command(_name, cls=help_command(_sections))(_function)
    else:
        app.command(_name)(_function)

# `temper monitor judge | review export | review import | probe | report` (docs/monitor.md)
app.add_typer(monitor_app, name="monitor")
