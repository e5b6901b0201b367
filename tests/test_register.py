"""Stage register against a real sqlite MLflow store, a real PEFT adapter and a real git repo;
and once end to end: the real evaluate stage's output through register, gate, promote and pull."""

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

from temper import bundle, tracking
from temper.cli import app
from temper.errors import InvalidInput, MissingInput
from temper.io import md5_file
from temper.results import EvalResult
from temper.stages import register as reg

runner = CliRunner()


@pytest.fixture
def project(tmp_path, base_model_dir, monkeypatch) -> Path:
    make_project(tmp_path, base_model_dir)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def children(client, parent_id: str) -> list:
    experiment_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def inputs(run) -> dict[str, str]:
    """A run's dataset inputs: {name: digest}."""
    return {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}


@pytest.mark.slow
def test_register_winner_with_children_alias_lineage_and_card(project, base_model_dir):
    adapter = tiny_adapter(str(base_model_dir))
    trained = train_candidates(project, ["r8", "r16"], adapter)
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
    runs = children(client, parent.info.run_id)
    names = sorted(r.info.run_name for r in runs)
    assert names == ["register-r16", "train-r16", "train-r8"]

    mv = client.get_model_version_by_alias(MODEL, "challenger")
    assert str(mv.version) == "1"
    reg_run = next(r for r in runs if r.info.run_name == "register-r16")
    assert mv.run_id == reg_run.info.run_id
    # The version IS the candidate's logged model (the adapter training logged).
    model_id = trained["r16"].mlflow_model_id
    assert model_id and model_id != trained["r8"].mlflow_model_id
    assert mv.source == f"models:/{model_id}"
    assert tracking.version_model_id(mv) == model_id
    assert summary["model_id"] == model_id
    logged = client.get_logged_model(model_id)
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": MODEL, "version": "1"}]
    assert logged.source_run_id == trained["r16"].mlflow_run_id
    tags = mv.tags
    assert tags["temper.candidate"] == "r16"
    assert tags["temper.model_id"] == model_id
    assert tags["temper.train_run_id"] == trained["r16"].mlflow_run_id
    assert tags["temper.base_model_hash"] == reg.model_hash(base_model_dir)
    assert tags["temper.base_model"] == "smollm2-135m-instruct"
    assert tags["temper.gates_passed"] == "true"
    assert tags["metric.clause_type.accuracy"] == "0.75 [0.7, 0.8]"
    assert tags["temper.primary_metric"] == "clause_type.accuracy"
    assert json.loads(tags["temper.metrics"])["clause_type.accuracy"] == [0.75, 0.7, 0.8]
    assert json.loads(tags["temper.cost"])["baseline"] == "baseline (base_model)"
    assert tags["temper.teacher"] == "gold labels (no teacher configured)"
    assert tags["temper.adapter_sha256"] == reg.adapter_hash(adapter)
    assert tags["temper.eval_examples"] == "40"

    # The train runs have their data as dataset inputs (md5 = DVC's hash of the file).
    train_run = client.get_run(trained["r16"].mlflow_run_id)
    distilled = project / "data" / "distilled"
    assert inputs(train_run) == {
        "train": md5_file(distilled / "train.jsonl"),
        "validation": md5_file(distilled / "validation.jsonl"),
    }

    # The artifact is the adapter plus its model card, with attribution and the metrics.
    import mlflow

    local = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{MODEL}@challenger", dst_path=str(project / "dl")
        )
    )
    assert (local / "adapter_model.safetensors").exists()
    # ... and the MLflow pyfunc files (MLmodel, serving/), which are not the adapter.
    assert (local / "MLmodel").exists() and (local / "serving" / "serving.json").exists()
    assert "temper.online.pyfunc" in (local / "MLmodel").read_text()
    bundle.strip_pyfunc(local)
    assert reg.adapter_hash(local) == reg.adapter_hash(adapter)
    card = (local / "README.md").read_text()
    assert "CUAD v1 (Contract Understanding Atticus Dataset)" in card
    assert "ContractNLI" in card and "CC BY 4.0" in card
    assert "| clause_type.accuracy | 0.75 [0.7, 0.8] |" in card
    assert "| min_primary | 0.75 | >= 0.3 | pass |" in card
    assert "## Intended use" in card and "## Limitations" in card
    assert "${" not in card
    # The version's own card also stays with its register run.
    own = mlflow.artifacts.download_artifacts(
        run_id=mv.run_id, artifact_path="temper/model_card.md", dst_path=str(project / "dl2")
    )
    assert Path(own).read_text() == card


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no logged model", "logged model of another store"])
def test_candidate_without_logged_model_is_registered_from_the_register_run(
    project, base_model_dir, case
):
    adapter = tiny_adapter(str(base_model_dir))
    trained = train_candidates(project, ["r16"], adapter, log_model=False)
    assert trained["r16"].mlflow_model_id is None
    if case == "logged model of another store":
        # A clone with its own store, a teammate's: train_metrics.json names a model this
        # store does not hold (before the fix: a sqlite FOREIGN KEY failure in evaluate).
        path = project / "models" / "candidates" / "r16" / "train_metrics.json"
        stale = trained["r16"].model_copy(update={"mlflow_model_id": "m-0123456789abcdef"})
        stale.save(path)
    write_eval(project, {"r16": pattern(20, 15)}, winner="r16")
    result = runner.invoke(app, ["register"])
    assert result.exit_code == 0, result.output

    client = store_client(project)
    mv = client.get_model_version_by_alias(MODEL, "challenger")
    reg_run = client.get_run(mv.run_id)
    assert reg_run.info.run_name == "register-r16"
    assert mv.source == f"{reg_run.info.artifact_uri}/adapter"
    assert tracking.version_model_id(mv) is None

    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1", dst_path="dl"))
    assert (local / "MLmodel").exists()  # also a pyfunc model when registered from the run
    bundle.strip_pyfunc(local)
    assert reg.adapter_hash(local) == reg.adapter_hash(adapter)
    assert "| clause_type.accuracy | 0.75 [0.7, 0.8] |" in (local / "README.md").read_text()


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
    got = tracking.lineage("lineage-test", 1)
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
    evaluation = write_eval(project, {"r8": pattern(20, 2)}, winner=None)  # 0.1: fails gates
    assert evaluation.candidates["r8"].gates.passed is False
    result = runner.invoke(app, ["register"])
    assert result.exit_code == 0, result.output
    assert "not registered: no candidate passed the gates" in result.output
    assert json.loads((project / "metrics" / "register.json").read_text())["registered"] is False
    assert store_client(project).search_model_versions(f"name = '{MODEL}'") == []

    result = runner.invoke(app, ["register", "-S", "register.require_winner=true"])
    assert result.exit_code == 1
    assert "metrics/eval.json: no candidate passed the gates" in result.output


