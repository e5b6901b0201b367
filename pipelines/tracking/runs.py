"""MLflow wiring shared by the stages: where the store is and which run is the pipeline's.

Default: an embedded sqlite store `mlflow.db` and an artifact folder `mlartifacts/` in the
project root. `MLFLOW_TRACKING_URI` (or `mlflow.tracking_uri` in params.yaml) points the same
code at a server instead.

DVC runs each stage in its own process, so the stages find their common parent run by a tag:
`temper.pipeline_key`, a hash of the params and the git commit. Child runs (one per
candidate's training, one per evaluation) hang under it with `mlflow.parentRunId`. Under
`dvc exp run` the parent run is named after the DVC experiment (`DVC_EXP_NAME`, also the tag
`temper.experiment`), so the MLflow UI and `dvc exp show` speak of the same thing.

The parent's status follows the pipeline: RUNNING while stages run, FAILED as soon as one
stage fails (a re-run of the same configuration re-opens it), FINISHED when register ends it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from ..config import Section
from ..io import md5_file, stable_hash
from .access import access_error
from .sweeps import log_swept_params, sweep_run

PIPELINE_TAG = "temper.pipeline_key"
DOWNSTREAM_KEYS = ("register", "promote")


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
    sweep: str | None = Field(
        None,
        description="The sweep this run is an arm of (`temper sweep` sets it): its pipeline "
        "run nests under the sweep's run of this name, made on first use.",
    )
    sweep_params: list[str] = Field(
        default_factory=list,
        description="The dotted params the sweep varies: the arm's run logs their values as its "
        "params (the columns MLflow's parallel coordinates plot), not the constants.",
    )


@dataclass(frozen=True)
class Tracking:
    """Where a stage logs: the MLflow store (`mlflow:`) and the resolved params, which every
    child run logs and whose hash names the pipeline's parent run (`pipeline_key`). A stage
    given none logs nothing."""

    cfg: MlflowConfig
    params: Mapping[str, Any] = field(default_factory=dict)

    def child(self, stage: str, name: str, **tags: str) -> Any:
        """`child_run` under this pipeline's parent run."""
        return child_run(self.cfg, dict(self.params), stage, name, **tags)


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
    try:
        experiment = client.get_experiment_by_name(cfg.experiment)
    except MlflowException as err:  # the first request: a server refusing us says so here
        if (denied := access_error(err)) is not None:
            raise denied from None
        raise
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


def git_dirty(root: str | Path = ".") -> list[str] | None:
    """Tracked files that differ from HEAD, less what the pipeline itself rewrites while it
    runs (dvc.lock and the uncached outputs dvc.yaml declares: `dvc repro` rewrites them
    before register runs, which says nothing about the code); None outside git."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    written = pipeline_outputs(root)
    paths = [line[3:].split(" -> ")[-1] for line in out.splitlines() if line.strip()]
    return [p for p in paths if p != "dvc.lock" and p not in written]


def pipeline_outputs(root: str | Path = ".") -> set[str]:
    """The paths dvc.yaml declares as outs, metrics or plots (templated ones left out)."""
    import yaml

    path = Path(root) / "dvc.yaml"
    if not path.exists():
        return set()
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    found = set()
    for stage in stages.values():
        body = stage.get("do", stage)
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind) or []:
                name = entry if isinstance(entry, str) else next(iter(entry))
                if "${" not in name:
                    found.add(name.rstrip("/"))
    return found


def git_commit(root: str | Path = ".") -> str:
    """HEAD's commit hash, with '-dirty' when tracked files other than the pipeline's own
    outputs differ (`git_dirty` names them); 'unknown' outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if git_dirty(root) else "")


def pipeline_key(params: dict[str, Any], root: str | Path = ".") -> str:
    """Identifies one pipeline configuration: all params plus the code's commit.

    The '-dirty' mark is left out on purpose: `dvc repro` rewrites the tracked dvc.lock and
    metrics between stages, and every stage of one repro must find the same parent run.
    Sections that only act after the candidates exist (register, promote) are left out too: a
    change there re-runs only `register`, which must land under the same pipeline run.
    """
    upstream = {k: v for k, v in params.items() if k not in DOWNSTREAM_KEYS}
    return stable_hash({"params": upstream, "commit": git_commit(root).removesuffix("-dirty")})


