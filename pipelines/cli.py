"""The `temper` command line: one subcommand per pipeline stage, plus operations.

Every stage reads its section of `params.yaml` (override with `-S section.key=value`, as with
`dvc exp run -S`). Heavy libraries are imported inside the commands so `--help` stays fast.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from .base_model import ModelConfig
from .config import ConfigError, Section, describe, load_params, read_yaml, section
from .distil import DistilConfig
from .evaluate import EvaluateConfig
from .gates import GatesConfig
from .judge import JudgeConfig
from .prepare import PrepareConfig
from .promote import PromoteConfig
from .register import RegisterConfig
from .tracking import MlflowConfig
from .train import TrainConfig

app = typer.Typer(
    help="Temper: distil, fine-tune (LoRA/QLoRA), evaluate, gate and register a self-hosted "
    "model for a task first prototyped on a frontier API. `dvc repro` runs the stages in order.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="The params file.", show_default=True)
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", metavar="KEY=VALUE",
                 help="Override a param (repeatable), e.g. -S prepare.max_tokens=256."),
]


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


def setup_logging() -> None:
    level = os.environ.get("TEMPER_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # Libraries that talk a lot at INFO.
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def load(params: Path, overrides: list[str] | None) -> dict:
    try:
        return load_params(params, overrides)
    except ConfigError as err:
        raise typer.BadParameter(str(err)) from None


def fail(err: Exception, code: int = 1) -> None:
    typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def task_path(params: dict) -> str:
    return params.get("task") or "configs/tasks/clause_review.yaml"


@app.command("base-model", epilog=describe(ModelConfig, "model"))
def base_model_cmd(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Resolve `model.base` into a local safetensors folder (built-in default works offline)."""
    from . import base_model

    setup_logging()
    values = load(params, set_)
    try:
        base_model.run(section(values, "model", ModelConfig))
    except (ConfigError, ValueError, FileNotFoundError) as err:
        fail(err)


@app.command("prepare", epilog=describe(PrepareConfig, "prepare"))
def prepare_cmd(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Clean, de-duplicate, split by document and render the task's chat records."""
    from . import prepare
    from .task import load_task

    setup_logging()
    values = load(params, set_)
    try:
        stats = prepare.run(
            section(values, "prepare", PrepareConfig),
            load_task(task_path(values)),
            section(values, "model", ModelConfig).dir,
        )
    except (ConfigError, prepare.InputError, FileNotFoundError) as err:
        fail(err)
    counts = ", ".join(f"{k} {v['records']}" for k, v in stats["splits"].items())
    typer.echo(f"prepared: {counts}; dropped {stats['dropped']}; "
               f"quarantined {stats['quarantined']['total']}")


@app.command("distil", epilog=describe(DistilConfig, "distil"))
def distil_cmd(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Start even if the cost estimate "
                                        "exceeds distil.provider.max_usd.")] = False,
) -> None:
    """Label the training data with the teacher (gold offline) and answer the test split.

    Exit codes: 3 budget cap reached (finished work kept), 4 cost estimate above the cap
    (nothing sent), 5 endpoint not on this machine and allow_external false (nothing sent),
    6 more than max_reject_rate of the records rejected or failed (previous outputs kept).
    """
    from . import distil
    from .task import load_task

    setup_logging()
    values = load(params, set_)
    try:
        cfg = section(values, "distil", DistilConfig)
        if force:
            cfg = cfg.model_copy(update={"force": True})
        mlflow_cfg = section(values, "mlflow", MlflowConfig) if cfg.log_mlflow else None
        m = distil.run(cfg, load_task(task_path(values)), mlflow_cfg, values)
    except distil.DistilError as err:
        fail(err, err.exit_code)
    except (ConfigError, FileNotFoundError) as err:
        fail(err)
    counts = ", ".join(f"{k} {v['labelled']}/{v['input']}" for k, v in m["records"].items())
    typer.echo(f"distilled ({m['teacher']['kind']}:{m['teacher']['model']}): {counts}; "
               f"rejects {m['rejects']}; requests {m['requests']}, cache hits "
               f"{m['cache_hits']}, ${m['usd']:.4f}")