@pytest.mark.slow
def test_winner_marked_as_failing_is_refused(project):
    """A hand-edited eval.json whose winner failed its gates registers nothing (and touches
    no store: every input is checked first)."""
    evaluation = write_eval(project, {"r16": pattern(20, 15)}, winner="r16")
    evaluation.candidates["r16"].gates.passed = False
    evaluation.save(project / "metrics" / "eval.json")
    result = runner.invoke(app, ["register"])
    assert result.exit_code == 1
    assert "metrics/eval.json: winner 'r16' is marked as failing its gates" in result.output


@pytest.mark.slow
def test_eval_json_not_written_by_evaluate_names_the_file_and_field(project):
    (project / "metrics").mkdir()
    (project / "metrics" / "eval.json").write_text(
        json.dumps(
            {
                "primary_metric": "clause_type.accuracy",
                "winner": "r16",
                "candidates": {"r16": {"metrics": {"clause_type.accuracy": 0.7}}},
            }
        )
    )
    result = runner.invoke(app, ["register"])
    assert result.exit_code == 1
    assert "metrics/eval.json: not a EvalResult" in result.output
    assert "candidates.r16.metrics.clause_type.accuracy" in result.output


def test_bad_predictions_name_file_and_line(tmp_path):
    path = tmp_path / "r16.jsonl"
    path.write_text('{"id": "a", "scores": {"m": 1.0}}\n{"id": "b", "answer": {}}\n')
    with pytest.raises(reg.RegisterError, match=r"r16.jsonl:2: a prediction row needs 'id' and"):
        reg.example_scores(path, "m")
    path.write_text('{"id": "a", "scores": {"m": 1.0}}\n{"scores": {"m": 0.0}}\n')
    with pytest.raises(reg.RegisterError, match=r"r16.jsonl:2: a prediction row needs 'id'"):
        reg.example_scores(path, "m")
    with pytest.raises(reg.RegisterError, match=r"r16.jsonl: no example scored on other"):
        path.write_text('{"id": "a", "scores": {"m": 1.0}}\n')
        reg.example_scores(path, "other")


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


