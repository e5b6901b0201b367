"""The `temper` command line: a thin layer over the stages' entry functions.

Each command loads `params.yaml` (override with `-S section.key=value`, as `dvc exp run -S`
does), validates the sections it needs into their typed configs, calls one entry function and
prints a one-line summary. `COMMANDS` at the bottom is the table of commands; the help text of
each lists every knob of its sections (generated from the typed configs). Heavy libraries are
imported inside the commands so `--help` stays fast.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from .config import (
    ConfigError,
    Params,
    Section,
    as_overrides,
    describe,
    load_params,
    read_yaml,
    section,
)
from .evaluation.config import EvaluateConfig
from .evaluation.gates import GatesConfig
from .evaluation.judge import JudgeConfig
from .release.promote import PromoteConfig
from .stages.base_model import ModelConfig
from .stages.distil import DistilConfig
from .stages.prepare import PrepareConfig
from .stages.register import RegisterConfig
from .tracking import MlflowConfig
from .training.config import TrainConfig

app = typer.Typer(
    help="Temper: distil, fine-tune (LoRA/QLoRA), evaluate, gate and register a self-hosted "
    "model for a task first prototyped on a frontier API. `dvc repro` runs the stages in order.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

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
}

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="The params file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", metavar="KEY=VALUE",
                 help="Override a param (repeatable), e.g. -S prepare.max_tokens=256."),
]
PARAMS = Path("params.yaml")

# Loggers that talk at INFO about things a user does not need (one line per HTTP request:
# the openai/anthropic SDKs log through `httpx2` as well as `httpx`), and known-harmless
# warnings of dependencies. All of it comes back with TEMPER_LOG_LEVEL=DEBUG.
NOISY_LOGGERS = ("httpx", "httpx2", "httpcore", "urllib3", "filelock", "datasets", "openai",
                 "anthropic", "bitsandbytes", "mlflow", "alembic", "accelerate", "peft",
                 "transformers", "torch")
HARMLESS_WARNINGS = (
    (FutureWarning, ""),
    (DeprecationWarning, ""),
    (UserWarning, ".*gemv_4bit.*"),                  # bitsandbytes on CPU, see train docs
    (UserWarning, ".*kernels-community.*"),          # bitsandbytes >= 0.49: optional kernels
    (UserWarning, ".*TypedStorage is deprecated.*"),
)


def setup_logging() -> None:
    level = os.environ.get("TEMPER_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    if level == "DEBUG":
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def load(params: Path, overrides: list[str] | None) -> Params:
    try:
        return load_params(params, overrides)
    except ConfigError as err:
        raise typer.BadParameter(str(err)) from None


def fail(err: Exception, code: int = 1) -> None:
    typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def task_of(values: dict[str, Any]) -> Any:
    from .task import load_task

    return load_task(values.get("task") or "configs/tasks/clause_review.yaml")


def model_dir(values: dict[str, Any]) -> str:
    return section(values, "model", ModelConfig).dir


# --- the stages (what dvc.yaml runs) ---------------------------------------------------------


def base_model_cmd(params: ParamsOpt = PARAMS, set_: SetOpt = None) -> None:
    """Resolve `model.base` into a local safetensors folder (built-in default works offline)."""
    from .stages import base_model

    setup_logging()
    values = load(params, set_)
    try:
        out = base_model.run(section(values, "model", ModelConfig))
    except (ConfigError, ValueError, FileNotFoundError) as err:
        fail(err)
    typer.echo(f"base model ready in {out}")


def prepare_cmd(params: ParamsOpt = PARAMS, set_: SetOpt = None) -> None:
    """Clean, de-duplicate, split by document and render the task's chat records."""
    from .stages import prepare

    setup_logging()
    values = load(params, set_)
    try:
        stats = prepare.run(section(values, "prepare", PrepareConfig), task_of(values),
                            model_dir(values))
    except (ConfigError, prepare.InputError, FileNotFoundError) as err:
        fail(err)
    counts = ", ".join(f"{k} {v['records']}" for k, v in stats["splits"].items())
    typer.echo(f"prepared: {counts}; dropped {stats['dropped']}; "
               f"quarantined {stats['quarantined']['total']}")


