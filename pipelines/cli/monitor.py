"""`temper monitor ...`: check what `temper serve` logged (docs/monitor.md).

    temper monitor judge            # an LLM verdict on monitor.judge.share of the answers
    temper monitor review export    # a CSV and a Label Studio file for reviewers
    temper monitor review import F  # their labels back (CSV or Label Studio JSON export)
    temper monitor probe            # the probe clauses to each API tier: vendor updates
    temper monitor report           # report.md + plots + gauges; exit 3 on an alarm

Meant for cron or CI beside a running server; each reads and writes `monitor.path`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from ..config import ConfigError
from ..params import TemperParams
from .common import PARAMS, ParamsOpt, SetOpt, fail, load, reports_errors
from .params_help import help_command

ALARM_EXIT = 3
BAD_INPUT = 2  # every monitor command: a Temper error exits 2 (0 and 3 are verdicts)

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


def command(app: typer.Typer, name: str, sections: tuple[str, ...]) -> Callable:
    """Register a monitor command with its params help and the CLI's one error handler."""

    def register(function: Callable[..., None]) -> Callable[..., None]:
        app.command(name, cls=help_command(sections))(reports_errors(function, BAD_INPUT))
        return function

    return register


def _open(p: TemperParams):
    from ..online.monitor import MonitorStore

    cfg = p.monitor
    if not Path(cfg.path).exists():
        raise ConfigError(
            f"monitor.path: {cfg.path} does not exist: `temper serve` (with monitor.log) writes it"
        )
    return cfg, MonitorStore(cfg.path)


@command(monitor_app, "judge", ("monitor",))
def judge_cmd(params: ParamsOpt = PARAMS, set_: SetOpt = None) -> None:
    """Judge the sampled logged answers not judged yet. Exit 3: the judge's budget ran out."""
    from ..online.monitor.judge import run_judge

    p = load(params, set_)
    cfg, store = _open(p)
    with store:
        run = run_judge(cfg, p.load_task(), store)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(run.counts.items())) or "none"
    typer.echo(
        f"judged {run.judged} ({counts}); failed {run.failed}; without text {run.unjudgeable}; "
        f"left {run.left}; spent ${run.usd:.4f} (total ${run.spent_usd:.4f} of "
        f"${run.budget_usd:.2f})"
    )
    if run.budget_stop:
        fail(ConfigError("the judge's budget (monitor.judge.provider.max_usd) is spent"), 3)


@command(review_app, "export", ("monitor",))
def review_export_cmd(
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder (default monitor.review.out_dir).")
    ] = None,
) -> None:
    """Write review.csv, label_studio_tasks.json and label_config.xml of answers to review."""
    from ..online.monitor.review import export_reviews

    cfg, store = _open(load(params, set_))
    with store:
        done = export_reviews(cfg, store, out or cfg.review.out_dir)
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(done.by_reason.items())) or "none"
    typer.echo(f"{done.rows} answers to review ({reasons}): {done.csv}, {done.label_studio}")


@command(review_app, "import", ("monitor",))
def review_import_cmd(
    file: Annotated[Path, typer.Argument(help="The filled-in CSV, or Label Studio's JSON export.")],
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
) -> None:
    """Store reviewers' verdicts (all rows or none) and print judge-human agreement."""
    from ..online.monitor.review import agreement, import_reviews

    p = load(params, set_)
    if not file.exists():
        raise ConfigError(f"{file}: no such file")
    cfg, store = _open(p)
    with store:
        n = import_reviews(store, file)
        a = agreement(cfg, store)
    kappa = "-" if a.kappa is None else f"{a.kappa:.3f}"
    share = "-" if a.agreement is None else f"{a.agreement:.3f}"
    typer.echo(f"imported {n} reviews; judge vs human on {a.n}: agreement {share}, kappa {kappa}")


@command(monitor_app, "probe", ("monitor", "route"))
def probe_cmd(
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
    tier: Annotated[list[str] | None, typer.Option(help="Only this tier (repeatable).")] = None,
) -> None:
    """Ask each API tier the probe set; exit 3 when a tier's answers changed beyond chance."""
    from ..online.monitor import MonitorStore
    from ..online.monitor.probe import run_probe

    p = load(params, set_)
    with MonitorStore(p.monitor.path) as store:
        results = run_probe(p.monitor.probe, p.route, p.load_task(), store, tier)
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


@command(monitor_app, "report", ("monitor",))
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

    p = load(params, set_)
    cfg, store = _open(p)
    task = p.load_task()
    embedder = None
    if not no_embed:
        from ..online.cache.embedder import SentenceEmbedder

        embedder = SentenceEmbedder(cfg.embedder)
    with store:
        probes = latest(cfg.probe, p.route, task, store)
        result = run_checks(cfg, task, store, embedder, probes)
    path = write_report(result, cfg.report_dir, cfg.state_file)
    typer.echo(
        f"{result.requests} requests; alarms: {', '.join(result.alarms) or 'none'}; "
        f"report in {path}"
    )
    if result.alarms:
        raise typer.Exit(ALARM_EXIT)
