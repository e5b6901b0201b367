"""MLflow wiring shared by the stages: where the store is and which run is the pipeline's.

Default: an embedded sqlite store `mlflow.db` and an artifact folder `mlartifacts/` in the
project root. `MLFLOW_TRACKING_URI` (or `mlflow.tracking_uri` in params.yaml) points the same
code at a server instead.

DVC runs each stage in its own process, so the stages find their common parent run by a tag:
`temper.pipeline_key`, a hash of the params and the git commit. Child runs (one per
candidate's training, one per evaluation) hang under it with `mlflow.parentRunId`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from pydantic import Field

from .config import Section
from .io import stable_hash

PIPELINE_TAG = "temper.pipeline_key"


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
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (Path(root).resolve() / cfg.artifact_root).as_uri()
    return client.create_experiment(cfg.experiment, artifact_location=location)


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
    """
    return stable_hash({"params": params, "commit": git_commit(root).removesuffix("-dirty")})


def pipeline_run(cfg: MlflowConfig, params: dict[str, Any], root: str | Path = ".") -> str:
    """The id of the pipeline's parent run, created on first use by any stage."""
    import mlflow

    experiment_id = setup(cfg, root)
    key = pipeline_key(params, root)
    client = mlflow.MlflowClient()
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{key}'", max_results=1
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=f"pipeline-{key[:8]}",
        tags={PIPELINE_TAG: key, "temper.git_commit": git_commit(root)},
    )
    return run.info.run_id


def child_run_tags(parent_run_id: str, **tags: str) -> dict[str, str]:
    """Tags that nest a run under the pipeline run in the MLflow UI."""
    return {"mlflow.parentRunId": parent_run_id, **tags}