def distil_cmd(
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Start even if the cost estimate "
                                        "exceeds distil.provider.max_usd.")] = False,
) -> None:
    """Label the training data with the teacher (gold offline) and answer the test split.

    Exit codes: 3 budget cap reached (finished work kept), 4 cost estimate above the cap
    (nothing sent), 5 endpoint not on this machine and allow_external false (nothing sent),
    6 more than max_reject_rate of the records rejected or failed (previous outputs kept).
    """
    from .stages import distil

    setup_logging()
    values = load(params, set_)
    try:
        cfg = section(values, "distil", DistilConfig)
        if force:
            cfg = cfg.model_copy(update={"force": True})
        mlflow_cfg = section(values, "mlflow", MlflowConfig) if cfg.log_mlflow else None
        m = distil.run(cfg, task_of(values), mlflow_cfg, values)
    except distil.DistilError as err:
        fail(err, err.exit_code)
    except (ConfigError, FileNotFoundError) as err:
        fail(err)
    counts = ", ".join(f"{k} {v['labelled']}/{v['input']}" for k, v in m["records"].items())
    typer.echo(f"distilled ({m['teacher']['kind']}:{m['teacher']['model']}): {counts}; "
               f"rejects {m['rejects']}; requests {m['requests']}, cache hits "
               f"{m['cache_hits']}, ${m['usd']:.4f}")


def train_cmd(
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
    candidate: Annotated[list[str] | None, typer.Option(
        "--candidate", "-c", help="Candidate(s) of train.candidates to train (default: all).")
    ] = None,
    launched: Annotated[bool, typer.Option(
        "--launched", hidden=True, help="One rank under `accelerate launch` (set by temper).")
    ] = False,
) -> None:
    """Fine-tune LoRA/QLoRA candidates on the distilled data (through Accelerate).

    Single-process Accelerate configs (`train.accelerate: cpu`, `single_gpu`) train in this
    process; multi-process ones (`cpu_ddp_2proc`, `multi_gpu_ddp`, `fsdp_qlora`) re-launch
    `python -m temper train --launched` under `accelerate launch`, one process per device.
    """
    import subprocess

    from .stages import train
    from .training.data import DataError

    setup_logging()
    values = load(params, set_)

    def rank_argv(name: str) -> list[str]:
        argv = ["train", "--launched", "--params", str(params), "--candidate", name]
        return argv + [arg for item in set_ or [] for arg in ("--set", item)]

    try:
        cfg = section(values, "train", TrainConfig)
        mlflow_cfg = section(values, "mlflow", MlflowConfig)
        if launched:  # this process is one rank: train here, the launcher reports
            for name in candidate or []:
                train.train_candidate(cfg, name, model_dir(values), mlflow_cfg, values)
            return
        results = train.run(cfg, candidate, model_dir(values), mlflow_cfg, values, rank_argv)
    except (ConfigError, DataError, FileNotFoundError) as err:
        fail(err)
    except subprocess.CalledProcessError as err:
        fail(RuntimeError(f"accelerate launch failed with exit code {err.returncode}"))
    for name, m in results.items():
        typer.echo(f"trained {name}: {m.steps} steps in {m.train_seconds:.0f}s "
                   f"({m.tokens_per_s or 0:.0f} tokens/s), val loss {m.val_loss:.4f} "
                   f"(base {m.base_val_loss:.4f})")