@pytest.mark.slow
def test_fixture_predictions_are_rows_as_evaluate_writes_them(project):
    """The fixtures' prediction rows hold what `attach_scores` writes and register reads."""
    write_eval(project, {"r16": pattern(8, 6)}, winner="r16")
    rows = [
        json.loads(line)
        for line in (project / "reports" / "predictions" / "r16.jsonl").read_text().splitlines()
    ]
    assert {"id", "output", "gold", "gold_all", "correct", "scores", "valid"} <= set(rows[0])
    assert [r["scores"]["clause_type.accuracy"] for r in rows] == [1.0] * 6 + [0.0] * 2
    assert EvalResult.load(project / "metrics" / "eval.json").winner == "r16"


def test_lock_without_data_outputs_is_an_error(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        "schema: '2.0'\nstages:\n  base_model:\n    outs:\n    - path: models/base\n"
        "      md5: abc.dir\n"
    )
    with pytest.raises(InvalidInput, match="dvc.lock: none of"):
        reg.data_hashes(lock, ["data/prepared", "data/distilled"])
    with pytest.raises(MissingInput, match="not found"):
        reg.data_hashes(tmp_path / "missing.lock", ["data/prepared"])


def test_pipeline_key_ignores_downstream_sections(tmp_path):
    """A change of register/promote params re-runs only `register` (DVC), which must still land
    under the pipeline run that holds the candidates' runs."""
    from temper.tracking import pipeline_key

    params = {"train": {"lr": 1e-3}, "register": {"model_name": "a"}, "promote": {"margin": 0.05}}
    same = {**params, "register": {"model_name": "b"}, "promote": {"margin": 0.0}}
    other = {**params, "train": {"lr": 5e-4}}
    assert pipeline_key(params, tmp_path) == pipeline_key(same, tmp_path)
    assert pipeline_key(params, tmp_path) != pipeline_key(other, tmp_path)


def test_version_model_id_reads_the_source_where_the_store_drops_the_field():
    class MV:
        def __init__(self, source, model_id=None):
            self.source, self.model_id = source, model_id

    assert tracking.version_model_id(MV("models:/m-0123abcd")) == "m-0123abcd"
    assert tracking.version_model_id(MV("x", model_id="m-1")) == "m-1"
    for other in ("models:/name/3", "models:/name@champion", "file:///a/adapter", ""):
        assert tracking.version_model_id(MV(other)) is None


# --------------------------------------------------------------------------- slow: end to end


