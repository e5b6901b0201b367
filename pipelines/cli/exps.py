"""`temper exps`: the experiments table a person compares, on one screen.

`dvc exp show` lists every param and every number of every metrics file (over a thousand
columns: prepare's statistics, per-candidate CIs, price rows). This view keeps what people
compare: per experiment the params that differ between the rows shown, and the headline
results (task, winner, primary metric with its interval against the baseline and the TF-IDF
yardstick, the registered version); `--sweep NAME` keeps one sweep's arms (`temper sweep`),
with the candidate each picked on validation. It reads through DVC's own API (`dvc.api.exp_show`,
`params_show`, `read`), so it shows exactly the experiments `dvc exp show` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import ConfigError, flatten
from ..evaluation.report import md_table

WORKSPACE = "workspace"


def _read_json(path: str, rev: str | None) -> dict[str, Any] | None:
    import dvc.api

    try:
        return json.loads(dvc.api.read(path, rev=rev))
    except Exception:  # noqa: BLE001 - a failed or partial experiment has no such file
        return None


def _estimate(entry: dict[str, Any] | None, metric: str) -> str:
    est = ((entry or {}).get("metrics") or {}).get(metric) or {}
    value, low, high = est.get("value"), est.get("ci_low"), est.get("ci_high")
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")


def _picked_on_validation(ev: dict[str, Any]) -> str:
    """The candidate chosen on validation and its value there (`-` if not chosen so)."""
    chosen = ev.get("selection") or {}
    value = (chosen.get("values") or {}).get(chosen.get("chosen"))
    if chosen.get("split") != "validation" or value is None:
        return "-"
    return f"{chosen['chosen']} {value:.3f}"


def headline(rev: str | None, experiment: str | None = None) -> dict[str, str]:
    """The results of one experiment worth a column (`-` where it has none). `experiment`:
    the DVC experiment's name (None for a commit or the workspace); its register.json counts
    only if that experiment wrote it (an arm that stops at evaluate carries its commit's)."""
    ev = _read_json("metrics/eval.json", rev) or {}
    reg = _read_json("metrics/register.json", rev) or {}
    if reg.get("experiment") != experiment:
        reg = {}
    primary = ev.get("primary_metric", "-")
    cands = ev.get("candidates") or {}
    # The candidate picked on validation (as the pipeline run's headline metrics): it differs
    # from the winner only when the gates refuse the picked one.
    focus = (ev.get("selection") or {}).get("chosen") or ev.get("winner")
    focus = focus or next(iter(cands), None)
    version = f"v{reg['version']}" if reg.get("registered") else "-"
    return {
        "task": (ev.get("task") or {}).get("name", "-"),
        "winner": ev.get("winner") or ("none" if ev else "-"),
        "primary": primary,
        "validation": _picked_on_validation(ev),
        "candidate": (f"{focus} " if focus else "") + _estimate(cands.get(focus), primary),
        "baseline": _estimate(ev.get("baseline"), primary),
        "tf-idf": _estimate(ev.get("classical"), primary),
        "registered": version + (f" @{reg['alias']}" if reg.get("alias") else ""),
    }


def pending(state: str) -> dict[str, str]:
    """The row of an experiment with no results yet: its queue state, dashes elsewhere."""
    row = dict.fromkeys(("task", "winner", "primary", "validation", "candidate"), "-")
    return row | dict.fromkeys(("baseline", "tf-idf", "registered"), "-") | {"winner": state}


def changed_params(params: list[dict[str, Any]]) -> list[str]:
    """The dotted params whose values differ between the rows (sorted)."""
    flat = [flatten(p) for p in params]
    keys = sorted({k for f in flat for k in f})
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]


def _params(rev: str) -> dict[str, Any]:
    """The params of an exp_show row's revision (the workspace's own for its row)."""
    import dvc.api

    return dvc.api.params_show(rev=None if rev == WORKSPACE else rev)


def require_dvc_project(command: str) -> None:
    """A clear error, not DVC's clone traceback, when run outside a DVC project's root."""
    if not Path(".dvc").is_dir():
        raise ConfigError(f"no DVC project in {Path.cwd()}: run temper {command} in its root")


def sweep_baselines() -> list[str] | None:
    """Every commit that has experiments: a sweep's arms keep the commit they were queued
    on, and a commit made while they ran must not hide them (`dvc exp show` shows HEAD's)."""
    from dvc.repo import Repo

    with Repo() as repo:
        return list(repo.experiments.ls(all_commits=True)) or None


def exps_table(sweep: str | None = None, all_rows: bool = False) -> str:
    """The experiments as a Markdown table; `sweep`: only that sweep's arms."""
    import dvc.api

    require_dvc_project("exps")
    shown = dvc.api.exp_show(revs=sweep_baselines()) if sweep else dvc.api.exp_show()
    rows = [r for r in shown if all_rows or r["typ"] != "baseline" or r["rev"] == WORKSPACE]
    if sweep is not None:
        rows = [r for r in rows if (_params(r["rev"]).get("mlflow") or {}).get("sweep") == sweep]
    revs = [None if r["rev"] == WORKSPACE else r["rev"] for r in rows]
    names = [r["Experiment"] or r["rev"] for r in rows]
    params = [_params(r["rev"]) for r in rows]
    changed = changed_params(params)
    # A queued, running or failed experiment has no results of its own yet: its state instead.
    heads = [
        headline(rev, r["Experiment"])
        if r.get("State") in (None, "Success")
        else pending(r["State"])
        for rev, r in zip(revs, rows, strict=True)
    ]
    flat = [flatten(p) for p in params]
    header = ["experiment", *changed, "task name", "winner", "primary", "validation"]
    header += ["candidate", "baseline", "tf-idf", "registered"]
    table = []
    for name, f, h in zip(names, flat, heads, strict=True):
        table.append([name, *(json.dumps(f.get(k)) for k in changed), *h.values()])
    return md_table(header, table)


def exps_cmd(
    all_rows: Annotated[
        bool, typer.Option("--all", help="Also the baseline commits' rows (not only the head).")
    ] = False,
    sweep: Annotated[
        str | None, typer.Option("--sweep", help="Only the arms of this sweep (temper sweep).")
    ] = None,
) -> None:
    """The experiments on one screen: changed params and headline results (`dvc exp show`
    has them all)."""
    typer.echo(exps_table(sweep, all_rows))