def evaluate_cmd(
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
    data: Annotated[Path | None, typer.Option(
        "--data", help="Ad hoc: score this JSONL (raw format through prepare.fields, or "
        "prepared) instead of the test split.")] = None,
    adapter: Annotated[str | None, typer.Option(
        "--adapter", help="Ad hoc: an adapter folder or MLflow URI (models:/name@alias, "
        "runs:/id/adapter) instead of the candidates.")] = None,
    baseline: Annotated[str, typer.Option(
        "--baseline", help="Ad hoc only: none, base_model or api.")] = "none",
    out: Annotated[Path, typer.Option(
        "--out", help="Ad hoc only: folder for eval.json, eval.md, predictions.")
    ] = Path("reports/adhoc"),
) -> None:
    """Score candidates and a baseline on the test split: metrics with CIs, judge, gates.

    With --data and/or --adapter it scores any adapter on any JSONL, writing to --out
    (the pipeline's metrics/eval.json and reports/ are left alone).
    """
    import re

    from .evaluation.report import fmt, gate_table
    from .stages import evaluate

    setup_logging()
    values = load(params, set_)
    try:
        cfg = section(values, "evaluate", EvaluateConfig)
        adapters = fields = None
        if data is not None or adapter is not None:
            out.mkdir(parents=True, exist_ok=True)
            update = {"metrics": str(out / "eval.json"), "reports_dir": str(out),
                      "baseline": baseline, "log_mlflow": False}
            if data is not None:
                update["test"] = str(data)
                fields = section(values, "prepare", PrepareConfig).fields
            cfg = cfg.model_copy(update=update)
            if adapter is not None:
                # models/candidates/<name>/adapter -> <name>; an MLflow URI -> its name
                path = Path(adapter.rstrip("/"))
                name = path.parent.name if path.name == "adapter" else path.name
                if ":/" in adapter:  # models:/temper-clause-review@champion -> that name
                    name = re.sub(r"[^\w.@-]+", "_", adapter.split(":/", 1)[1]).strip("_")
                adapters = {name or "adapter": adapter}
        result = evaluate.run(cfg, task_of(values), model_dir(values),
                              section(values, "judge", JudgeConfig),
                              section(values, "gates", GatesConfig),
                              section(values, "mlflow", MlflowConfig), values,
                              adapters=adapters, fields=fields)
    except (ConfigError, evaluate.EvalError, FileNotFoundError) as err:
        fail(err)
    primary = result.primary_metric
    for name, entry in result.candidates.items():
        delta = (entry.delta_vs_baseline or {}).get(primary)
        typer.echo(f"{name}: {primary} {fmt(entry.metrics[primary].model_dump())}, "
                   f"json_valid_rate {fmt(entry.metrics['json_valid_rate'].model_dump())}"
                   + (f", delta vs baseline {fmt(delta.model_dump())}" if delta else ""))
    if result.baseline is not None:
        typer.echo(f"baseline ({result.baseline.kind}): {primary} "
                   f"{fmt(result.baseline.metrics[primary].model_dump())}")
    typer.echo(gate_table(result))
    typer.echo(f"winner: {result.winner}  (report: {cfg.reports_dir}/eval.md)")


def register_cmd(params: ParamsOpt = PARAMS, set_: SetOpt = None) -> None:
    """Register the evaluation's winner as a new model version with alias `challenger`."""
    from .stages import register

    setup_logging()
    values = load(params, set_)
    try:
        summary = register.run(section(values, "register", RegisterConfig), values,
                               section(values, "mlflow", MlflowConfig), model_dir(values))
    except (ConfigError, register.RegisterError, FileNotFoundError) as err:
        fail(err)
    if summary["registered"]:
        typer.echo(f"registered {summary['model_name']} version {summary['version']} "
                   f"(@{summary['alias']}) from candidate {summary['candidate']}: "
                   f"{summary['primary_metric']} {summary[summary['primary_metric']]:.4f}")
    else:
        typer.secho(f"not registered: {summary['reason']}", fg=typer.colors.YELLOW)


# --- release: gates, promotion, rollback, pull, merge ----------------------------------------