@pytest.fixture
def one_thread():
    """One torch thread: steadier than two on a shared 2-core runner (see test_evaluate)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.slow
def test_real_evaluate_output_through_register_gate_promote_and_pull(
    tmp_path, base_model_dir, prepared_dir, monkeypatch, one_thread
):
    """The real evaluate stage on a real (tiny) adapter writes eval.json and predictions; the
    real register reads them; promote re-checks the gates in force on what was recorded; a
    re-run under a new pipeline run (as `dvc exp run -S gates...` makes) still shows training
    next to evaluation on the candidate's eval run."""
    import mlflow

    from temper.bundle import load_bundle

    test_file = prepared_dir / "test.jsonl"
    (tmp_path / "project").mkdir()
    project = make_project(
        tmp_path / "project",
        base_model_dir,
        params_update={
            "evaluate": {
                "test": str(test_file),
                "validation": str(prepared_dir / "validation.jsonl"),
                "few_shot_from": str(prepared_dir / "train.jsonl"),
                "baseline": "base_model",
                "baseline_few_shot": 1,
                "max_examples": 8,
                "batch_size": 8,
                "n_resamples": 200,
                "threads": 1,
                "progress": False,
            },
            # A tiny random adapter is no better than the base model: gates it can pass.
            "gates": {"min_primary": 0.0, "min_delta_low": None, "min_json_valid_rate": None},
        },
    )
    monkeypatch.chdir(project)
    adapter = tiny_adapter(str(base_model_dir))
    trained = train_candidates(project, ["r16"], adapter)["r16"]
    model_id = trained.mlflow_model_id

    result = runner.invoke(app, ["evaluate"])  # temper.stages.evaluate.run, as dvc runs it
    assert result.exit_code == 0, result.output
    evaluation = EvalResult.load(project / "metrics" / "eval.json")
    assert evaluation.winner == "r16" and evaluation.n_examples == 8
    entry = evaluation.candidates["r16"]
    primary = entry.metrics["clause_type.accuracy"]

    result = runner.invoke(app, ["register"])
    assert result.exit_code == 0, result.output
    client = store_client(project)
    mv = client.get_model_version_by_alias(MODEL, "challenger")
    assert tracking.version_str(mv.version) == "1"
    assert tracking.version_model_id(mv) == model_id  # the version is the logged model
    tags = mv.tags
    assert tags["temper.gates_passed"] == "true"
    assert tags["temper.eval_examples"] == "8"
    assert json.loads(tags["temper.metrics"])["clause_type.accuracy"] == list(primary.triple())
    assert json.loads(tags["temper.gates"]) == entry.gates.model_dump()
    parent_1 = tags["temper.pipeline_run_id"]

    # The logged model carries the evaluation's metrics, tied to the test dataset.
    test_md5 = md5_file(test_file)
    linked = {m.key: m for m in client.get_logged_model(model_id).metrics}
    assert linked["clause_type.accuracy"].value == pytest.approx(primary.value, abs=1e-6)
    assert linked["clause_type.accuracy.ci_low"].value == pytest.approx(primary.ci_low, abs=1e-6)
    assert (
        linked["clause_type.accuracy"].dataset_name,
        linked["clause_type.accuracy"].dataset_digest,
    ) == ("test", test_md5)
    eval_runs = {
        r.info.run_name: r
        for r in children(client, parent_1)
        if r.data.tags.get("temper.stage") == "evaluate"
    }
    assert sorted(eval_runs) == ["eval-baseline", "eval-classical", "eval-r16"]
    assert linked["clause_type.accuracy"].run_id == eval_runs["eval-r16"].info.run_id
    for run in eval_runs.values():
        assert inputs(run) == {"test": test_md5}
    # (search_runs leaves model inputs out on sqlite: read the run itself)
    eval_r16 = client.get_run(eval_runs["eval-r16"].info.run_id)
    assert [m.model_id for m in eval_r16.inputs.model_inputs] == [model_id]
    assert [
        m.model_id for m in client.search_logged_models([eval_runs["eval-r16"].info.experiment_id])
    ] == [model_id]

    # `temper gate` re-checks the recorded evaluation with the gates in force.
    result = runner.invoke(app, ["gate"])
    assert result.exit_code == 0 and "winner: r16" in result.output, result.output
    result = runner.invoke(app, ["gate", "-S", "gates.min_primary=0.99"])
    assert result.exit_code == 1
    assert "no winner: r16, chosen on validation, fails its gates on test" in result.output
    assert evaluation.selection.split == "validation" and evaluation.selection.chosen == "r16"

    # Promote re-checks too: the tag says passed, the gates in force say no.
    result = runner.invoke(app, ["promote", "-S", "gates.min_primary=0.99"])
    assert result.exit_code == 1, result.output
    assert "fails the gates in force on its recorded evaluation: min_primary" in result.output
    mv = client.get_model_version(MODEL, "1")
    assert mv.tags["temper.gates_passed"] == "true"
    assert mv.tags["temper.promotion"] == "refused"
    assert "min_primary" in mv.tags["temper.promotion.reason"]
    assert tracking.alias_version(client, MODEL, "champion") is None
    assert "re-checked with the gates in force: FAILED" in Path("reports/promotion.md").read_text()

    result = runner.invoke(app, ["promote"])
    assert result.exit_code == 0, result.output
    mv = client.get_model_version(MODEL, "1")
    assert sorted(mv.aliases) == ["challenger", "champion"]
    assert mv.tags["temper.promotion"] == "promoted"

    # Pull: the logged model's files + the card + the serving files, hash-checked; loads.
    out = tmp_path / "pulled"
    result = runner.invoke(app, ["pull", f"models:/{MODEL}@champion", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "serving.json").read_text())
    assert manifest["registry"]["model_id"] == model_id
    assert manifest["registry"]["version"] == "1"
    assert manifest["adapter_sha256"] == reg.adapter_hash(adapter)
    assert manifest["generation"]["max_new_tokens"] == 48
    card = (out / "README.md").read_text()
    assert f"| clause_type.accuracy | {reg.fmt_estimate(primary)} |" in card
    assert "CUAD" in card
    loaded = load_bundle(out, base_dir=base_model_dir)
    assert loaded.task.prompt_hash == evaluation.task.prompt_hash
    del loaded

    # A re-run with a changed upstream param: new pipeline run, same candidate (DVC would not
    # retrain it), evaluate and register again.
    change = ["-S", "gates.min_json_valid_rate=0.0"]
    result = runner.invoke(app, ["evaluate", *change])
    assert result.exit_code == 0, result.output
    # Nothing that shapes an answer changed: the candidate's answers come from the cache.
    assert EvalResult.load(project / "metrics" / "eval.json").candidates["r16"].cached
    result = runner.invoke(app, ["register", *change])
    assert result.exit_code == 0, result.output
    mv2 = client.get_model_version_by_alias(MODEL, "challenger")
    assert tracking.version_str(mv2.version) == "2"
    parent_2 = mv2.tags["temper.pipeline_run_id"]
    assert parent_2 != parent_1
    assert tracking.version_model_id(mv2) == model_id
    versions = json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"])
    assert versions == [{"name": MODEL, "version": "1"}, {"name": MODEL, "version": "2"}]
    runs_2 = {r.info.run_name: r for r in children(client, parent_2)}
    assert sorted(runs_2) == [
        "eval-baseline",
        "eval-classical",
        "eval-r16",
        "register-r16",
    ]  # no train
    eval_2 = runs_2["eval-r16"].data
    assert eval_2.params["train.rank"] == "16"
    assert eval_2.params["train.learning_rate"] == str(trained.config["learning_rate"])
    assert eval_2.metrics["train.val_loss"] == trained.val_loss
    assert eval_2.metrics["train.base_val_loss"] == trained.base_val_loss
    # same adapter, same answers
    assert eval_2.metrics["clause_type.accuracy"] == pytest.approx(primary.value, abs=1e-6)
    assert eval_2.tags["temper.train_run_id"] == trained.mlflow_run_id
    # The logged model now has both evaluations.
    evaluations = {
        m.run_id
        for m in client.get_logged_model(model_id).metrics
        if m.key == "clause_type.accuracy"
    }
    assert evaluations == {eval_runs["eval-r16"].info.run_id, runs_2["eval-r16"].info.run_id}

    # Same evaluation set, same answers: v2 is not worse than v1 and is promoted.
    result = runner.invoke(app, ["promote", *change])
    assert result.exit_code == 0, result.output
    assert tracking.version_str(client.get_model_version_by_alias(MODEL, "champion").version) == "2"
    assert mlflow.get_tracking_uri().startswith(f"sqlite:///{project}")