@app.command("train", epilog=describe(TrainConfig, "train"))
def train_cmd(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    candidate: Annotated[list[str] | None, typer.Option(
        "--candidate", "-c", help="Candidate(s) of train.candidates to train (default: all).")
    ] = None,
) -> None:
    """Fine-tune LoRA/QLoRA candidates on the distilled data (through Accelerate).

    Single-process Accelerate configs (`train.accelerate: cpu`, `single_gpu`) train in this
    process; multi-process ones (`cpu_ddp_2proc`, `multi_gpu_ddp`, `fsdp_qlora`) re-launch
    `python -m pipelines.train` under `accelerate launch`.
    """
    import subprocess

    from . import train
    from .io import read_json

    setup_logging()
    values = load(params, set_)
    try:
        cfg = section(values, "train", TrainConfig)
        names = candidate or list(cfg.candidates)
        for name in names:
            cfg.candidate(name)  # unknown names fail before anything trains
        acc = train.accelerate_config(cfg.accelerate)
        for name in names:
            if train.needs_launcher(acc):
                argv = ["--params", str(params), "--candidate", name]
                for item in set_ or []:
                    argv += ["--set", item]
                train.launch(acc, argv)
                m = read_json(Path(cfg.out_dir) / name / "train_metrics.json")
            else:
                m = train.run(cfg, name, section(values, "model", ModelConfig).dir,
                              section(values, "mlflow", MlflowConfig), values)
            typer.echo(f"trained {name}: {m['steps']} steps in {m['train_seconds']:.0f}s "
                       f"({m['tokens_per_s']:.0f} tokens/s), val loss {m['val_loss']:.4f} "
                       f"(base {m['base_val_loss']:.4f})")
    except (ConfigError, train.DataError, FileNotFoundError) as err:
        fail(err)
    except subprocess.CalledProcessError as err:
        fail(RuntimeError(f"accelerate launch failed with exit code {err.returncode}"))


@app.command("merge")
def merge_cmd(
    candidate: Annotated[Path, typer.Argument(help="A candidate folder (models/candidates/NAME) "
                                              "or an adapter folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the merged model goes.")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    base: Annotated[Path | None, typer.Option(help="Base model folder (default: model.dir).")]
    = None,
    dtype: Annotated[str, typer.Option(help="bfloat16 | float16 | float32.")] = "bfloat16",
) -> None:
    """Merge a LoRA adapter into its base model: a standalone 16-bit model for serving.

    QLoRA adapters are merged into the dequantized 4-bit weights (a warning says so).
    """
    from . import train

    setup_logging()
    values = load(params, set_)
    try:
        base_dir = base or Path(section(values, "model", ModelConfig).dir)
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"--dtype {dtype!r}: use bfloat16, float16 or float32")
        info = train.merge(candidate, out, base_dir, dtype)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        fail(err)
    typer.echo(f"merged {info['adapter']} into {info['base']} -> {out} ({info['dtype']}"
               f"{', from dequantized 4-bit weights' if info['dequantized'] else ''})")


def flatten(values: dict, prefix: str = "") -> list[str]:
    """`{"a": {"b": 1}}` -> `["a.b=1"]`, the form `dvc exp run -S` and `temper -S` take."""
    import json

    items = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            items += flatten(value, f"{name}.")
        else:
            items.append(f"{name}={json.dumps(value)}")
    return items


@app.command("profile")
def profile_cmd(
    name: Annotated[str, typer.Argument(help="Profile name: a file configs/profiles/NAME.yaml.")],
) -> None:
    """Print a profile as `-S key=value` overrides: `dvc exp run $(temper profile full)`."""
    import shlex

    try:
        overrides = flatten(read_yaml(Path("configs/profiles") / f"{name}.yaml"))
    except ConfigError as err:
        fail(err)
    typer.echo(" ".join(f"-S {shlex.quote(o)}" for o in overrides))


