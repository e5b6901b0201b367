"""Stage register against a real sqlite MLflow store, a real PEFT adapter and a real git repo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from registry_fixtures import (
    MODEL,
    git,
    make_project,
    pattern,
    store_client,
    tiny_adapter,
    train_candidates,
    write_eval,
    write_lock,
)
from typer.testing import CliRunner

from temper.stages import register as reg
from temper.cli import app

runner = CliRunner()


@pytest.fixture
def project(tmp_path, base_model_dir, monkeypatch) -> Path:
    make_project(tmp_path, base_model_dir)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_register_winner_with_children_alias_lineage_and_card(project, base_model_dir):
    from temper.stages.base_model import model_hash

    adapter = tiny_adapter(str(base_model_dir))
    train_ids = train_candidates(project, ["r8", "r16"], adapter)
    write_eval(project, {"r8": pattern(40, 20), "r16": pattern(40, 30)}, winner="r16")

    result = runner.invoke(app, ["register"])
    assert result.exit_code == 0, result.output
    assert (
        "registered temper-clause-review version 1 (@challenger) from candidate r16"
        in result.output
    )

    client = store_client(project)
    summary = json.loads((project / "metrics" / "register.json").read_text())
    parent = client.get_run(summary["pipeline_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["temper.registered_version"] == "1"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    names = sorted(r.info.run_name for r in children)
    assert names == ["register-r16", "train-r16", "train-r8"]

    mv = client.get_model_version_by_alias(MODEL, "challenger")
    assert str(mv.version) == "1"
    reg_run = next(r for r in children if r.info.run_name == "register-r16")
    assert mv.run_id == reg_run.info.run_id
    assert mv.source == f"{reg_run.info.artifact_uri}/adapter"
    tags = mv.tags
    assert tags["temper.candidate"] == "r16"
    assert tags["temper.train_run_id"] == train_ids["r16"]
    assert tags["temper.base_model_hash"] == model_hash(base_model_dir)
    assert tags["temper.base_model"] == "smollm2-135m-instruct"
    assert tags["temper.gates_passed"] == "true"
    assert tags["metric.clause_type.accuracy"] == "0.75 [0.7, 0.8]"
    assert tags["temper.primary_metric"] == "clause_type.accuracy"
    assert json.loads(tags["temper.metrics"])["clause_type.accuracy"] == [0.75, 0.7, 0.8]
    assert json.loads(tags["temper.cost"])["baseline"] == "baseline (base_model)"
    assert tags["temper.teacher"] == "gold labels (no teacher configured)"
    assert tags["temper.adapter_sha256"] == reg.adapter_hash(adapter)

    # The artifact is the adapter plus its model card, with attribution and the metrics.
    import mlflow

    local = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{MODEL}@challenger", dst_path=str(project / "dl")
        )
    )
    assert (local / "adapter_model.safetensors").exists()
    card = (local / "README.md").read_text()
    assert "CUAD v1 (Contract Understanding Atticus Dataset)" in card
    assert "ContractNLI" in card and "CC BY 4.0" in card
    assert "| clause_type.accuracy | 0.75 [0.7, 0.8] |" in card
    assert "| min_primary | 0.75 | >= 0.3 | pass |" in card
    assert "## Intended use" in card and "## Limitations" in card
    assert "${" not in card


@pytest.mark.slow
def test_lineage_recovers_data_hash_params_and_commit(project, base_model_dir):
    from temper.config import load_params

    write_lock(
        project,
        prepared="aaaabbbbccccddddeeeeffff00001111.dir",
        distilled="22223333444455556666777788889999.dir",
    )
    git(project, "commit", "-q", "-am", "new data")
    head = git(project, "rev-parse", "HEAD")
    train_candidates(project, ["r16"], tiny_adapter(str(base_model_dir)))
    write_eval(project, {"r16": pattern(20, 15)}, winner="r16")
    result = runner.invoke(app, ["register", "-S", "register.model_name=lineage-test"])
    assert result.exit_code == 0, result.output

    store_client(project)
    got = reg.lineage("lineage-test", 1)
    assert got["data_hashes"] == {
        "data/prepared": "aaaabbbbccccddddeeeeffff00001111.dir",
        "data/distilled": "22223333444455556666777788889999.dir",
    }
    assert got["git_commit"] == head
    expected = load_params(project / "params.yaml", ["register.model_name=lineage-test"])
    assert got["params"] == expected
    assert got["params"]["register"]["model_name"] == "lineage-test"


@pytest.mark.slow
def test_no_winner_registers_nothing(project, base_model_dir):
    train_candidates(project, ["r8"], tiny_adapter(str(base_model_dir)))
    write_eval(project, {"r8": pattern(20, 2)}, winner=None, failing=("r8",))
    result = runner.invoke(app, ["register"])
    assert result.exit_code == 0, result.output
    assert "not registered: no candidate passed the gates" in result.output
    assert json.loads((project / "metrics" / "register.json").read_text())["registered"] is False
    assert store_client(project).search_model_versions(f"name = '{MODEL}'") == []

    result = runner.invoke(app, ["register", "-S", "register.require_winner=true"])
    assert result.exit_code == 1
    assert "metrics/eval.json: no candidate passed the gates" in result.output


def test_bad_predictions_name_file_and_line(tmp_path):
    path = tmp_path / "r16.jsonl"
    path.write_text('{"id": "a", "scores": {"m": 1.0}}\n{"id": "b", "answer": {}}\n')
    with pytest.raises(reg.RegisterError, match=r"r16.jsonl:2: expected a per-example score"):
        reg.example_scores(path, "m")
    path.write_text('{"id": "a", "scores": {"m": 1.0}}\n{"scores": {"m": 0.0}}\n')
    with pytest.raises(reg.RegisterError, match=r"r16.jsonl:2: missing field 'id'"):
        reg.example_scores(path, "m")


def test_examples_outside_a_metric_are_left_out(tmp_path):
    path = tmp_path / "r16.jsonl"
    path.write_text(
        '{"id": "a", "scores": {"m": 1.0}}\n{"id": "b", "scores": {"other": 1}}\n'
        '{"id": "c", "scores": {"m": 0.0}}\n'
    )
    assert [(s["id"], s["score"]) for s in reg.example_scores(path, "m")] == [
        ("a", 1.0),
        ("c", 0.0),
    ]


def test_lock_without_data_outputs_is_an_error(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        "schema: '2.0'\nstages:\n  base_model:\n    outs:\n    - path: models/base\n"
        "      md5: abc.dir\n"
    )
    with pytest.raises(reg.RegisterError, match="dvc.lock: none of"):
        reg.data_hashes(lock, ["data/prepared", "data/distilled"])
    with pytest.raises(reg.RegisterError, match="not found"):
        reg.data_hashes(tmp_path / "missing.lock", ["data/prepared"])


@pytest.mark.parametrize(
    "raw, expected",
    [
        (0.5, (0.5, None, None)),
        ({"value": 0.5, "ci_low": 0.4, "ci_high": 0.6}, (0.5, 0.4, 0.6)),
        ({"mean": 0.5, "ci": [0.4, 0.6]}, (0.5, 0.4, 0.6)),
        ({"point": 1, "low": 0, "high": 2}, (1.0, 0.0, 2.0)),
        ("n/a", (None, None, None)),
    ],
)
def test_interval_shapes(raw, expected):
    assert reg.interval(raw) == expected


def test_winner_marked_as_failing_is_refused(tmp_path):
    entry = {"gates": {"passed": False}}
    assert reg.gates_of(entry, is_winner=True)[0] is False
    assert reg.gates_of({"gates": [{"name": "a", "passed": True}]}, False)[0] is True
    assert reg.gates_of({}, is_winner=True)[0] is True


def test_pipeline_key_ignores_downstream_sections(tmp_path):
    """A change of register/promote params re-runs only `register` (DVC), which must still land
    under the pipeline run that holds the candidates' runs."""
    from temper.tracking import pipeline_key

    params = {"train": {"lr": 1e-3}, "register": {"model_name": "a"}, "promote": {"margin": 0.05}}
    same = {**params, "register": {"model_name": "b"}, "promote": {"margin": 0.0}}
    other = {**params, "train": {"lr": 5e-4}}
    assert pipeline_key(params, tmp_path) == pipeline_key(same, tmp_path)
    assert pipeline_key(params, tmp_path) != pipeline_key(other, tmp_path)
