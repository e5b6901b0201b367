"""MLflow wiring: concurrent processes agree on one experiment and one pipeline run."""

from __future__ import annotations

import multiprocessing
import shutil
import sqlite3

import pytest

from temper.tracking import PIPELINE_TAG, MlflowConfig, pipeline_run, setup

PARAMS = {"train": {"rank": 16}}


ROUNDS, RACERS = 3, 4


def _race(uris: list[str], artifacts: str, barrier, results) -> None:
    """One racer: a round per fresh store, every racer starting each round at one moment."""
    for uri in uris:
        cfg = MlflowConfig(tracking_uri=uri, artifact_root=artifacts)
        barrier.wait()  # every process reads "no experiment yet" at about the same moment
        try:
            results.put(("ok", uri, setup(cfg), pipeline_run(cfg, PARAMS)))
        except Exception as err:  # reported to the parent, which fails the test with it
            results.put(("error", uri, type(err).__name__, str(err)[:300]))


def test_processes_racing_on_a_fresh_store_share_one_experiment_and_parent(tmp_path):
    """Before the fix, the losers of the race died with `Experiment(name=temper) already
    exists` (sqlite UNIQUE constraint), and each created its own parent run. Three rounds, each
    on a fresh store, by the same four processes (a spawned process costs seconds of imports)."""
    from mlflow import MlflowClient
    from registry_fixtures import template_db

    uris = []
    for n in range(ROUNDS):
        db = tmp_path / f"mlflow-{n}.db"
        shutil.copy(template_db(), db)
        uris.append(f"sqlite:///{db}")
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(RACERS), ctx.Queue()
    procs = [
        ctx.Process(target=_race, args=(uris, str(tmp_path / "art"), barrier, results))
        for _ in range(RACERS)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in range(ROUNDS * RACERS)]
    for p in procs:
        p.join(30)
    assert all(g[0] == "ok" for g in got), got
    for uri in uris:
        rows = [g for g in got if g[1] == uri]
        assert len(rows) == RACERS, got
        assert len({g[2] for g in rows}) == 1, rows  # one experiment
        assert len({g[3] for g in rows}) == 1, rows  # one parent run
        client = MlflowClient(tracking_uri=uri)
        live = client.search_runs([rows[0][2]], filter_string=f"tags.`{PIPELINE_TAG}` != ''")
        assert [r.info.run_id for r in live] == [rows[0][3]]


def _git(root, *args: str) -> None:
    import subprocess

    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def test_the_pipelines_own_outputs_do_not_make_the_commit_dirty(tmp_path):
    """`dvc repro` rewrites dvc.lock and uncached metrics before register runs: the version was
    tagged `<commit>-dirty` for it. Only other changed files count, and they are named."""
    from temper.tracking import git_commit, git_dirty

    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  evaluate:\n    cmd: x\n    metrics:\n      - metrics/eval.json:\n"
        "          cache: false\n"
    )
    for name in ("dvc.lock", "metrics/eval.json", "code.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("v1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "files")
    (tmp_path / "dvc.lock").write_text("v2\n")
    (tmp_path / "metrics/eval.json").write_text("v2\n")
    assert git_dirty(tmp_path) == [] and not git_commit(tmp_path).endswith("-dirty")
    (tmp_path / "code.py").write_text("v2\n")
    assert git_dirty(tmp_path) == ["code.py"] and git_commit(tmp_path).endswith("-dirty")