# --- registry: register, promote, rollback, pull, ui ------------------------------------------

def registry_client(values: dict):
    """MLflow pointed at the configured store (embedded sqlite by default)."""
    import mlflow

    from . import tracking

    tracking.setup(section(values, "mlflow", MlflowConfig))
    return mlflow.MlflowClient()


@app.command("evaluate", epilog=describe(EvaluateConfig, "evaluate") + "\n\n"
             + describe(JudgeConfig, "judge") + "\n\n" + describe(GatesConfig, "gates"))
def evaluate_cmd(
    params: ParamsOpt = Path("params.yaml"),
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

    from . import evaluate
    from .gates import table

    setup_logging()
    values = load(params, set_)
    try:
        cfg = section(values, "evaluate", EvaluateConfig)
        adapters = None
        fields = None
        if data is not None or adapter is not None:
            out.mkdir(parents=True, exist_ok=True)
            update = {"metrics": str(out / "eval.json"), "reports_dir": str(out),
                      "baseline": baseline, "log_mlflow": False}
            if data is not None:
                update["test"] = str(data)
                fields = section(values, "prepare", PrepareConfig).fields
            cfg = cfg.model_copy(update=update)
            if adapter is not None:
                # models/candidates/<name>/adapter -> <name>; an MLflow URI -> "adapter"
                path = Path(adapter.rstrip("/"))
                name = path.parent.name if path.name == "adapter" else path.name
                if ":/" in adapter:  # models:/temper-clause-review@champion -> that name
                    name = re.sub(r"[^\w.@-]+", "_", adapter.split(":/", 1)[1]).strip("_")
                adapters = {name or "adapter": adapter}
        from .task import load_task

        result = evaluate.run(cfg, load_task(task_path(values)),
                              section(values, "model", ModelConfig).dir,
                              section(values, "judge", JudgeConfig),
                              section(values, "gates", GatesConfig),
                              section(values, "mlflow", MlflowConfig), values,
                              adapters=adapters, fields=fields)
    except (ConfigError, evaluate.EvalError, FileNotFoundError) as err:
        fail(err)
    from .eval_report import fmt

    primary = result["primary_metric"]
    for name, entry in result["candidates"].items():
        delta = (entry.get("delta_vs_baseline") or {}).get(primary)
        typer.echo(f"{name}: {primary} {fmt(entry['metrics'][primary])}, json_valid_rate "
                   f"{fmt(entry['metrics']['json_valid_rate'])}"
                   + (f", delta vs baseline {fmt(delta)}" if delta else ""))
    if result.get("baseline"):
        typer.echo(f"baseline ({result['baseline']['kind']}): {primary} "
                   f"{fmt(result['baseline']['metrics'][primary])}")
    typer.echo(table(result))
    typer.echo(f"winner: {result['winner']}  (report: {cfg.reports_dir}/eval.md)")


@app.command("gate", epilog=describe(GatesConfig, "gates"))
def gate_cmd(
    params: ParamsOpt = Path("params.yaml"),
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
    from .gates import check, table
    from .io import read_json

    values = load(params, set_)
    try:
        gates_cfg = section(values, "gates", GatesConfig)
        evaluation = read_json(eval_file)
        cands = evaluation["candidates"]
        primary = evaluation["primary_metric"]
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as err:
        fail(ValueError(f"{eval_file}: {err}"), 2)
    if candidate is not None and candidate not in cands:
        fail(ValueError(f"{eval_file}: no candidate {candidate!r} (have {sorted(cands)})"), 2)
    for entry in cands.values():
        entry["gates"] = check(gates_cfg, primary, entry)
    typer.echo(table(evaluation))
    passing = [c for c, e in cands.items() if e["gates"]["passed"]]
    if candidate is not None:
        ok = candidate in passing
        typer.echo(f"{candidate}: {'PASS' if ok else 'FAIL'}")
    else:
        winner = max(passing, key=lambda c: (cands[c]["metrics"][primary]["value"], c),
                     default=None)
        ok = winner is not None
        typer.echo(f"winner: {winner}" if ok else "no candidate passes the gates")
    raise typer.Exit(0 if ok else 1)


@app.command("register", epilog=describe(RegisterConfig, "register"))
def register_cmd(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Register the evaluation's winner as a new model version with alias `challenger`."""
    from . import register

    setup_logging()
    values = load(params, set_)
    try:
        summary = register.run(section(values, "register", RegisterConfig), values,
                               section(values, "mlflow", MlflowConfig),
                               section(values, "model", ModelConfig).dir)
    except (ConfigError, register.RegisterError, FileNotFoundError) as err:
        fail(err)
    if summary["registered"]:
        typer.echo(f"registered {summary['model_name']} version {summary['version']} "
                   f"(@{summary['alias']}) from candidate {summary['candidate']}: "
                   f"{summary['primary_metric']} {summary[summary['primary_metric']]:.4f}")
    else:
        typer.secho(f"not registered: {summary['reason']}", fg=typer.colors.YELLOW)


def promotion_context(values: dict):
    """The promote config, the registered model's name and a registry client."""
    cfg = section(values, "promote", PromoteConfig)
    name = section(values, "register", RegisterConfig).model_name
    return cfg, name, registry_client(values)


@app.command("promote", epilog=describe(PromoteConfig, "promote"))
def promote_cmd(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Make `challenger` the `champion` if it passed its gates and is not worse.

    Exit codes: 0 promoted (or already champion), 1 refused, 2 cannot decide (missing alias,
    scores or config). The decision is written to the version's tags and promote.report.
    """
    from . import promote

    setup_logging()
    values = load(params, set_)
    try:
        cfg, name, client = promotion_context(values)
        decision = promote.decide(client, name, cfg)
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


@app.command("rollback", epilog=describe(PromoteConfig, "promote"))
def rollback_cmd(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Point `champion` back at the previous champion (exit 2 when there is none)."""
    from . import promote

    setup_logging()
    values = load(params, set_)
    try:
        cfg, name, client = promotion_context(values)
        decision = promote.rollback(client, name, cfg)
        promote.write_report(cfg.report, decision, "rollback", promote.history(client, name))
    except (ConfigError, promote.PromoteError) as err:
        fail(err, 2)
    typer.echo(f"{decision.reason}; report: {cfg.report}")


@app.command("pull")
def pull_cmd(
    uri: Annotated[str, typer.Argument(help="models:/<name>@<alias>, models:/<name>/<version>, "
                                       "or <name> for its champion.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Target folder (default "
                                             "models/pulled/<name>-v<version>).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Download a registered adapter and bind it to the local base model (checked by hash)."""
    from . import promote

    setup_logging()
    values = load(params, set_)
    try:
        registry_client(values)
        path = promote.pull(uri, out, section(values, "model", ModelConfig).dir)
    except (ConfigError, promote.PromoteError) as err:
        fail(err, 2)
    typer.echo(f"pulled into {path}: load with peft.PeftModel.from_pretrained(base, '{path}') "
               "or pipelines.promote.load_pulled")


@app.command("ui")
def ui_cmd(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface (keep loopback unless you mean it).")]
    = "127.0.0.1",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Open the MLflow UI on the embedded store (one lean server process; Ctrl-C stops it)."""
    from . import tracking

    values = load(params, set_)
    cfg = section(values, "mlflow", MlflowConfig)
    uri = tracking.tracking_uri(cfg)
    if not uri.startswith("sqlite:"):
        typer.echo(f"the store is a server already: open {tracking.redact_uri(uri)}")
        return
    experiment_id = tracking.setup(cfg)
    import mlflow

    tracking.ensure_candidates_view(mlflow.MlflowClient(), experiment_id)
    cmd, env = tracking.lean_server_command(uri, cfg.artifact_root, host, port)
    typer.echo("candidates side by side: "
               + tracking.runs_table_url(f"http://{host}:{port}", experiment_id))
    os.execvpe(cmd[0], cmd, env)  # the server replaces this process: Ctrl-C stops it cleanly


if __name__ == "__main__":
    app()
