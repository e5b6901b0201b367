"""The MLflow UI: a lean `mlflow server` and the runs-table view Temper links to."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Any

# A view of the runs table that groups runs by their parent (the pipeline run), so every
# candidate's train/eval run is visible side by side without expanding rows by hand, with the
# columns a data scientist compares candidates on. It uses the UI's own "share view" mechanism:
# the state lives in an experiment tag and the URL names it (`?viewStateShareKey=`).
#
# The UI (MLflow 3.17, runs table) reads from that state the keys of its UI state
# (`selectedColumns`, `columnOrder`, `columnWidths`, `groupBy`, ... : the list `HC` in its JS
# bundle); a column key is `<kind>.\`<name>\`` with kind `attributes`, `metrics`, `params` or
# `tags`, and the attribute columns one can select are named `Dataset`, `Models`, `Source`,
# `User`, `Version`, `Description`. `selectedColumns` alone puts the columns at the end, after
# the fixed ones and sorted by name (an interval's `ci_high` before its `ci_low`), and the grid
# renders only the columns in sight: `columnOrder` and `columnWidths` bring them into view.
CANDIDATES_VIEW = "temper-candidates"
SHARED_VIEW_TAG = "mlflow.sharedViewState."

# The params that tell candidates apart (train.candidates overrides these) and the training
# figures every candidate's eval run carries next to its evaluation.
KEY_PARAMS = (
    "train.method",
    "train.rank",
    "train.layers",
    "train.learning_rate",
    "train.max_steps",
)
TRAIN_METRICS = ("train.val_loss", "train.tokens_per_s")
FIXED_COLUMNS = ("attributes.`Run Name`", "runDateAndNestInfo")  # always shown, first


def view_columns(primary_metric: str) -> list[str]:
    """The view's columns, in order: the dataset, the primary metric with its interval, the
    key params, the training figures, the logged models."""
    metrics = [primary_metric, f"{primary_metric}.ci_low", f"{primary_metric}.ci_high"]
    return (
        ["attributes.`Dataset`"]
        + [f"metrics.`{m}`" for m in metrics]
        + [f"params.`{p}`" for p in KEY_PARAMS]
        + [f"metrics.`{m}`" for m in TRAIN_METRICS]
        + ["attributes.`Models`"]
    )


def view_state(primary_metric: str) -> dict[str, Any]:
    columns = view_columns(primary_metric)
    # Wide enough for the header to show the whole name (`...ci_low` vs `...ci_high`).
    widths = {
        c: max(90, 7 * len(c.split("`")[1]) + 16)
        for c in columns
        if c.startswith(("metrics.", "params."))
    }
    widths["attributes.`Dataset`"] = 220
    return {
        "groupBy": "tag.average.mlflow.parentRunId",
        "selectedColumns": columns,
        "columnOrder": [*FIXED_COLUMNS, *columns, "duration"],
        "columnWidths": widths,
    }


def ensure_candidates_view(
    client: Any, experiment_id: str, primary_metric: str = "clause_type.accuracy"
) -> None:
    """Write (or refresh) the shared view `temper-candidates` of the experiment's runs table.

    Two stages of two users writing it at one moment race inside the MLflow server (on
    PostgreSQL its insert-or-update is not atomic: the loser gets a unique violation on
    `experiment_tag_pk`); the tag exists by then, so one more write updates it."""
    import json

    from mlflow.exceptions import MlflowException

    key, value = SHARED_VIEW_TAG + CANDIDATES_VIEW, json.dumps(view_state(primary_metric))
    try:
        client.set_experiment_tag(experiment_id, key, value)
    except MlflowException as err:
        if "experiment_tag_pk" not in str(err) and "UNIQUE constraint" not in str(err):
            raise
        client.set_experiment_tag(experiment_id, key, value)


def runs_table_url(base_url: str, experiment_id: str, view: str | None = CANDIDATES_VIEW) -> str:
    url = f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return f"{url}?viewStateShareKey={view}" if view else url


def lean_server_command(
    backend_uri: str,
    artifacts_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 5000,
    app_name: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """`mlflow server` with one worker and no job runner: ~565 MiB and 1 process instead of
    15 processes and 3.5 GiB with the defaults (measured, see STACK-FACTS). `app_name`:
    MLflow's `--app-name` (`basic-auth` for its user/password app, docs/team.md)."""
    import shutil
    import sys

    exe = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    cmd = [
        exe,
        "server",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        str(Path(artifacts_dir).resolve()),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
        *(["--app-name", app_name] if app_name else []),
    ]
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    return cmd, env


def start_server(
    backend_uri: str,
    artifacts_dir: str | Path,
    port: int,
    host: str = "127.0.0.1",
    log: str | Path | None = None,
    timeout: float = 90.0,
    app_name: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Start a lean server in its own process group and wait until /health answers (it
    answers without credentials under the basic-auth app too). `extra_env`: the server's own
    settings (its secret key, the auth config path), kept out of its command line."""
    import time
    import urllib.request

    cmd, env = lean_server_command(backend_uri, artifacts_dir, host, port, app_name)
    env.update(extra_env or {})
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 (lives with the server)
    proc = subprocess.Popen(
        cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited with code {proc.returncode}"
                + (f"; see {log}" if log else "")
            )
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise TimeoutError(f"mlflow server on {host}:{port} not healthy after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop the server's whole process group (gunicorn/uvicorn workers included)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
