"""The stage commands: what `dvc repro` runs, one per stage of dvc.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import ConfigError, section
from ..evaluation.config import EvaluateConfig
from ..evaluation.gates import GatesConfig
from ..evaluation.judge import JudgeConfig
from ..stages.base_model import ModelConfig
from ..stages.distil import DistilConfig
from ..stages.prepare import PrepareConfig
from ..stages.register import RegisterConfig
from ..tracking import MlflowConfig
from ..training.config import TrainConfig
from .common import PARAMS, ParamsOpt, SetOpt, fail, load, model_dir, task_of


def base_model_cmd(params: ParamsOpt = PARAMS, set_: SetOpt = None) -> None:
    """Resolve `model.base` into a local safetensors folder (built-in default works offline)."""
    from ..stages import base_model

    values = load(params, set_)
    try:
        out = base_model.run(section(values, "model", ModelConfig))
    except (ConfigError, ValueError, FileNotFoundError) as err:
        fail(err)
    typer.echo(f"base model ready in {out}")


def prepare_cmd(params: ParamsOpt = PARAMS, set_: SetOpt = None) -> None:
    """Clean, de-duplicate, split by document and render the task's chat records."""
    from ..stages import prepare

    values = load(params, set_)
    try:
        stats = prepare.run(
            section(values, "prepare", PrepareConfig), task_of(values), model_dir(values)
        )
    except (ConfigError, prepare.InputError, FileNotFoundError) as err:
        fail(err)
    counts = ", ".join(f"{k} {v['records']}" for k, v in stats["splits"].items())
    typer.echo(
        f"prepared: {counts}; dropped {stats['dropped']}; "
        f"quarantined {stats['quarantined']['total']}"
    )


def distil_cmd(
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Start even if the cost estimate exceeds distil.provider.max_usd."
        ),
    ] = False,
    status: Annotated[
        bool, typer.Option("--status", help="mode batch: show each batch's progress, then exit.")
    ] = False,
    cancel: Annotated[
        bool, typer.Option("--cancel", help="mode batch: cancel the running batches, then exit.")
    ] = False,
) -> None:
    """Label the training data with the teacher (gold offline) and answer the test split.

    Exit codes: 3 budget cap reached (finished work kept), 4 cost estimate above the cap
    (nothing sent), 5 endpoint not on this machine and allow_external false (nothing sent),
    6 more than max_reject_rate of the records rejected or failed (previous outputs kept),
    7 mode batch: batches still running after max_wait_s or cancelled (re-run to collect).
    """
    from ..stages import distil

    values = load(params, set_)
    try:
        cfg = section(values, "distil", DistilConfig)
        if status or cancel:
            from ..providers.batch_control import batch_status, cancel_batches

            rows = (cancel_batches if cancel else batch_status)(cfg.provider)
            for r in rows:
                counts = " ".join(f"{k} {v}" for k, v in r["counts"].items())
                typer.echo(
                    f"{r['id']}  {r['status']}  {r['requests']} requests  {counts}  "
                    f"(submitted {r['submitted']} UTC)"
                )
            typer.echo(f"{len(rows)} batch(es) in the state file" if rows else "no batches")
            return
        if force:
            cfg = cfg.model_copy(update={"force": True})
        mlflow_cfg = section(values, "mlflow", MlflowConfig) if cfg.log_mlflow else None
        m = distil.run(cfg, task_of(values), mlflow_cfg, values)
    except distil.DistilError as err:
        fail(err, err.exit_code)
    except (ConfigError, FileNotFoundError) as err:
        fail(err)
    counts = ", ".join(f"{k} {v['labelled']}/{v['input']}" for k, v in m["records"].items())
    typer.echo(
        f"distilled ({m['teacher']['kind']}:{m['teacher']['model']}): {counts}; "
        f"rejects {m['rejects']}; requests {m['requests']}, cache hits "
        f"{m['cache_hits']}, ${m['usd']:.4f}"
    )


def train_cmd(
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
    candidate: Annotated[
        list[str] | None,
        typer.Option(
            "--candidate", "-c", help="Candidate(s) of train.candidates to train (default: all)."
        ),
    ] = None,
    launched: Annotated[
        bool,
        typer.Option(
            "--launched", hidden=True, help="One rank under `accelerate launch` (set by temper)."
        ),
    ] = False,
) -> None:
    """Fine-tune LoRA/QLoRA candidates on the distilled data (through Accelerate).

    Single-process Accelerate configs (`train.accelerate: cpu`, `single_gpu`) train in this
    process; multi-process ones (`cpu_ddp_2proc`, `multi_gpu_ddp`, `fsdp_qlora`) re-launch
    `python -m temper train --launched` under `accelerate launch`, one process per device.
    """
    import subprocess

    from ..stages import train
    from ..training.data import DataError

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
        typer.echo(
            f"trained {name}: {m.steps} steps in {m.train_seconds:.0f}s "
            f"({m.tokens_per_s or 0:.0f} tokens/s), val loss {m.val_loss:.4f} "
            f"(base {m.base_val_loss:.4f})"
        )