def pipeline_run(cfg: MlflowConfig, params: dict[str, Any], root: str | Path = ".") -> str:
    """The id of the pipeline's parent run, created on first use by any stage."""
    import mlflow

    experiment_id = setup(cfg, root)
    key = pipeline_key(params, root)
    client = mlflow.MlflowClient()
    with store_lock(tracking_uri(cfg, root)):
        if found := _pipeline_runs(client, experiment_id, key):
            return reopen(client, found[0])
        experiment = os.environ.get("DVC_EXP_NAME") or None  # set by `dvc exp run`
        tags = {PIPELINE_TAG: key, "temper.git_commit": git_commit(root)}
        if experiment:
            tags["temper.experiment"] = experiment
        if cfg.sweep:  # an arm of a sweep: nested under the sweep's run
            tags["temper.sweep"] = cfg.sweep
            tags["mlflow.parentRunId"] = sweep_run(client, experiment_id, cfg.sweep)
        run = client.create_run(
            experiment_id, run_name=experiment or f"pipeline-{key[:8]}", tags=tags
        )
        # On a server (no lock), two processes that both missed above both create one: runs
        # have no unique key. The oldest wins; a loser deletes its own run and nests under the
        # winner instead. (Without the lock this is not exact: a run stamped earlier but
        # written later can still show up after a process decided. The embedded store locks.)
        winner = _pipeline_runs(client, experiment_id, key)[0].info.run_id
        if winner != run.info.run_id:
            discard_run(client, run.info.run_id, winner)
        elif cfg.sweep_params:
            log_swept_params(client, winner, params, cfg.sweep_params)
        return winner


def mark_failed(cfg: MlflowConfig, params: dict[str, Any], stage: str) -> str | None:
    """Mark this configuration's pipeline run FAILED after `stage` failed outside a child
    run (e.g. before it logged anything). Creates nothing: no store or no run, no change."""
    import mlflow

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return None
    client = mlflow.MlflowClient(tracking_uri=uri)  # its own client: no global URI set
    experiment = client.get_experiment_by_name(cfg.experiment)
    found = experiment and _pipeline_runs(client, experiment.experiment_id, pipeline_key(params))
    if not found:
        return None
    run_id = found[0].info.run_id
    if found[0].info.status == "RUNNING":
        client.set_terminated(run_id, "FAILED")
        client.set_tag(run_id, "temper.failed_stage", stage)
    return run_id


def reopen(client: Any, run: Any) -> str:
    """A found pipeline run, back to RUNNING if an earlier attempt failed or was killed."""
    if run.info.status in ("FAILED", "KILLED"):
        client.update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


def discard_run(client: Any, run_id: str, winner: str) -> None:
    """Delete a pipeline run that lost the race to `winner`. Under MLflow's basic-auth app
    deleting needs MANAGE on the experiment, which only its creator (and the admin) holds: a
    teammate's process gets PERMISSION_DENIED, so it takes the run out of the search instead
    (its pipeline tag renamed) and ends it as KILLED."""
    from mlflow.exceptions import MlflowException

    try:
        client.delete_run(run_id)
    except MlflowException as err:
        if err.error_code != "PERMISSION_DENIED":
            raise
        client.set_tag(run_id, PIPELINE_TAG + ".lost_to", winner)
        client.set_tag(run_id, PIPELINE_TAG, f"lost-to-{winner}")
        client.set_terminated(run_id, "KILLED")


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock beside an embedded sqlite store (`<db>-temper.lock`), so processes on
    this machine find-or-create the pipeline run one at a time; nothing for a server."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri.removeprefix("sqlite:///"))
    with db.with_name(db.name + "-temper.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pipeline_runs(client: Any, experiment_id: str, key: str) -> list[Any]:
    """The live parent runs with this pipeline key, oldest first (ties: by run id)."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{key}'", max_results=100
    )
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


@dataclass
class ChildRun:
    """A run of one stage under the pipeline's parent run (see `child_run`)."""

    client: Any
    run_id: str
    parent_id: str
    experiment_id: str

    def log_params(self, params: dict[str, Any]) -> None:
        """Flat params as strings (JSON for lists and mappings), cut to MLflow's limit."""
        from mlflow.entities import Param

        items = [
            Param(k, (v if isinstance(v, str) else json.dumps(v, default=str))[:6000])
            for k, v in params.items()
        ]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(
        self,
        metrics: dict[str, float],
        step: int = 0,
        model_id: str | None = None,
        dataset: Any = None,
    ) -> None:
        """Finite numeric metrics in one batch.

        `model_id`: link them to a logged model (they show on its page and in
        `get_logged_model(id).metrics`); `dataset` (from `log_dataset`): record which dataset
        they were measured on (the model page shows metrics per dataset).
        """
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        name = dataset.name if dataset is not None else None
        digest = dataset.digest if dataset is not None else None
        items = [
            Metric(
                k, float(v), now, step, model_id=model_id, dataset_name=name, dataset_digest=digest
            )
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        ]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])


