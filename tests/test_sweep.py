"""`temper sweep`: a grid of settings as queued DVC experiments, their MLflow runs nested under
one sweep run, and `temper exps --sweep` as the table. The grid logic runs on its own; the end
to end test runs a two-arm sweep through DVC's real queue on the real base model and data (the
arms of a grid, linked settings included, are the unit tests' job: what only the real run shows
is the queue, the nesting of the MLflow runs and the table, and two arms show each of them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from dvc_project import env_of, make_repo, sh

from temper.cli.sweep import SweepSpec, arm_overrides, arms, check_arm, read_sweep, swept_keys
from temper.config import ConfigError, load_params
from temper.params import TemperParams

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))


def spec(**kw) -> SweepSpec:
    return SweepSpec.model_validate({"name": "s", **kw})


def test_arms_are_every_combination_with_linked_settings_moving_together():
    s = spec(
        grid={"train.learning_rate": [0.001, 0.003], "train.rank": [8, 16]},
        linked={
            "data": [
                {"prepare.max_examples.train": 320, "train.epochs": 2.0},
                {"prepare.max_examples.train": 640, "train.epochs": 1.0},
            ]
        },
    )
    got = arms(s)
    assert len(got) == 8
    assert got[0] == {
        "train.learning_rate": 0.001,
        "train.rank": 8,
        "prepare.max_examples.train": 320,
        "train.epochs": 2.0,
    }
    assert got[1]["prepare.max_examples.train"] == 640 and got[1]["train.epochs"] == 1.0
    assert len({json.dumps(a, sort_keys=True) for a in got}) == 8
    keys = ["train.learning_rate", "train.rank", "prepare.max_examples.train", "train.epochs"]
    assert swept_keys(s) == keys


def test_an_arm_is_the_fixed_profile_then_its_values_and_validates(tmp_path):
    params = ROOT / "params.yaml"
    s = spec(
        fixed={"train": {"candidates": {"r16": {}}}},
        grid={"train.candidates.r16.learning_rate": [0.002], "train.layers": [4]},
    )
    store = f"sqlite:///{tmp_path}/mlflow.db"
    pinned = {"mlflow.tracking_uri": store, "evaluate.cache_dir": str(tmp_path / "eval")}
    overrides = arm_overrides(s, arms(s)[0], params, pinned)
    # The candidates mapping is replaced whole, so the candidate's key is new to DVC (`+`).
    assert "+train.candidates.r16.learning_rate=0.002" in overrides
    assert "train.layers=4" in overrides and "mlflow.sweep=s" in overrides
    assert f'mlflow.tracking_uri="{store}"' in overrides
    assert f"evaluate.cache_dir={tmp_path / 'eval'}" in overrides
    resolved = TemperParams.load(params, overrides)
    assert list(resolved.train.candidates) == ["r16"]
    assert resolved.train.candidates["r16"] == {"learning_rate": 0.002}
    assert resolved.train.layers == 4 and resolved.mlflow.sweep == "s"
    assert resolved.mlflow.sweep_params == ["train.candidates.r16.learning_rate", "train.layers"]
    check_arm("s-1", overrides, params)


def test_a_bad_arm_fails_before_anything_is_queued_naming_arm_and_field():
    params = ROOT / "params.yaml"
    s = spec(grid={"train.rnak": [8]})
    with pytest.raises(ConfigError, match=r"arm s-1: .*train\.rnak"):
        check_arm("s-1", arm_overrides(s, arms(s)[0], params, {}), params)
    s = spec(grid={"train.rank": ["big"]})
    with pytest.raises(ConfigError, match=r"arm s-1: .*train\.rank"):
        check_arm("s-1", arm_overrides(s, arms(s)[0], params, {}), params)


@pytest.mark.parametrize(
    "body, message",
    [
        ({"name": "s"}, "no axis"),
        ({"name": "s", "grid": {"train.rank": []}}, "axis 'train.rank' has no value"),
        ({"name": "bad name", "grid": {"train.rank": [8]}}, "name"),
        ({"name": "s", "grid": {"train.rank": [8]}, "grdi": 1}, "grdi"),
    ],
)
def test_a_bad_sweep_file_names_the_file_and_what_is_wrong(tmp_path, body, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError, match=message) as err:
        read_sweep(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_shipped_sweep_validates_arm_by_arm_against_params_yaml(path):
    s = read_sweep(path)
    params = ROOT / "params.yaml"
    for i, arm in enumerate(arms(s), start=1):
        overrides = arm_overrides(s, arm, params, {})
        check_arm(f"{s.name}-{i}", overrides, params)
        flat = load_params(params, overrides)
        for key, value in arm.items():
            node = flat
            for part in key.split("."):
                node = node[part]
            assert node == value, (path.name, key)


def test_shipped_sweeps_exist():
    assert SWEEPS, "configs/sweeps/ ships at least the quick profile's sweep"


# --------------------------------------------------------------------------- end to end

TINY_SWEEP = {
    "name": "tiny",
    "target": "evaluate",
    "fixed": {
        "prepare": {"max_examples": {"train": 16, "validation": 2, "test": 2}},
        "train": {"candidates": {"r16": {}}, "max_steps": 2, "save_steps": 2},
        "evaluate": {"n_resamples": 100, "batch_size": 8, "baseline_few_shot": 1},
        "gates": {"min_primary": 0.0, "min_delta_low": None, "min_json_valid_rate": None},
    },
    # One linked axis: two arms in which both settings move, each a column of its own.
    "linked": {
        "depth": [
            {"train.learning_rate": 0.001, "train.layers": 2},
            {"train.learning_rate": 0.003, "train.layers": 4},
        ]
    },
}
ARMS = [f"tiny-{i}" for i in (1, 2)]


@pytest.mark.slow
def test_a_sweep_runs_through_the_dvc_queue_into_one_mlflow_sweep_run(tmp_path, base_model_dir):
    import mlflow

    repo = make_repo(tmp_path / "project", base_model_dir, ["data/raw/contracts"])
    (repo / "sweep.yaml").write_text(yaml.safe_dump(TINY_SWEEP, sort_keys=False))
    out = sh(repo, "temper", "sweep", "sweep.yaml", "--poll-s", "2", env=env_of())
    for arm in ARMS:
        assert f"{arm}: Success" in out, out

    # Nothing was registered (the arms stop at evaluate). That DVC knows the arms by name is
    # the table's check below: its rows are `dvc exp show`'s experiments.
    assert not (repo / "metrics" / "register.json").exists()
    # The arms share the project's evaluation cache: the base-model baseline, made once.
    assert len(list((repo / ".cache" / "eval").glob("baseline-*.json"))) == 1

    store = f"sqlite:///{repo / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    assert client.search_registered_models() == []
    experiment = client.get_experiment_by_name("temper")
    (sweep,) = client.search_runs([experiment.experiment_id], "tags.`temper.sweep_run` = 'tiny'")
    arms_ = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{sweep.info.run_id}'"
    )
    assert sorted(r.info.run_name for r in arms_) == ARMS
    assert sweep.info.status == "FINISHED" and {r.info.status for r in arms_} == {"FINISHED"}
    grid = set()
    for arm in arms_:
        # Only the swept params: parallel coordinates on what varied, not on constants.
        assert set(arm.data.params) == {"train.learning_rate", "train.layers"}
        grid.add((arm.data.params["train.learning_rate"], arm.data.params["train.layers"]))
        metrics = arm.data.metrics
        for key in ("validation.clause_type.accuracy", "test.clause_type.accuracy"):
            assert 0.0 <= metrics[key] <= 1.0, (arm.info.run_name, key)
        assert metrics["test.clause_type.accuracy.ci_low"] <= metrics["test.clause_type.accuracy"]
        stages = client.search_runs(
            [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{arm.info.run_id}'"
        )
        assert {r.data.tags["temper.stage"] for r in stages} >= {"train", "evaluate"}
    assert grid == {("0.001", "2"), ("0.003", "4")}

    # The sweep ends by printing `temper exps --sweep tiny`'s table (cli.exps.exps_table).
    table = out[out.index("| experiment") :]
    lines = [line for line in table.splitlines() if line.startswith("| tiny-")]
    assert len(lines) == len(ARMS), table
    header = table.splitlines()[0]
    assert "train.learning_rate" in header and "train.layers" in header
    assert "mlflow.tracking_uri" not in header  # the same in every arm: not a column
    assert "evaluate.cache_dir" not in header
    assert all("r16 0." in line for line in lines), table  # picked on validation, with value


def test_exps_and_sweep_outside_a_dvc_project_say_so_in_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from temper.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["exps", "--sweep", "quick"])
    assert result.exit_code == 1 and "no DVC project in" in result.output, result.output
    assert "Traceback" not in result.output
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "s", "grid": {"train.rank": [8]}}))
    result = CliRunner().invoke(app, ["sweep", "sweep.yaml"])
    assert result.exit_code == 1 and "run temper sweep in its root" in result.output, result.output


def test_a_queue_without_a_worker_is_an_error_not_a_hang(tmp_path, monkeypatch):
    """Arms queued and no worker to run them (one died, or none started): `wait_for` stops
    with what to do, where it once polled forever; the queue's state comes from its files."""
    import os
    import subprocess

    from temper.cli.sweep import SweepError, wait_for, worker_alive

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text("x: 1\n")
    (repo / "dvc.yaml").write_text(
        'stages:\n  s:\n    cmd: python -c "print(1)"\n    params: [x]\n'
    )
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(args, cwd=repo, check=True, env=env_of())
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "x")
    sh(repo, "dvc", "exp", "run", "--queue", "-n", "w-1", "-S", "x=2", env=env_of())
    monkeypatch.chdir(repo)
    with pytest.raises(SweepError, match=r"worker stopped with arms w-1 unrun: `dvc queue start`"):
        wait_for(["w-1"], poll_s=0.1)

    info = tmp_path / "dvc-exp-worker-1.json"
    info.write_text(json.dumps({"pid": os.getpid(), "returncode": None}))
    assert worker_alive(info)
    info.write_text(json.dumps({"pid": os.getpid(), "returncode": 0}))  # it ended
    assert not worker_alive(info)
    info.write_text("")  # being written
    assert not worker_alive(info)