def evaluate_cmd(
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Ad hoc: score this JSONL (raw format through prepare.fields, or "
            "prepared) instead of the test split.",
        ),
    ] = None,
    adapter: Annotated[
        str | None,
        typer.Option(
            "--adapter",
            help="Ad hoc: an adapter folder or MLflow URI (models:/name@alias, "
            "runs:/id/adapter) instead of the candidates.",
        ),
    ] = None,
    baseline: Annotated[
        str, typer.Option("--baseline", help="Ad hoc only: none, base_model or api.")
    ] = "none",
    out: Annotated[
        Path, typer.Option("--out", help="Ad hoc only: folder for eval.json, eval.md, predictions.")
    ] = Path("reports/adhoc"),
) -> None:
    """Score candidates and a baseline on the test split: metrics with CIs, judge, gates.

    With --data and/or --adapter it scores any adapter on any JSONL, writing to --out
    (the pipeline's metrics/eval.json and reports/ are left alone).
    """
    import re

    from ..evaluation.report import fmt, gate_table
    from ..stages import evaluate

    values = load(params, set_)
    try:
        cfg = section(values, "evaluate", EvaluateConfig)
        adapters = fields = None
        if data is not None or adapter is not None:
            out.mkdir(parents=True, exist_ok=True)
            update = {
                "metrics": str(out / "eval.json"),
                "reports_dir": str(out),
                "baseline": baseline,
                "log_mlflow": False,
                "validation": None,  # ad hoc: nothing to select, or select on the given file
            }
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
        result = evaluate.run(
            cfg,
            task_of(values),
            model_dir(values),
            section(values, "judge", JudgeConfig),
            section(values, "gates", GatesConfig),
            section(values, "mlflow", MlflowConfig),
            values,
            adapters=adapters,
            fields=fields,
        )
    except (ConfigError, evaluate.EvalError, FileNotFoundError) as err:
        fail(err)
    primary = result.primary_metric
    for name, entry in result.candidates.items():
        delta = (entry.delta_vs_baseline or {}).get(primary)
        typer.echo(
            f"{name}: {primary} {fmt(entry.metrics[primary].model_dump())}, "
            f"json_valid_rate {fmt(entry.metrics['json_valid_rate'].model_dump())}"
            + (f", delta vs baseline {fmt(delta.model_dump())}" if delta else "")
        )
    if result.baseline is not None:
        typer.echo(
            f"baseline ({result.baseline.kind}): {primary} "
            f"{fmt(result.baseline.metrics[primary].model_dump())}"
        )
    if result.classical is not None:
        typer.echo(
            f"classical yardstick (TF-IDF + logistic regression, {result.classical.n_train} "
            f"training records): {primary} {fmt(result.classical.metrics[primary].model_dump())}"
            if primary in result.classical.metrics
            else "classical yardstick: no figure for the primary metric"
        )
        for name, entry in result.candidates.items():
            d = (entry.delta_vs_classical or {}).get(primary)
            if d is not None:
                typer.echo(f"{name} - classical yardstick: {primary} {fmt(d.model_dump())}")
    typer.echo(gate_table(result))
    sel = result.selection
    if sel is not None and len(sel.values) > 1:
        typer.echo(
            f"winner chosen on {sel.split} (n={sel.n_examples}), reported on test "
            f"(n={result.n_examples})" + (": optimistic" if sel.split == "test" else "")
        )
    typer.echo(f"winner: {result.winner}  (report: {cfg.reports_dir}/eval.md)")


def register_cmd(params: ParamsOpt = PARAMS, set_: SetOpt = None) -> None:
    """Register the evaluation's winner as a new model version with alias `challenger`."""
    from ..evaluation.bundle import BundleError, generation_settings
    from ..stages import register

    values = load(params, set_)
    try:
        task = task_of(values)
        summary = register.run(
            section(values, "register", RegisterConfig),
            values,
            section(values, "mlflow", MlflowConfig),
            model_dir(values),
            task,
            generation_settings(task, section(values, "evaluate", EvaluateConfig)),
        )
    except (ConfigError, register.RegisterError, BundleError, FileNotFoundError) as err:
        fail(err)
    if summary["registered"]:
        alias = (
            f"@{summary['alias']}"
            if summary["alias"]
            else f"dvc experiment {summary['experiment']}: alias not moved"
        )
        typer.echo(
            f"registered {summary['model_name']} version {summary['version']} "
            f"({alias}) from candidate {summary['candidate']}: "
            f"{summary['primary_metric']} {summary[summary['primary_metric']]:.4f}"
        )
    else:
        typer.secho(f"not registered: {summary['reason']}", fg=typer.colors.YELLOW)


def route_cmd(params: ParamsOpt = PARAMS, set_: SetOpt = None) -> None:
    """Fit the self tier's threshold on validation, replay the test split through the
    routing policy, and price it against all-API (reports/route.md)."""
    from ..online.route.config import RouteConfig
    from ..results import ResultError
    from ..stages import route

    values = load(params, set_)
    try:
        cfg = section(values, "route", RouteConfig)
        result = route.run(cfg, task_of(values))
    except (ConfigError, route.RouteError, ResultError) as err:
        fail(err)
    shares = ", ".join(f"{t} {result.shares[t]:.0%}" for t in result.tiers)
    typer.echo(
        f"route: threshold {result.threshold:.4f} ({shares}); accuracy "
        f"{result.accuracy.value:.3f}{' (API tiers: oracle)' if result.oracle else ''}, "
        f"${result.usd_per_1k.value:.4f} per 1k requests  "
        f"(report: {cfg.calibrate.reports_dir}/route.md)"
    )