def gate_cmd(
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
    eval_file: Annotated[Path, typer.Option("--eval", help="The evaluation to check.")
                         ] = Path("metrics/eval.json"),
    candidate: Annotated[str | None, typer.Option(
        "--candidate", "-c", help="Check this candidate (default: is there a winner?).")] = None,
) -> None:
    """Re-check the gates of `gates:` against an evaluation; exit 1 when they fail.

    Thresholds come from the params (so `-S gates.min_primary=0.8` tries a stricter gate
    without re-running the evaluation). Exit codes: 0 pass, 1 fail, 2 bad input.
    """
    from .evaluation.gates import check, pick_winner
    from .evaluation.report import gate_table
    from .results import EvalResult, ResultError

    values = load(params, set_)
    try:
        gates_cfg = section(values, "gates", GatesConfig)
        result = EvalResult.load(eval_file)
        if candidate is not None:
            result.candidate(candidate, eval_file)
    except (ConfigError, ResultError) as err:
        fail(err, 2)
    for entry in result.candidates.values():
        entry.gates = check(gates_cfg, result.primary_metric, entry)
    typer.echo(gate_table(result))
    if candidate is not None:
        ok = bool(result.candidates[candidate].gates.passed)
        typer.echo(f"{candidate}: {'PASS' if ok else 'FAIL'}")
    else:
        winner = pick_winner(result)
        ok = winner is not None
        typer.echo(f"winner: {winner}" if ok else "no candidate passes the gates")
    raise typer.Exit(0 if ok else 1)


def registry_client(values: dict[str, Any]) -> Any:
    """MLflow pointed at the configured store (embedded sqlite by default)."""
    import mlflow

    from . import tracking

    tracking.setup(section(values, "mlflow", MlflowConfig))
    return mlflow.MlflowClient()


def promote_cmd(params: ParamsOpt = PARAMS, set_: SetOpt = None) -> None:
    """Make `challenger` the `champion` if it passes the gates and is not worse.

    The gates in force (`gates:`) are checked again on the challenger's recorded evaluation.
    Exit codes: 0 promoted (or already champion), 1 refused, 2 cannot decide (missing alias,
    scores or config). The decision is written to the version's tags and promote.report.
    """
    from .release import promote

    setup_logging()
    values = load(params, set_)
    try:
        cfg = section(values, "promote", PromoteConfig)
        name = section(values, "register", RegisterConfig).model_name
        client = registry_client(values)
        decision = promote.decide(client, name, cfg, section(values, "gates", GatesConfig))
        promote.write_report(cfg.report, decision, "promote", promote.history(client, name))
    except (ConfigError, promote.PromoteError) as err:
        fail(err, 2)
    changed = decision.promoted or decision.champion_after == decision.challenger
    typer.secho(("promoted: " if decision.promoted else "not promoted: ") + decision.reason,
                fg=typer.colors.GREEN if changed else typer.colors.RED)
    typer.echo(f"{name}@{cfg.champion_alias} = v{decision.champion_after or '-'}; "
               f"report: {cfg.report}")
    if not changed:
        raise typer.Exit(1)


def rollback_cmd(params: ParamsOpt = PARAMS, set_: SetOpt = None) -> None:
    """Point `champion` back at the previous champion (exit 2 when there is none)."""
    from .release import promote

    setup_logging()
    values = load(params, set_)
    try:
        cfg = section(values, "promote", PromoteConfig)
        name = section(values, "register", RegisterConfig).model_name
        client = registry_client(values)
        decision = promote.rollback(client, name, cfg)
        promote.write_report(cfg.report, decision, "rollback", promote.history(client, name))
    except (ConfigError, promote.PromoteError) as err:
        fail(err, 2)
    typer.echo(f"{decision.reason}; report: {cfg.report}")


def pull_cmd(
    uri: Annotated[str, typer.Argument(help="models:/<name>@<alias>, models:/<name>/<version>, "
                                       "or <name> for its champion.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Target folder (default "
                                             "models/pulled/<name>-v<version>).")] = None,
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
) -> None:
    """Download a registered adapter and bind it to the local base model (checked by hash)."""
    from .release import pull
    from .release.promote import PromoteError

    setup_logging()
    values = load(params, set_)
    try:
        registry_client(values)
        path = pull.pull(uri, out, model_dir(values))
    except (ConfigError, PromoteError) as err:
        fail(err, 2)
    typer.echo(f"pulled into {path}: load with peft.PeftModel.from_pretrained(base, '{path}') "
               "or temper.release.pull.load_pulled")


