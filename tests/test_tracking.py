"""MLflow wiring: concurrent processes agree on one experiment and one pipeline run."""

from __future__ import annotations

import multiprocessing
import shutil

import pytest

from temper.tracking import PIPELINE_TAG, MlflowConfig, pipeline_run, setup

PARAMS = {"train": {"rank": 16}}


def _race(uri: str, artifacts: str, barrier, results) -> None:
    cfg = MlflowConfig(tracking_uri=uri, artifact_root=artifacts)
    barrier.wait()  # every process reads "no experiment yet" at about the same moment
    try:
        results.put(("ok", setup(cfg), pipeline_run(cfg, PARAMS)))
    except Exception as err:  # reported to the parent, which fails the test with it
        results.put(("error", type(err).__name__, str(err)[:300]))


@pytest.mark.parametrize("round_", range(3))
def test_processes_racing_on_a_fresh_store_share_one_experiment_and_parent(tmp_path, round_):
    """Before the fix, the losers of the race died with `Experiment(name=temper) already
    exists` (sqlite UNIQUE constraint), and each created its own parent run."""
    from mlflow import MlflowClient
    from registry_fixtures import template_db

    db = tmp_path / "mlflow.db"
    shutil.copy(template_db(), db)
    uri = f"sqlite:///{db}"
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(target=_race, args=(uri, str(tmp_path / "art"), barrier, results))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert all(g[0] == "ok" for g in got), got
    assert len({g[1] for g in got}) == 1, got  # one experiment
    assert len({g[2] for g in got}) == 1, got  # one parent run
    client = MlflowClient(tracking_uri=uri)
    live = client.search_runs([got[0][1]], filter_string=f"tags.`{PIPELINE_TAG}` != ''")
    assert [r.info.run_id for r in live] == [got[0][2]]
