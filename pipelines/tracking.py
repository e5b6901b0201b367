"""MLflow wiring shared by the stages: where the store is and which run is the pipeline's.

Default: an embedded sqlite store `mlflow.db` and an artifact folder `mlartifacts/` in the
project root. `MLFLOW_TRACKING_URI` (or `mlflow.tracking_uri` in params.yaml) points the same
code at a server instead.

DVC runs each stage in its own process, so the stages find their common parent run by a tag:
`temper.pipeline_key`, a hash of the params and the git commit. Child runs (one per
candidate's training, one per evaluation) hang under it with `mlflow.parentRunId`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Any

from pydantic import Field

from .config import Section
from .io import stable_hash

PIPELINE_TAG = "temper.pipeline_key"
DOWNSTREAM_SECTIONS = ("register", "promote")


class MlflowConfig(Section):
    """`mlflow:` in params.yaml."""

    tracking_uri: str | None = Field(
        None,
        description="Tracking/registry URI. Default: $MLFLOW_TRACKING_URI, else the embedded "
        "sqlite store mlflow.db in the project root.",
    )
    experiment: str = Field("temper", description="Experiment name.")
    artifact_root: str = Field(
        "mlartifacts",
        description="Artifact folder of the embedded store (relative = project root).",
    )


def tracking_uri(cfg: MlflowConfig, root: str | Path = ".") -> str:
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def setup(cfg: MlflowConfig, root: str | Path = ".") -> str:
    """Point MLflow at the store and select (or create) the experiment; returns its id."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = tracking_uri(cfg, root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (Path(root).resolve() / cfg.artifact_root).as_uri()
    try:
        return client.create_experiment(cfg.experiment, artifact_location=location)
    except MlflowException:
        # Another process created it between our read and our write (sqlite's UNIQUE
        # constraint, or a server's RESOURCE_ALREADY_EXISTS): read the winner's row.
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            raise
        return experiment.experiment_id


def git_commit(root: str | Path = ".") -> str:
    """HEAD's commit hash, with '-dirty' when tracked files differ; 'unknown' outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def pipeline_key(params: dict[str, Any], root: str | Path = ".") -> str:
    """Identifies one pipeline configuration: all params plus the code's commit.

    The '-dirty' mark is left out on purpose: `dvc repro` rewrites the tracked dvc.lock and
    metrics between stages, and every stage of one repro must find the same parent run.
    Sections that only act after the candidates exist (register, promote) are left out too: a
    change there re-runs only `register`, which must land under the same pipeline run.
    """
    upstream = {k: v for k, v in params.items() if k not in DOWNSTREAM_SECTIONS}
    return stable_hash({"params": upstream, "commit": git_commit(root).removesuffix("-dirty")})


def pipeline_run(cfg: MlflowConfig, params: dict[str, Any], root: str | Path = ".") -> str:
    """The id of the pipeline's parent run, created on first use by any stage."""
    import mlflow

    experiment_id = setup(cfg, root)
    key = pipeline_key(params, root)
    client = mlflow.MlflowClient()
    if found := _pipeline_runs(client, experiment_id, key):
        return found[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=f"pipeline-{key[:8]}",
        tags={PIPELINE_TAG: key, "temper.git_commit": git_commit(root)},
    )
    # Runs have no unique key, so two processes that both missed above both create one. The
    # oldest wins; a loser deletes its own run and nests under the winner instead.
    winner = _pipeline_runs(client, experiment_id, key)[0].info.run_id
    if winner != run.info.run_id:
        client.delete_run(run.info.run_id)
    return winner


def _pipeline_runs(client: Any, experiment_id: str, key: str) -> list[Any]:
    """The live parent runs with this pipeline key, oldest first (ties: by run id)."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{key}'", max_results=100
    )
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def child_run_tags(parent_run_id: str, **tags: str) -> dict[str, str]:
    """Tags that nest a run under the pipeline run in the MLflow UI."""
    return {"mlflow.parentRunId": parent_run_id, **tags}


# --- registry helpers --------------------------------------------------------------------------


def version_str(version: Any) -> str:
    """Model versions come back as int from sqlite and as str from a server: compare as str."""
    return str(int(version)) if str(version).isdigit() else str(version)


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The model version behind `name@alias`, or None when the alias (or model) does not exist.

    `get_model_version_by_alias` is the one call that reads aliases the same way on sqlite and
    on a server (`search_model_versions` does not fill them in everywhere).
    """
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


@contextlib.contextmanager
def quiet_downloads():
    """No per-file progress bars for small bookkeeping downloads (scores, params)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def redact_uri(uri: str) -> str:
    """A tracking URI without user:password, fit for logs and reports."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


# --- the MLflow UI -------------------------------------------------------------------------------

# A view of the runs table that groups runs by their parent (the pipeline run), so every
# candidate's train/eval run is visible side by side without expanding rows by hand. It uses the
# UI's own "share view" mechanism: the state lives in an experiment tag and the URL names it.
CANDIDATES_VIEW = "temper-candidates"
SHARED_VIEW_TAG = "mlflow.sharedViewState."


def ensure_candidates_view(client: Any, experiment_id: str) -> None:
    import json

    state = {"groupBy": "tag.average.mlflow.parentRunId"}
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + CANDIDATES_VIEW, json.dumps(state))


def runs_table_url(base_url: str, experiment_id: str, view: str | None = CANDIDATES_VIEW) -> str:
    url = f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return f"{url}?viewStateShareKey={view}" if view else url


def lean_server_command(
    backend_uri: str, artifacts_dir: str | Path, host: str = "127.0.0.1", port: int = 5000
) -> tuple[list[str], dict[str, str]]:
    """`mlflow server` with one worker and no job runner: ~565 MiB and 1 process instead of
    15 processes and 3.5 GiB with the defaults (measured, see STACK-FACTS)."""
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
) -> subprocess.Popen:
    """Start a lean server in its own process group and wait until /health answers."""
    import time
    import urllib.request

    cmd, env = lean_server_command(backend_uri, artifacts_dir, host, port)
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