def merge_cmd(
    candidate: Annotated[Path, typer.Argument(help="A candidate folder (models/candidates/NAME) "
                                              "or an adapter folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the merged model goes.")],
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
    base: Annotated[Path | None, typer.Option(help="Base model folder (default: model.dir).")]
    = None,
    dtype: Annotated[str, typer.Option(help="bfloat16 | float16 | float32.")] = "bfloat16",
) -> None:
    """Merge a LoRA adapter into its base model: a standalone 16-bit model for serving.

    QLoRA adapters are merged into the dequantized 4-bit weights (a warning says so).
    """
    from .release.merge import merge

    setup_logging()
    values = load(params, set_)
    try:
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"--dtype {dtype!r}: use bfloat16, float16 or float32")
        info = merge(candidate, out, base or Path(model_dir(values)), dtype)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        fail(err)
    typer.echo(f"merged {info['adapter']} into {info['base']} -> {out} ({info['dtype']}"
               f"{', from dequantized 4-bit weights' if info['dequantized'] else ''})")


# --- helpers: profiles, the MLflow UI ----------------------------------------------------------


def profile_cmd(
    name: Annotated[str, typer.Argument(help="Profile name: a file configs/profiles/NAME.yaml.")],
) -> None:
    """Print a profile as `-S key=value` overrides: `dvc exp run $(temper profile full)`."""
    try:
        overrides = as_overrides(read_yaml(Path("configs/profiles") / f"{name}.yaml"))
    except ConfigError as err:
        fail(err)
    typer.echo(" ".join(f"-S {shlex.quote(o)}" for o in overrides))


def ui_cmd(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface (keep loopback unless you mean it).")]
    = "127.0.0.1",
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
) -> None:
    """Open the MLflow UI on the embedded store (one lean server process; Ctrl-C stops it)."""
    import mlflow

    from . import tracking

    values = load(params, set_)
    cfg = section(values, "mlflow", MlflowConfig)
    uri = tracking.tracking_uri(cfg)
    if not uri.startswith("sqlite:"):
        typer.echo(f"the store is a server already: open {tracking.redact_uri(uri)}")
        return
    experiment_id = tracking.setup(cfg)
    primary = section(values, "evaluate", EvaluateConfig).primary_metric
    tracking.ensure_candidates_view(mlflow.MlflowClient(), experiment_id, primary)
    cmd, env = tracking.lean_server_command(uri, cfg.artifact_root, host, port)
    typer.echo("candidates side by side: "
               + tracking.runs_table_url(f"http://{host}:{port}", experiment_id))
    os.execvpe(cmd[0], cmd, env)  # the server replaces this process: Ctrl-C stops it cleanly


# --- the table of commands -------------------------------------------------------------------

# name, function, the params sections its --help lists in full.
COMMANDS: list[tuple[str, Callable[..., None], tuple[str, ...]]] = [
    ("base-model", base_model_cmd, ("model",)),
    ("prepare", prepare_cmd, ("prepare",)),
    ("distil", distil_cmd, ("distil",)),
    ("train", train_cmd, ("train",)),
    ("evaluate", evaluate_cmd, ("evaluate", "judge", "gates")),
    ("register", register_cmd, ("register",)),
    ("gate", gate_cmd, ("gates",)),
    ("promote", promote_cmd, ("promote", "gates")),
    ("rollback", rollback_cmd, ("promote",)),
    ("pull", pull_cmd, ()),
    ("merge", merge_cmd, ()),
    ("profile", profile_cmd, ()),
    ("ui", ui_cmd, ()),
]

for _name, _function, _sections in COMMANDS:
    _epilog = "\n\n".join(describe(SECTIONS[s], s) for s in _sections) or None
    app.command(_name, epilog=_epilog)(_function)


if __name__ == "__main__":
    app(prog_name="temper", args=sys.argv[1:])
