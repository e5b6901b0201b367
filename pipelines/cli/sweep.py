"""`temper sweep FILE`: a grid of settings run as DVC experiments, one queued experiment per arm.

A sweep file (configs/sweeps/) names the sweep, the settings every arm shares (`fixed`, a
profile), the axes (`grid`: one param and its values; `linked`: settings that move together,
such as more clauses for fewer epochs) and the stage the arms run up to (`target`). Every
combination of the axes is one arm: `dvc exp run --queue -n <sweep>-<i> -S ...`, then
`dvc queue start` runs them (DVC's run-cache restores what the arms share, prepare and
distil). In MLflow the arms' pipeline runs nest under one run `sweep-<name>` and log only the
swept params (`tracking.sweeps`), so the UI's Compare view draws parallel coordinates on them.
`temper exps --sweep NAME` is the table: one row per arm, the swept params, the candidate
picked on validation, and its test figure with its interval.

Written over the DVC command line, not its Python API: `dvc exp run --queue` and `dvc queue`
are the documented interface, and a sweep is exactly what a person would type, printed first.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import Field

from ..config import ConfigError, Section, load_params, read_yaml
from ..errors import TemperError
from ..params import TemperParams
from .common import PARAMS, ParamsOpt
from .profiles import override_value, profile_overrides

# Arm states in DVC's queue still to finish (any other has ended; only Success is good).
PENDING = {"Queued", "Running"}


class SweepError(TemperError):
    """DVC refused a command of the sweep, or an arm failed."""


class SweepSpec(Section):
    """A sweep file (configs/sweeps/*.yaml)."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="The sweep's name: arms are <name>-1, <name>-2, ..., its MLflow run "
        "sweep-<name>.",
    )
    target: str | None = Field(
        "evaluate",
        description="The stage each arm runs up to, with what it needs (null: the whole "
        "pipeline). evaluate: arms are measured, nothing is registered.",
    )
    fixed: dict[str, Any] = Field(
        default_factory=dict, description="A partial params file (a profile) every arm shares."
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="Axes: a dotted param and the values it takes."
    )
    linked: dict[str, list[dict[str, Any]]] = Field(
        default_factory=dict,
        description="Axes whose settings move together: a name and a list of "
        "{dotted param: value} mappings, one per step.",
    )


def read_sweep(path: Path) -> SweepSpec:
    """The sweep file at `path`, checked (an axis with no value is an error)."""
    from pydantic import ValidationError

    from ..config import invalid

    values = read_yaml(path)
    try:
        spec = SweepSpec.model_validate(values)
    except ValidationError as err:
        raise ConfigError(f"{path}: {invalid(err, SweepSpec, values)}") from None
    axes = {**spec.grid, **spec.linked}
    if not axes:
        raise ConfigError(f"{path}: no axis (grid or linked): nothing to sweep")
    if empty := [name for name, steps in axes.items() if not steps]:
        raise ConfigError(f"{path}: axis {empty[0]!r} has no value")
    return spec


def arms(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the axes, as {dotted param: value} per arm (grid axes first, in
    file order; the last axis varies fastest)."""
    axes: list[list[dict[str, Any]]] = [
        [{key: v} for v in values] for key, values in spec.grid.items()
    ]
    axes += list(spec.linked.values())
    return [
        {k: v for step in combination for k, v in step.items()}
        for combination in itertools.product(*axes)
    ]


def swept_keys(spec: SweepSpec) -> list[str]:
    """The dotted params the sweep varies, in file order."""
    keys = list(spec.grid)
    for steps in spec.linked.values():
        keys += [k for k in dict.fromkeys(k for step in steps for k in step) if k not in keys]
    return keys


def has_key(params: dict[str, Any], dotted: str) -> bool:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def arm_overrides(
    spec: SweepSpec, arm: dict[str, Any], params_file: Path, pinned: dict[str, Any]
) -> list[str]:
    """The `-S` list of one arm: the fixed profile, the arm's values (DVC's `+` on a key the
    params lack), the sweep's name and swept params, then `pinned` (`pinned_paths`)."""
    out = profile_overrides(spec.fixed, read_yaml(params_file), TemperParams)
    settings = {**arm, "mlflow.sweep": spec.name, "mlflow.sweep_params": swept_keys(spec)}
    for key, value in {**settings, **pinned}.items():
        known = has_key(load_params(params_file, out), key)
        out.append(f"{'' if known else '+'}{key}={override_value(value, key)}")
    return out


def check_arm(name: str, overrides: list[str], params_file: Path) -> None:
    """Fail before anything is queued when an arm's params do not validate."""
    try:
        TemperParams.load(params_file, overrides)
    except ConfigError as err:
        raise ConfigError(f"arm {name}: {err}") from None


def pinned_paths(params_file: Path) -> dict[str, Any]:
    """Settings that must name this project, not the copy a queued arm runs in (under
    .dvc/tmp/exps): the embedded MLflow store (else each arm logs into its own copy, lost
    with it; a store named in the params or $MLFLOW_TRACKING_URI, which queue workers
    inherit, is left alone) and evaluate's cache (arms on the same training data share one
    base-model baseline: the first makes it, the others reuse it)."""
    from ..tracking import tracking_uri

    params = TemperParams.load(params_file)
    pins: dict[str, Any] = {}
    if not (params.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        pins["mlflow.tracking_uri"] = tracking_uri(params.mlflow, Path.cwd())
    cache = params.evaluate.cache_dir
    if cache and not Path(cache).is_absolute():
        pins["evaluate.cache_dir"] = str(Path.cwd().resolve() / cache)
    return pins


def close_sweep_run(spec: SweepSpec, params_file: Path, states: dict[str, str]) -> None:
    """The sweep's run and its arms' runs ended as the arms did in DVC's queue."""
    import mlflow

    from ..tracking import setup
    from ..tracking.sweeps import end_sweep

    experiment_id = setup(TemperParams.load(params_file).mlflow)
    end_sweep(mlflow.MlflowClient(), experiment_id, spec.name, states)


def open_sweep_run(spec: SweepSpec, params_file: Path) -> str:
    """The sweep's MLflow run, made before any arm runs (arms on a server find it)."""
    import mlflow

    from ..tracking import setup
    from ..tracking.runs import store_lock, tracking_uri
    from ..tracking.sweeps import sweep_run

    cfg = TemperParams.load(params_file).mlflow
    experiment_id = setup(cfg)
    with store_lock(tracking_uri(cfg)):
        return sweep_run(mlflow.MlflowClient(), experiment_id, spec.name, swept_keys(spec))


def dvc(*args: str) -> str:
    """Run `dvc ARGS`; its output, or a ConfigError with DVC's own message."""
    done = subprocess.run(["dvc", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise SweepError(f"dvc {shlex.join(args[:3])} ...: " + " / ".join(tail))
    return done.stdout


def queue_states(names: set[str]) -> tuple[dict[str, str], bool]:
    """The arms' states in DVC's queue (Queued, Running, Success, Failed) and whether a queue
    worker is alive, read from the queue's files. Not `dvc queue status`: its worker query is a
    broadcast through the queue's filesystem broker, whose messages kombu does not write
    atomically; a worker that read one half-written died of it (JSONDecodeError) in CI and
    left the other arms queued for good."""
    from dvc.repo import Repo

    states: dict[str, str] = {}
    with Repo() as repo:
        queue = repo.experiments.celery_queue
        for entry, result in queue.iter_done():  # an earlier sweep's arm of the same name too
            states[entry.name] = "Success" if result is not None else "Failed"
        states |= {entry.name: "Running" for entry in queue.iter_active()}
        states |= {entry.name: "Queued" for entry in queue.iter_queued()}
        alive = any(worker_alive(info) for info in Path(queue.wdir).glob("dvc-exp-worker-*.json"))
    return {name: state for name, state in states.items() if name in names}, alive


def worker_alive(info_file: Path) -> bool:
    """Whether the queue worker of this process-info file (DVC's, one per worker) runs."""
    try:
        info = json.loads(info_file.read_text() or "{}")
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return info.get("returncode") is None


def wait_for(names: list[str], poll_s: float) -> dict[str, str]:
    """Watch the queue until no arm is queued or running; print each arm as it ends. A worker
    gone with arms left (seen twice: a new worker writes its file a moment after it starts)
    is a SweepError that says how to go on."""
    done: dict[str, str] = {}
    missing_worker = 0
    while True:
        states, alive = queue_states(set(names))
        for name in names:
            state = states.get(name, "Removed")
            if state not in PENDING and name not in done:
                done[name] = state
                typer.echo(f"  {name}: {state} ({len(done)}/{len(names)})")
        if len(done) == len(names):
            return done
        missing_worker = 0 if alive else missing_worker + 1
        if missing_worker >= 2:
            left = ", ".join(n for n in names if n not in done)
            raise SweepError(
                f"DVC's queue worker stopped with arms {left} unrun: `dvc queue start` runs "
                "them, `cat .dvc/tmp/exps/celery/*.out` says why it stopped"
            )
        time.sleep(poll_s)


def sweep_cmd(
    file: Annotated[Path, typer.Argument(help="The sweep file, e.g. configs/sweeps/quick.yaml.")],
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Arms run at once.")] = 1,
    queue_only: Annotated[
        bool, typer.Option("--queue-only", help="Queue the arms; `dvc queue start` runs them.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the commands only.")] = False,
    poll_s: Annotated[float, typer.Option(help="Seconds between looks at the queue.")] = 10.0,
    params: ParamsOpt = PARAMS,
) -> None:
    """Queue one DVC experiment per combination of a sweep file's axes, run them, and print
    the arms side by side (docs/train.md, "Sweeps")."""
    from .exps import exps_table, require_dvc_project

    spec = read_sweep(file)
    require_dvc_project("sweep")
    pinned = pinned_paths(params)
    plan = []
    for i, arm in enumerate(arms(spec), start=1):
        name = f"{spec.name}-{i}"
        overrides = arm_overrides(spec, arm, params, pinned)
        check_arm(name, overrides, params)
        args = ["exp", "run", "--queue", "-n", name, *(a for o in overrides for a in ("-S", o))]
        plan.append((name, [*args, *([spec.target] if spec.target else [])], arm))
    for name, args, arm in plan:
        typer.echo(f"{name}: {json.dumps(arm)}\n  dvc {shlex.join(args)}")
    if dry_run:
        return
    open_sweep_run(spec, params)
    for _, args, _ in plan:
        dvc(*args)
    if queue_only:
        typer.echo(f"queued {len(plan)} arms: `dvc queue start -j {jobs}` runs them")
        return
    dvc("queue", "start", "-j", str(jobs))
    ended = wait_for([name for name, _, _ in plan], poll_s)
    close_sweep_run(spec, params, ended)
    typer.echo(exps_table(sweep=spec.name))
    if bad := [name for name, state in ended.items() if state != "Success"]:
        raise SweepError(f"arms {', '.join(bad)} did not succeed: `dvc queue logs NAME` says why")
