"""The release commands (gates, promotion, rollback, pull, merge) and helpers (profile, ui)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import ConfigError, read_yaml
from ..params import TemperParams
from ..release.promote import PromoteConfig
from .common import PARAMS, ParamsOpt, SetOpt, load
from .profiles import profile_overrides, read_profile


def gate_cmd(
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
    eval_file: Annotated[Path, typer.Option("--eval", help="The evaluation to check.")] = Path(
        "metrics/eval.json"
    ),
    candidate: Annotated[
        str | None,
        typer.Option(
            "--candidate", "-c", help="Check this candidate (default: is there a winner?)."
        ),
    ] = None,
) -> None:
    """Re-check the gates of `gates:` against an evaluation; exit 1 when they fail.

    Thresholds come from the params (so `-S gates.min_primary=0.8` tries a stricter gate
    without re-running the evaluation). Exit codes: 0 pass, 1 fail, 2 bad input.
    """
    from ..evaluation.gates import gate_all
    from ..evaluation.report import gate_table
    from ..results import EvalResult

    gates_cfg = load(params, set_).gates
    result = EvalResult.load(eval_file)
    if candidate is not None:
        result.candidate(candidate, eval_file)
    winner = gate_all(gates_cfg, result)
    typer.echo(gate_table(result))
    if candidate is not None:
        ok = bool(result.candidates[candidate].gates.passed)
        typer.echo(f"{candidate}: {'PASS' if ok else 'FAIL'}")
    else:
        ok = winner is not None
        sel = result.selection
        if ok:
            typer.echo(f"winner: {winner}")
        elif sel is not None and sel.split == "validation" and sel.chosen is not None:
            typer.echo(f"no winner: {sel.chosen}, chosen on validation, fails its gates on test")
        else:
            typer.echo("no candidate passes the gates")
    raise typer.Exit(0 if ok else 1)


def registry_client(p: TemperParams) -> Any:
    """MLflow pointed at the configured store (embedded sqlite by default)."""
    import mlflow

    from .. import tracking

    tracking.setup(p.mlflow)
    return mlflow.MlflowClient()


def promotion_context(p: TemperParams) -> tuple[PromoteConfig, str, Any]:
    """The promote config, the registered model's name and a registry client."""
    return p.promote, p.register.model_name, registry_client(p)


def promote_cmd(
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
    rescore: Annotated[
        bool | None,
        typer.Option(
            "--rescore/--no-rescore",
            help="Re-score the champion on the challenger's evaluation set: always / never "
            "(default: promote.rescore, auto = when the sets differ).",
        ),
    ] = None,
) -> None:
    """Make `challenger` the `champion` if it passes the gates and is not worse.

    The gates in force (`gates:`) are checked again on the challenger's recorded evaluation.
    When the two were evaluated on different sets, the champion is re-scored on the
    challenger's (its adapter from the registry, the base model of `model.dir`).
    Exit codes: 0 promoted (or already champion), 1 refused, 2 cannot decide (missing alias,
    scores or config). The decision is written to the version's tags and promote.report.
    """
    from ..release import promote

    p = load(params, set_)
    cfg, name, client = promotion_context(p)
    if rescore is not None:
        cfg = cfg.model_copy(update={"rescore": "always" if rescore else "never"})

    def rescorer(version: str, evaluation: Any, ids: list[str]) -> dict[str, float]:
        from ..release.rescore import champion_scores

        task = p.load_task()
        return champion_scores(name, version, evaluation, ids, task, p.model.dir, p.evaluate)

    decision = promote.decide(client, name, cfg, p.gates, rescorer)
    promote.write_report(cfg.report, decision, "promote", promote.history(client, name))
    changed = decision.promoted or decision.champion_after == decision.challenger
    typer.secho(
        ("promoted: " if decision.promoted else "not promoted: ") + decision.reason,
        fg=typer.colors.GREEN if changed else typer.colors.RED,
    )
    typer.echo(
        f"{name}@{cfg.champion_alias} = v{decision.champion_after or '-'}; report: {cfg.report}"
    )
    if not changed:
        raise typer.Exit(1)


def rollback_cmd(params: ParamsOpt = PARAMS, set_: SetOpt = None) -> None:
    """Point `champion` back at the previous champion (exit 2 when there is none)."""
    from ..release import promote

    cfg, name, client = promotion_context(load(params, set_))
    decision = promote.rollback(client, name, cfg)
    promote.write_report(cfg.report, decision, "rollback", promote.history(client, name))
    typer.echo(f"{decision.reason}; report: {cfg.report}")


