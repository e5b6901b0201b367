"""`temper monitor ...`: check what `temper serve` logged (docs/monitor.md).

    temper monitor judge            # an LLM verdict on monitor.judge.share of the answers
    temper monitor review export    # a CSV and a Label Studio file for reviewers
    temper monitor review import F  # their labels back (CSV or Label Studio JSON export)
    temper monitor probe            # the probe clauses to each API tier: vendor updates
    temper monitor report           # report.md + plots + gauges; exit 3 on an alarm

Meant for cron or CI beside a running server; each reads and writes `monitor.path`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import ConfigError, section
from .common import PARAMS, ParamsOpt, SetOpt, fail, load, task_of
from .params_help import help_command

ALARM_EXIT = 3

monitor_app = typer.Typer(
    help="Watch the served model: judge sampled answers, human review, drift, probes, report.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
review_app = typer.Typer(
    help="Human review: export answers to label, import the labels.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
monitor_app.add_typer(review_app, name="review")


def _open(values):
    from ..online.monitor import MonitorConfig, MonitorStore

    cfg = section(values, "monitor", MonitorConfig)
    if not Path(cfg.path).exists():
        raise ConfigError(
            f"monitor.path: {cfg.path} does not exist: `temper serve` (with monitor.log) writes it"
        )
    return cfg, MonitorStore(cfg.path)


@monitor_app.command("judge", cls=help_command(("monitor",)))
def judge_cmd(params: ParamsOpt = PARAMS, set_: SetOpt = None) -> None:
    """Judge the sampled logged answers not judged yet. Exit 3: the judge's budget ran out."""
    from ..online.monitor.judge import run_judge
    from ..providers import ProviderError

    values = load(params, set_)
    try:
        cfg, store = _open(values)
        with store:
            run = run_judge(cfg, task_of(values), store)
    except (ConfigError, ProviderError) as err:
        fail(err, 2)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(run.counts.items())) or "none"
    typer.echo(
        f"judged {run.judged} ({counts}); failed {run.failed}; without text {run.unjudgeable}; "
        f"left {run.left}; spent ${run.usd:.4f} (total ${run.spent_usd:.4f} of "
        f"${run.budget_usd:.2f})"
    )
    if run.budget_stop:
        fail(ConfigError("the judge's budget (monitor.judge.provider.max_usd) is spent"), 3)


@review_app.command("export", cls=help_command(("monitor",)))
def review_export_cmd(
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder (default monitor.review.out_dir).")
    ] = None,
) -> None:
    """Write review.csv, label_studio_tasks.json and label_config.xml of answers to review."""
    from ..online.monitor.review import export_reviews

    values = load(params, set_)
    try:
        cfg, store = _open(values)
        with store:
            done = export_reviews(cfg, store, out or cfg.review.out_dir)
    except ConfigError as err:
        fail(err, 2)
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(done.by_reason.items())) or "none"
    typer.echo(f"{done.rows} answers to review ({reasons}): {done.csv}, {done.label_studio}")


@review_app.command("import", cls=help_command(("monitor",)))
def review_import_cmd(
    file: Annotated[Path, typer.Argument(help="The filled-in CSV, or Label Studio's JSON export.")],
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
) -> None:
    """Store reviewers' verdicts (all rows or none) and print judge-human agreement."""
    from ..online.monitor.review import ReviewError, agreement, import_reviews

    values = load(params, set_)
    try:
        if not file.exists():
            raise ConfigError(f"{file}: no such file")
        cfg, store = _open(values)
        with store:
            n = import_reviews(store, file)
            a = agreement(cfg, store)
    except (ConfigError, ReviewError) as err:
        fail(err, 2)
    kappa = "-" if a.kappa is None else f"{a.kappa:.3f}"
    share = "-" if a.agreement is None else f"{a.agreement:.3f}"
    typer.echo(f"imported {n} reviews; judge vs human on {a.n}: agreement {share}, kappa {kappa}")


@monitor_app.command("probe", cls=help_command(("monitor", "route")))
def probe_cmd(
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
    tier: Annotated[list[str] | None, typer.Option(help="Only this tier (repeatable).")] = None,
) -> None:
    """Ask each API tier the probe set; exit 3 when a tier's answers changed beyond chance."""
    from ..online.monitor import MonitorConfig, MonitorStore
    from ..online.monitor.probe import run_probe
    from ..online.route import RouteConfig
    from ..providers import ProviderError

    values = load(params, set_)
    try:
        cfg = section(values, "monitor", MonitorConfig)
        with MonitorStore(cfg.path) as store:
            results = run_probe(
                cfg.probe, section(values, "route", RouteConfig), task_of(values), store, tier
            )
    except (ConfigError, ProviderError) as err:
        fail(err, 2)
    for r in results:
        if r.agree is None:
            typer.echo(f"{r.tier}: {r.answered}/{r.n} answered; recorded as the reference run")
        else:
            typer.echo(
                f"{r.tier}: {r.agree} of {r.n} repeat the reference (p = {r.p_value:.3g})"
                + ("  ALARM" if r.alarm else "")
            )
    if any(r.alarm for r in results):
        raise typer.Exit(ALARM_EXIT)


@monitor_app.command("report", cls=help_command(("monitor",)))
def report_cmd(
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
    no_embed: Annotated[
        bool, typer.Option("--no-embed", help="Skip input drift (no embedder loaded).")
    ] = False,
) -> None:
    """Write report.md, its plots and the gauges. Exit 0: no alarm; 2: bad configuration or
    input; 3: an alarm (drift, quality, probe), named on stdout."""
    from ..online.monitor.checks import run_checks
    from ..online.monitor.probe import latest
    from ..online.monitor.report import write_report
    from ..online.route import RouteConfig
    from ..results import ResultError

    values = load(params, set_)
    try:
        cfg, store = _open(values)
        task = task_of(values)
        embedder = None
        if not no_embed:
            from ..online.cache.embedder import SentenceEmbedder

            embedder = SentenceEmbedder(cfg.embedder)
        with store:
            probes = latest(cfg.probe, section(values, "route", RouteConfig), task, store)
            result = run_checks(cfg, task, store, embedder, probes)
        path = write_report(result, cfg.report_dir, cfg.state_file)
    except (ConfigError, ResultError) as err:
        fail(err, 2)
    typer.echo(
        f"{result.requests} requests; alarms: {', '.join(result.alarms) or 'none'}; "
        f"report in {path}"
    )
    if result.alarms:
        raise typer.Exit(ALARM_EXIT)
