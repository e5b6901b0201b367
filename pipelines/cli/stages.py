"""The stage commands: what `dvc repro` runs, one per stage of dvc.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import PARAMS, ParamsOpt, SetOpt, load


def base_model_cmd(params: ParamsOpt = PARAMS, set_: SetOpt = None) -> None:
    """Resolve `model.base` into a local safetensors folder (built-in default works offline)."""
    from ..stages import base_model

    out = base_model.run(load(params, set_).model)
    typer.echo(f"base model ready in {out}")


def prepare_cmd(params: ParamsOpt = PARAMS, set_: SetOpt = None) -> None:
    """Clean, de-duplicate, split by document and render the task's chat records."""
    from ..stages import prepare

    p = load(params, set_)
    stats = prepare.run(p.prepare, p.load_task(), p.model.dir)
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

    p = load(params, set_)
    cfg = p.distil
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
    m = distil.run(cfg, p.load_task(), p.tracking())
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
    from ..stages import train

    p = load(params, set_)
    cfg = p.train.only(candidate)
    if launched:  # this process is one rank: train here, the launcher reports
        for name in cfg.candidates:
            train.train_candidate(cfg.candidate(name), p.base_dir, p.tracking())
        return
    results = train.run(cfg, p.base_dir, p.tracking())
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
    from ..stages import evaluate

    p = load(params, set_)
    cfg, fields = p.evaluate, None
    if data is not None or adapter is not None:
        out.mkdir(parents=True, exist_ok=True)
        update = {
            "metrics": str(out / "eval.json"),
            "reports_dir": str(out),
            "baseline": baseline,
            "log_mlflow": False,
            "validation": None,  # ad hoc: nothing to select, or select on the given file
            "adapter": adapter,
        }
        if data is not None:
            update["test"] = str(data)
            fields = p.prepare.fields
        cfg = cfg.model_copy(update=update)
    setup = evaluate.Setup(p.base_dir, p.judge, p.gates, p.vllm, fields, p.tracking())
    result = evaluate.run(cfg, p.load_task(), setup)
    print_evaluation(result)
    typer.echo(f"winner: {result.winner}  (report: {cfg.reports_dir}/eval.md)")


def print_evaluation(result) -> None:
    """Each candidate's primary metric, the baseline's and the yardstick's, the gates."""
    from ..evaluation.report import fmt, gate_table

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


def register_cmd(params: ParamsOpt = PARAMS, set_: SetOpt = None) -> None:
    """Register the evaluation's winner as a new model version with alias `challenger`."""
    from ..bundle import generation_settings
    from ..stages import register

    p = load(params, set_)
    task = p.load_task()
    served = register.Served(task, p.base_dir, generation_settings(task, p.evaluate))
    summary = register.run(p.register, p.tracking(), served)
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
    from ..stages import route

    p = load(params, set_)
    cfg = p.route
    result = route.run(cfg, p.load_task())
    shares = ", ".join(f"{t} {result.shares[t]:.0%}" for t in result.tiers)
    typer.echo(
        f"route: threshold {result.threshold:.4f} ({shares}); accuracy "
        f"{result.accuracy.value:.3f}{' (API tiers: oracle)' if result.oracle else ''}, "
        f"${result.usd_per_1k.value:.4f} per 1k requests  "
        f"(report: {cfg.calibrate.reports_dir}/route.md)"
    )