def pull_cmd(
    uri: Annotated[
        str,
        typer.Argument(
            help="models:/<name>@<alias>, models:/<name>/<version>, or <name> for its champion."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Target folder (default models/pulled/<name>-v<version>)."
        ),
    ] = None,
    with_base: Annotated[
        bool, typer.Option("--with-base", help="Copy the base weights in: fully self-contained.")
    ] = False,
    base: Annotated[
        Path | None, typer.Option(help="Base model folder for --with-base (default: model.dir).")
    ] = None,
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
) -> None:
    """Write a registered version as a portable bundle (relative paths only): adapter (checked
    by hash), task.yaml, tokenizer + chat template, serving.json (base identity, generation
    settings), README; `--with-base` adds the base weights."""
    from ..tracking import pull

    p = load(params, set_)
    registry_client(p)
    path = pull.pull(uri, out, base or p.base_dir, with_base)
    typer.echo(
        f"pulled into {path}: load with temper.bundle.load_bundle('{path}') "
        f"or run `temper predict --model {path} --input FILE`"
    )


def merge_cmd(
    candidate: Annotated[
        Path,
        typer.Argument(help="A candidate folder (models/candidates/NAME) or an adapter folder."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the merged model goes.")],
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
    base: Annotated[
        Path | None, typer.Option(help="Base model folder (default: model.dir).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="bfloat16 | float16 | float32.")] = "bfloat16",
) -> None:
    """Merge a LoRA adapter into its base model: a standalone 16-bit model for serving.

    QLoRA adapters are merged into the dequantized 4-bit weights (a warning says so).
    """
    from ..release.merge import merge

    p = load(params, set_)
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ConfigError(f"--dtype {dtype!r}: use bfloat16, float16 or float32")
    info = merge(candidate, out, base or p.base_dir, dtype)
    typer.echo(
        f"merged {info['adapter']} into {info['base']} -> {out} ({info['dtype']}"
        f"{', from dequantized 4-bit weights' if info['dequantized'] else ''})"
    )


# --- helpers: profiles, the MLflow UI ----------------------------------------------------------


def profile_cmd(
    name: Annotated[str, typer.Argument(help="Profile name: a file configs/profiles/NAME.yaml.")],
    params: ParamsOpt = PARAMS,
) -> None:
    """Print a profile as the `-S` overrides that turn params.yaml into it, shell-quoted:
    `eval "dvc exp run $(temper profile nli)"` (eval keeps values with spaces whole)."""
    overrides = profile_overrides(read_profile(name), read_yaml(params), TemperParams)
    # Unquoted unless a value has a space: `$(temper profile full)` then splits into whole
    # arguments. A value with spaces is quoted and needs `eval "dvc exp run $(...)"`.
    spaced = [o for o in overrides if any(c.isspace() for c in o)]
    if spaced:
        typer.echo(
            f"note: {len(spaced)} value(s) with spaces are quoted: run it as "
            f'eval "dvc exp run $(temper profile {name})"',
            err=True,
        )
    typer.echo(" ".join(f"-S {shlex.quote(o) if o in spaced else o}" for o in overrides))


def ui_cmd(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
    host: Annotated[
        str, typer.Option(help="Interface (keep loopback unless you mean it).")
    ] = "127.0.0.1",
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
) -> None:
    """Open the MLflow UI on the embedded store (one lean server process; Ctrl-C stops it)."""
    import mlflow

    from .. import tracking

    p = load(params, set_)
    cfg = p.mlflow
    uri = tracking.tracking_uri(cfg)
    if not uri.startswith("sqlite:"):
        typer.echo(f"the store is a server already: open {tracking.redact_uri(uri)}")
        return
    experiment_id = tracking.setup(cfg)
    primary = p.evaluate.primary_metric
    tracking.ensure_candidates_view(mlflow.MlflowClient(), experiment_id, primary)
    cmd, env = tracking.lean_server_command(uri, cfg.artifact_root, host, port)
    typer.echo(
        "candidates side by side: "
        + tracking.runs_table_url(f"http://{host}:{port}", experiment_id)
    )
    os.execvpe(cmd[0], cmd, env)  # the server replaces this process: Ctrl-C stops it cleanly