@pytest.mark.slow
def test_dvc_experiment_registers_without_moving_the_alias(project, base_model_dir, monkeypatch):
    """Under a real `dvc exp run` (DVC sets DVC_EXP_NAME for the stage) the version is
    registered and tagged with the experiment's name, and @challenger stays where it was;
    `register.move_alias_in_experiments: true` moves it; `dvc repro` / a plain run moves it."""
    import subprocess

    adapter = tiny_adapter(str(base_model_dir))
    train_candidates(project, ["r16"], adapter)
    write_eval(project, {"r16": pattern(40, 30)}, winner="r16")
    assert runner.invoke(app, ["register"]).exit_code == 0  # plain run: v1 @challenger
    client = store_client(project)
    assert "temper.experiment" not in client.get_model_version(MODEL, "1").tags

    (project / "dvc.yaml").write_text(
        "stages:\n  register:\n    cmd: temper register\n    params: [register]\n"
    )
    git(project, "add", "dvc.yaml")
    git(project, "commit", "-q", "-m", "register stage")
    subprocess.run(["dvc", "init", "-q"], cwd=project, check=True)
    git(project, "add", ".dvc")
    git(project, "commit", "-q", "-m", "dvc init")
    run = subprocess.run(
        ["dvc", "exp", "run", "-n", "try-lr", "-S", "register.require_winner=false"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "alias not moved" in run.stdout + run.stderr
    v2 = client.get_model_version(MODEL, "2")
    assert v2.tags["temper.experiment"] == "try-lr" and not v2.aliases
    assert tracking.version_str(client.get_model_version_by_alias(MODEL, "challenger").version) == "1"  # fmt: skip
    summary = json.loads((project / "metrics" / "register.json").read_text())
    assert summary["alias"] is None and summary["experiment"] == "try-lr"

    # Asked for: the alias moves in an experiment too (the variable DVC sets, set by hand).
    monkeypatch.setenv("DVC_EXP_NAME", "try-again")
    result = runner.invoke(app, ["register", "-S", "register.move_alias_in_experiments=true"])
    assert result.exit_code == 0, result.output
    v3 = client.get_model_version_by_alias(MODEL, "challenger")
    assert tracking.version_str(v3.version) == "3" and v3.tags["temper.experiment"] == "try-again"


@pytest.mark.slow
def test_card_and_description_come_from_the_task_and_the_data_readme_is_optional(
    project, base_model_dir
):
    import mlflow

    train_candidates(project, ["r16"], tiny_adapter(str(base_model_dir)))
    write_eval(project, {"r16": pattern(20, 15)}, winner="r16")
    result = runner.invoke(app, ["register", "-S", "register.data_readme=data/missing.md"])
    assert result.exit_code == 0, result.output
    client = store_client(project)
    description = client.get_registered_model(MODEL).description
    assert description.startswith("Temper: LoRA adapters for task clause_review: Given one")
    mv = client.get_model_version_by_alias(MODEL, "challenger")
    assert mv.description.endswith("on 20 test examples (clause_review)")
    assert mv.tags["temper.task"] == "clause_review"
    assert json.loads(mv.tags["temper.serving.generation"])["max_new_tokens"] == 48
    assert json.loads(mv.tags["temper.serving.base"])["name"] == "smollm2-135m-instruct"
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1", dst_path="dl"))
    card = (local / "README.md").read_text()
    assert "No data README given" in card and "CC BY 4.0" not in card
    assert "name its CUAD clause type" in card  # the task's description
    assert (
        "| `clause_type` | label | 38 |" in card and "| `key_term` | text (nullable) | - |" in card
    )
    assert "${" not in card