def log_dataset(run: ChildRun, path: str | Path, name: str, context: str) -> Any:
    """Log a data file as the run's dataset input (the runs table's Datasets column); returns
    the MLflow `Dataset` (pass it to `ChildRun.log_metrics` to tie metrics to it).

    The digest is the file's md5: the hash DVC records for it (`dvc.lock`, and the manifest of
    a tracked folder), so a dataset in MLflow names the DVC object it came from. The source
    (MLflow's `{"uri": ...}` form for local files) is the path relative to the working
    directory, the project root under `dvc repro`, where it lies inside it.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    path = Path(path)
    with path.open("rb") as handle:
        rows = sum(1 for line in handle if line.strip())
    try:
        source = path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        source = path.resolve().as_posix()
    dataset = Dataset(
        name=name,
        digest=md5_file(path),
        source_type="local",
        source=json.dumps({"uri": source}),
        profile=json.dumps({"num_rows": rows}),
    )
    log_inputs_racing(run, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])
    return dataset


def log_inputs_racing(run: ChildRun, inputs: list, attempts: int = 3) -> None:
    """`log_inputs`, tried again when another run inserted the same dataset first.

    MLflow's SQL store looks a dataset up, then inserts it when absent: two runs logging the
    same file at once (two users' `dvc exp run` on one team server) can both miss it, and the
    later insert fails on the dataset's key (`duplicate key value violates unique constraint
    "dataset_pk"` on PostgreSQL, `UNIQUE constraint failed` on sqlite). Tried again, the lookup
    finds the winner's row and only the link to this run is written.
    """
    from mlflow.exceptions import MlflowException

    for attempt in range(1, attempts + 1):
        try:
            run.client.log_inputs(run.run_id, inputs)
            return
        except MlflowException as err:
            if attempt == attempts or "unique constraint" not in str(err).lower():
                raise
            time.sleep(0.2 * attempt)


def log_model_input(run: ChildRun, model_id: str) -> None:
    """Record a logged model as an input of the run (an evaluation of that model)."""
    from mlflow.entities import LoggedModelInput

    run.client.log_inputs(run.run_id, models=[LoggedModelInput(model_id)])


def log_adapter_model(
    run: ChildRun, adapter_dir: str | Path, name: str, params: dict[str, Any]
) -> str:
    """The adapter as an MLflow 3 logged model of this run; returns its model id.

    Evaluation metrics are later logged against this id and the registry version points at
    it, so the model views, the runs and the registry show one and the same adapter.
    """
    model = run.client.create_logged_model(
        run.experiment_id,
        name=name,
        source_run_id=run.run_id,
        model_type="peft-lora",
        params={k: str(v)[:6000] for k, v in params.items()},
        tags={"temper.candidate": name},
    )
    try:
        run.client.log_model_artifacts(model.model_id, str(adapter_dir))
    except BaseException:
        run.client.finalize_logged_model(model.model_id, "FAILED")
        raise
    run.client.finalize_logged_model(model.model_id, "READY")
    return model.model_id


@contextlib.contextmanager
def child_run(
    cfg: MlflowConfig, params: dict[str, Any], stage: str, name: str, **tags: str
) -> Iterator[ChildRun]:
    """Open a child run of the pipeline run: the one way every stage logs to MLflow.

    The run is FINISHED when the block ends, FAILED when it raises. Tags: `temper.stage`,
    `temper.git_commit`, `mlflow.parentRunId` (nests it in the UI) and `tags`.
    """
    import mlflow

    parent = pipeline_run(cfg, params)
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent).info.experiment_id
    run = client.create_run(
        experiment_id,
        run_name=name,
        tags={
            "mlflow.parentRunId": parent,
            "temper.stage": stage,
            "temper.git_commit": git_commit(),
            **tags,
        },
    )
    child = ChildRun(client, run.info.run_id, parent, experiment_id)
    try:
        yield child
    except BaseException:
        client.set_terminated(child.run_id, "FAILED")
        client.set_terminated(parent, "FAILED")  # else the pipeline run stays RUNNING forever
        client.set_tag(parent, "temper.failed_stage", stage)
        raise
    client.set_terminated(child.run_id, "FINISHED")