def test_the_pipeline_run_is_named_after_the_experiment_and_fails_with_a_stage(
    tmp_path, monkeypatch
):
    """A failed `dvc exp run` left the parent RUNNING forever, named by a hash."""
    from mlflow import MlflowClient
    from registry_fixtures import template_db

    from temper.tracking import child_run

    db = tmp_path / "mlflow.db"
    shutil.copy(template_db(), db)
    cfg = MlflowConfig(tracking_uri=f"sqlite:///{db}", artifact_root=str(tmp_path / "art"))
    monkeypatch.setenv("DVC_EXP_NAME", "my-exp")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError), child_run(cfg, PARAMS, "train", "train-r16"):
        raise RuntimeError("out of memory")
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    parent = client.get_run(pipeline_run(cfg, PARAMS))  # found again: re-opened
    assert parent.info.run_name == "my-exp"
    assert parent.data.tags["temper.experiment"] == "my-exp"
    assert parent.data.tags["temper.failed_stage"] == "train"
    assert parent.info.status == "RUNNING"  # a re-run of the same configuration re-opens it
    with pytest.raises(ValueError), child_run(cfg, PARAMS, "evaluate", "eval"):
        raise ValueError("bad")
    assert client.get_run(parent.info.run_id).info.status == "FAILED"


def test_a_stage_command_that_fails_before_logging_marks_the_pipeline_run_failed(
    tmp_path, monkeypatch
):
    """evaluate died before any child run (a crash in its few-shot picking): the parent run
    stayed RUNNING. Every stage command dvc.yaml runs marks it FAILED on a failure."""
    from mlflow import MlflowClient
    from registry_fixtures import make_project
    from typer.testing import CliRunner

    from temper.cli import app
    from temper.config import load_params

    (tmp_path / "no-model").mkdir()  # evaluate fails before it would load one
    project = tmp_path / "project"
    project.mkdir()
    make_project(project, tmp_path / "no-model")
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    override = "evaluate.test=no/such.jsonl"
    values = load_params(project / "params.yaml", [override])
    cfg = MlflowConfig.model_validate(values["mlflow"])
    parent = pipeline_run(cfg, values)  # what distil or train opened earlier
    result = CliRunner().invoke(app, ["evaluate", "-S", override])
    assert result.exit_code == 1, result.output
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    run = client.get_run(parent)
    assert run.info.status == "FAILED" and run.data.tags["temper.failed_stage"] == "evaluate"


class LosesTheDatasetRace:
    """A real client whose first `log_inputs` loses the race MLflow's SQL store allows: another
    run inserts the same dataset between this call's lookup and its insert (the store's
    message as PostgreSQL gives it, seen when two users ran `dvc exp run` at once)."""

    def __init__(self, client, rival_run: str, error: str):
        self.client, self.rival_run, self.error, self.calls = client, rival_run, error, 0

    def log_inputs(self, run_id, inputs):
        self.calls += 1
        if self.calls == 1:
            from mlflow.exceptions import MlflowException

            self.client.log_inputs(self.rival_run, inputs)  # the winner's insert
            raise MlflowException(self.error)
        return self.client.log_inputs(run_id, inputs)


@pytest.mark.parametrize(
    "error, retried",
    [('duplicate key value violates unique constraint "dataset_pk"', True), ("timeout", False)],
)
def test_a_dataset_logged_by_two_runs_at_once_is_one_dataset_linked_to_both(
    tmp_path, error, retried
):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from registry_fixtures import template_db

    from temper.tracking.runs import ChildRun, log_dataset

    db = tmp_path / "mlflow.db"
    shutil.copy(template_db(), db)
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.create_experiment("temper", artifact_location=(tmp_path / "a").as_uri())
    ours, rival = (client.create_run(experiment).info.run_id for _ in range(2))
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n{"text": "b"}\n')
    racing = LosesTheDatasetRace(client, rival, error)
    run = ChildRun(racing, ours, parent_id="", experiment_id=experiment)
    if not retried:  # anything else is the store's real answer, passed on at once
        with pytest.raises(MlflowException, match="timeout"):
            log_dataset(run, data, "train", "training")
        assert racing.calls == 1
        return
    dataset = log_dataset(run, data, "train", "training")
    assert racing.calls == 2
    for run_id in (ours, rival):
        (logged,) = client.get_run(run_id).inputs.dataset_inputs
        assert (logged.dataset.name, logged.dataset.digest) == ("train", dataset.digest)
    with sqlite3.connect(db) as store:  # one row: the rival's, which both runs link to
        assert store.execute("SELECT name, digest FROM datasets").fetchall() == [
            ("train", dataset.digest)
        ]
