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

import logging
from collections.abc import Callable

import typer

from . import cache, cost, exps, predict, release, serve, stages, sweep
from .common import PARAMS, reports_errors, setup_logging
from .monitor import monitor_app
from .params_help import config_cmd, help_command

__all__ = ["COMMANDS", "app", "setup_logging"]

app = typer.Typer(
    help="Temper: distil, fine-tune (LoRA/QLoRA), evaluate, gate and register a self-hosted "
    "model for a task first prototyped on a frontier API. `dvc repro` runs the stages in order.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

# Exit code of a Temper error in the commands whose exit 1 is a verdict (docs/cli.md).
CANNOT_DECIDE = 2

# name, function, the params sections its --help lists in full, the exit code of an error.
COMMANDS: list[tuple[str, Callable[..., None], tuple[str, ...], int]] = [
    ("base-model", stages.base_model_cmd, ("model",), 1),
    ("prepare", stages.prepare_cmd, ("prepare",), 1),
    ("distil", stages.distil_cmd, ("distil",), 1),
    ("train", stages.train_cmd, ("train",), 1),
    ("evaluate", stages.evaluate_cmd, ("evaluate", "judge", "gates"), 1),
    ("route", stages.route_cmd, ("route",), 1),
    ("register", stages.register_cmd, ("register",), 1),
    ("gate", release.gate_cmd, ("gates",), CANNOT_DECIDE),
    ("promote", release.promote_cmd, ("promote", "gates"), CANNOT_DECIDE),
    ("rollback", release.rollback_cmd, ("promote",), CANNOT_DECIDE),
    ("pull", release.pull_cmd, (), CANNOT_DECIDE),
    ("predict", predict.predict_cmd, ("evaluate",), 1),
    ("serve", serve.serve_cmd, ("serve", "route", "cache", "monitor"), CANNOT_DECIDE),
    ("cost", cost.cost_cmd, ("cost",), 1),
    ("cache-eval", cache.cache_eval_cmd, ("cache_eval", "cache"), 1),
    ("merge", release.merge_cmd, (), 1),
    ("profile", release.profile_cmd, (), 1),
    ("exps", exps.exps_cmd, (), 1),
    ("sweep", sweep.sweep_cmd, (), 1),
    ("ui", release.ui_cmd, (), 1),
    ("config", config_cmd, (), CANNOT_DECIDE),
]


@app.callback()
def main() -> None:
    """Temper: distil, fine-tune (LoRA/QLoRA), evaluate, gate and register a self-hosted model."""
    setup_logging()


# The commands dvc.yaml runs under one MLflow pipeline run: when one fails, that run is
# marked FAILED (else it stays RUNNING forever; see `tracking.mark_failed`).
PIPELINE_STAGES = {"distil", "train", "evaluate", "route", "cache-eval", "cost", "register"}


def _marks_failed(stage: str) -> Callable[[dict], None]:
    def mark(kwargs: dict) -> None:
        from ..config import load_params
        from ..tracking import MlflowConfig, mark_failed

        try:
            values = load_params(kwargs.get("params", PARAMS), kwargs.get("set_"))
            mark_failed(MlflowConfig.model_validate(values.get("mlflow") or {}), values, stage)
        except Exception as err:  # noqa: BLE001 - never hide the stage's own error behind this
            logging.getLogger(__name__).debug("could not mark the pipeline run failed: %s", err)

    return mark


for _name, _function, _sections, _code in COMMANDS:
    _on_error = _marks_failed(_name) if _name in PIPELINE_STAGES else None
    _command = reports_errors(_function, _code, _on_error)
    if _sections:  # help built when asked for: it reads the params in effect then
        app.command(_name, cls=help_command(_sections))(_command)
    else:
        app.command(_name)(_command)

# `temper monitor judge | review export | review import | probe | report` (docs/monitor.md)
app.add_typer(monitor_app, name="monitor")
