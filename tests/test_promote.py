"""Promotion, rollback and pull against a real sqlite MLflow store and the real base model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from registry_fixtures import (
    MODEL,
    make_project,
    pattern,
    store_client,
    tiny_adapter,
    train_candidates,
    write_eval,
)
from typer.testing import CliRunner

from temper.cli import app
from temper.release import promote
from temper.tracking import pull

runner = CliRunner()
N = 60  # test examples per evaluation


@pytest.fixture
def project(tmp_path, base_model_dir, monkeypatch) -> Path:
    make_project(tmp_path, base_model_dir)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def register(project: Path, base_model_dir: Path, correct: list[int]) -> str:
    """One pipeline round: train a candidate, evaluate it (given correctness), register it."""
    train_candidates(project, ["r16"], tiny_adapter(str(base_model_dir)))
    write_eval(project, {"r16": correct}, winner="r16")
    result = runner.invoke(app, ["register"])
    assert result.exit_code == 0, result.output
    return json.loads((project / "metrics" / "register.json").read_text())["version"]


def champion(project: Path) -> str:
    return str(store_client(project).get_model_version_by_alias(MODEL, "champion").version)


@pytest.mark.slow
def test_promote_first_refuse_worse_accept_better_then_rollback(project, base_model_dir):
    report = project / "reports" / "promotion.md"

    v1 = register(project, base_model_dir, pattern(N, 42))  # accuracy 0.70
    result = runner.invoke(app, ["promote"])
    assert result.exit_code == 0, result.output
    assert champion(project) == v1 == "1"
    assert "PROMOTED" in report.read_text()
    assert store_client(project).get_model_version(MODEL, v1).tags["temper.promotion"] == "promoted"

    v2 = register(project, base_model_dir, pattern(N, 24))  # accuracy 0.40: worse
    result = runner.invoke(app, ["promote"])
    assert result.exit_code == 1, result.output
    assert "worse than champion v1" in result.output
    assert champion(project) == v1  # champion stays
    tags = store_client(project).get_model_version(MODEL, v2).tags
    assert tags["temper.promotion"] == "refused"
    assert tags["temper.promotion.vs"] == "1"
    assert tags["temper.promotion.delta"].startswith("-0.3000 [")
    text = report.read_text()
    assert "REFUSED" in text and "| challenger | 2 | 0.4000 |" in text
    assert "| champion before | 1 | 0.7000 |" in text

    # The same version again: no change, still refused (exit 1), nothing moves.
    assert runner.invoke(app, ["promote"]).exit_code == 1
    assert champion(project) == v1

    v3 = register(project, base_model_dir, pattern(N, 43))  # 0.717: not worse
    result = runner.invoke(app, ["promote"])
    assert result.exit_code == 0, result.output
    assert champion(project) == v3 == "3"
    assert promote.history(store_client(project), MODEL) == ["1", "3"]

    result = runner.invoke(app, ["promote"])  # already champion
    assert result.exit_code == 0 and "already champion" in result.output

    result = runner.invoke(app, ["rollback"])
    assert result.exit_code == 0, result.output
    assert champion(project) == v1
    assert (
        store_client(project).get_model_version(MODEL, v3).tags["temper.promotion"] == "rolled_back"
    )
    assert "ROLLED BACK" in report.read_text()

    result = runner.invoke(app, ["promote"])  # v3 is still @challenger
    assert result.exit_code == 1 and "version 3 was rolled back" in result.output
    assert champion(project) == v1

    result = runner.invoke(app, ["rollback"])  # nothing before v1
    assert result.exit_code == 2
    assert "no previous champion before version 1" in result.output
    assert champion(project) == v1


@pytest.mark.slow
def test_challenger_that_failed_gates_or_other_eval_set_is_refused(project, base_model_dir):
    register(project, base_model_dir, pattern(N, 42))
    assert runner.invoke(app, ["promote"]).exit_code == 0

    v2 = register(project, base_model_dir, pattern(N, 50))  # better, but...
    client = store_client(project)
    client.set_model_version_tag(MODEL, v2, "temper.gates_passed", "false")
    result = runner.invoke(app, ["promote"])
    assert result.exit_code == 1 and "did not pass its gates" in result.output
    assert champion(project) == "1"

    client.set_model_version_tag(MODEL, v2, "temper.gates_passed", "true")
    client.set_model_version_tag(MODEL, v2, "temper.eval_set", "another-set")
    # (promote.rescore: auto would re-score the champion here: see the rescore test)
    result = runner.invoke(app, ["promote", "-S", "promote.rescore=never"])
    assert result.exit_code == 1 and "different sets" in result.output
    assert champion(project) == "1"


@pytest.mark.slow
def test_promote_rechecks_the_gates_in_force_on_the_recorded_evaluation(project, base_model_dir):
    """A version whose tag says its gates passed is refused when the gates in force fail on
    the evaluation recorded with it (CI tightened a gate); the same version passes later."""
    v1 = register(project, base_model_dir, pattern(N, 42))  # 0.70
    assert store_client(project).get_model_version(MODEL, v1).tags["temper.gates_passed"] == "true"
    result = runner.invoke(app, ["promote", "-S", "gates.min_primary=0.99"])
    assert result.exit_code == 1, result.output
    assert (
        "challenger fails the gates in force on its recorded evaluation: "
        "min_primary (0.7 >= 0.99 is false)" in result.output
    )
    assert promote.tracking.alias_version(store_client(project), MODEL, "champion") is None
    tags = store_client(project).get_model_version(MODEL, v1).tags
    assert tags["temper.promotion"] == "refused" and tags["temper.gates_passed"] == "true"

    # Gates that the recorded evaluation cannot show are failures too (no schema rate logged).
    result = runner.invoke(app, ["promote", "-S", "gates.min_schema_valid_rate=0.5"])
    assert result.exit_code == 1, result.output
    assert "min_schema_valid_rate (no value in the recorded evaluation; needs >= 0.5)" in (
        result.output
    )

    result = runner.invoke(app, ["promote"])
    assert result.exit_code == 0, result.output
    assert champion(project) == v1
    assert (
        "re-checked with the gates in force: passed"
        in (project / "reports" / "promotion.md").read_text()
    )


@pytest.mark.slow
def test_version_without_recorded_evaluation_cannot_be_promoted(project):
    """A version made by hand with `temper.gates_passed=true` promotes nothing: promote needs
    the evaluation recorded at registration (exit 2, the version named)."""
    client = store_client(project)
    from temper import tracking

    experiment_id = tracking.setup(
        tracking.MlflowConfig(tracking_uri=f"sqlite:///{project / 'mlflow.db'}"), project
    )
    run = client.create_run(experiment_id, run_name="by-hand")
    client.create_registered_model(MODEL)
    mv = client.create_model_version(
        MODEL,
        f"{run.info.artifact_uri}/adapter",
        run_id=run.info.run_id,
        tags={
            "temper.gates_passed": "true",
            "temper.candidate": "r16",
            "temper.primary_metric": "clause_type.accuracy",
        },
    )
    client.set_registered_model_alias(MODEL, "challenger", mv.version)
    result = runner.invoke(app, ["promote"])
    assert result.exit_code == 2, result.output
    assert "version 1: no temper/eval.json in run" in result.output


@pytest.mark.slow
def test_gate_command_reads_the_evaluation_and_applies_the_gates_in_force(project):
    """`temper gate` on an EvalResult: its own gates come from params (-S tightens them)."""
    write_eval(project, {"a": pattern(N, 42), "b": pattern(N, 12)}, winner="a")  # 0.7, 0.2
    res = runner.invoke(app, ["gate"])
    assert res.exit_code == 0, res.output
    assert "winner: a" in res.output and "FAIL" in res.output  # b fails min_primary
    res = runner.invoke(app, ["gate", "-c", "b"])
    assert res.exit_code == 1 and "b: FAIL" in res.output
    res = runner.invoke(app, ["gate", "-S", "gates.min_primary=0.9"])
    assert res.exit_code == 1 and "no candidate passes" in res.output
    res = runner.invoke(app, ["gate", "--eval", "metrics/missing.json"])
    assert res.exit_code == 2 and "metrics/missing.json: not found" in res.output
    res = runner.invoke(app, ["gate", "-c", "zzz"])
    assert res.exit_code == 2 and "no candidate 'zzz'" in res.output
    (project / "metrics" / "old.json").write_text('{"winner": "a", "candidates": {}}')
    res = runner.invoke(app, ["gate", "--eval", "metrics/old.json"])
    assert res.exit_code == 2 and "not a EvalResult" in res.output


@pytest.mark.slow
def test_promote_without_challenger_exits_2(project):
    result = runner.invoke(app, ["promote"])
    assert result.exit_code == 2
    assert f"{MODEL}@challenger does not exist" in result.output


def test_paired_interval():
    same = [1.0, 0.0, 1.0, 1.0]
    assert promote.paired_interval(same, same, 0.95, 1000, 0) == (0.0, 0.0, 0.0)
    rng = np.random.default_rng(1)
    a = (rng.random(400) < 0.7).astype(float)
    b = (rng.random(400) < 0.5).astype(float)
    delta, lo, hi = promote.paired_interval(list(a), list(b), 0.95, 2000, 0)
    assert delta == pytest.approx(a.mean() - b.mean())
    assert lo < delta < hi
    assert lo > 0.05 and hi < 0.35  # true difference 0.2, n=400
    # Pairing matters: identical per-example outcomes shifted by one flip give a tight interval.
    c = a.copy()
    c[0] = 1 - c[0]
    d2, lo2, hi2 = promote.paired_interval(list(c), list(a), 0.95, 2000, 0)
    assert hi2 - lo2 < 0.02


@pytest.mark.parametrize(
    "uri, name, alias, version",
    [
        ("models:/m@champion", "m", "champion", None),
        ("models:/m/3", "m", None, "3"),
        ("m@challenger", "m", "challenger", None),
        ("m", "m", None, None),
    ],
)
def test_uri_forms(uri, name, alias, version):
    m = pull.URI_RE.match(uri)
    assert (m["name"], m["alias"], m["version"]) == (name, alias, version)


@pytest.mark.slow
def test_pull_champion_loads_as_a_bundle_and_the_adapter_is_live(
    project, base_model_dir, tmp_path_factory
):
    import torch
    from transformers import AutoModelForCausalLM

    from temper.bundle import load_bundle

    register(project, base_model_dir, pattern(N, 42))
    assert runner.invoke(app, ["promote"]).exit_code == 0
    out = tmp_path_factory.mktemp("pulled") / "champion"
    result = runner.invoke(app, ["pull", f"models:/{MODEL}@champion", "--out", str(out)])
    assert result.exit_code == 0, result.output

    manifest = json.loads((out / "serving.json").read_text())
    assert manifest["registry"]["version"] == "1" and "champion" in manifest["registry"]["aliases"]
    assert "CUAD" in (out / "README.md").read_text()
    assert (out / "adapter" / "adapter_model.safetensors").exists()

    loaded = load_bundle(out, base_dir=base_model_dir)  # merged adapter, the bundle's tokenizer
    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Classify: This Agreement is governed by New York law."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        adapted = loaded.model.generate(**prompt, max_new_tokens=8, do_sample=False)
        logits_a = loaded.model(**prompt).logits[0, -1]
    new = adapted[0, prompt["input_ids"].shape[1] :]
    assert 0 < len(new) <= 8
    # The adapter is live: its non-zero LoRA weights change the next-token logits.
    plain = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits_b = plain(**prompt).logits[0, -1]
    assert not torch.allclose(logits_a, logits_b)


@pytest.mark.slow
def test_pull_with_base_refuses_a_base_model_with_another_hash(project, base_model_dir, tmp_path):
    register(project, base_model_dir, pattern(N, 42))
    other = tmp_path / "other-base"
    other.mkdir()
    source = json.loads((base_model_dir / "temper_source.json").read_text())
    source["files"]["model.safetensors"] = "0" * 64
    (other / "temper_source.json").write_text(json.dumps(source))
    result = runner.invoke(
        app, ["pull", f"{MODEL}@challenger", "--with-base", "-S", f"model.dir={other}"]
    )
    assert result.exit_code == 2
    assert "but this bundle was trained on smollm2-135m-instruct" in result.output
    assert "with hash" in result.output and "--with-base" in result.output


@pytest.mark.slow
def test_promote_rescores_the_champion_on_the_challengers_evaluation_set(project, base_model_dir):
    """Different evaluation sets: `auto` re-scores the champion (its adapter downloaded through
    the registry, the real base model generating a few tokens) on the challenger's examples and
    pairs those; `never` refuses as before. The tiny random adapter answers no clause right in
    8 tokens, so the re-scored champion is measurably 0 and a perfect challenger wins."""
    task_file = project / "configs" / "tasks" / "clause_review.yaml"
    task_file.write_text(task_file.read_text().replace("max_new_tokens: 48", "max_new_tokens: 8"))
    fast = ["-S", "evaluate.threads=1", "-S", "evaluate.batch_size=5", "-S", "evaluate.progress=false"]  # fmt: skip
    v1 = register(project, base_model_dir, pattern(4, 4))  # 4 examples, all right
    assert runner.invoke(app, ["promote"]).exit_code == 0 and champion(project) == v1
    v2 = register(project, base_model_dir, pattern(5, 5))  # another set: 5 examples
    tags = store_client(project).get_model_version(MODEL, v2).tags
    assert (
        tags["temper.eval_set"]
        != store_client(project).get_model_version(MODEL, v1).tags["temper.eval_set"]
    )

    result = runner.invoke(app, ["promote", "--no-rescore", *fast])
    assert result.exit_code == 1 and "different sets" in result.output
    assert "--rescore" in result.output and champion(project) == v1

    result = runner.invoke(app, ["promote", *fast])  # promote.rescore: auto
    assert result.exit_code == 0, result.output
    assert "champion re-scored on the challenger's 5 examples" in result.output
    assert champion(project) == v2
    tags = store_client(project).get_model_version(MODEL, v2).tags
    assert tags["temper.promotion.rescored"] == "true"
    report = (project / "reports" / "promotion.md").read_text()
    decision = json.loads(report.split("```json\n", 1)[1].split("```", 1)[0])
    assert decision["rescored"] is True and decision["n_examples"] == 5
    assert decision["challenger_value"] == 1.0 and decision["champion_value"] == 0.0
    assert decision["delta"] == 1.0


@pytest.mark.slow
def test_rescore_refuses_a_changed_evaluation_file(project, base_model_dir):
    register(project, base_model_dir, pattern(4, 4))
    assert runner.invoke(app, ["promote"]).exit_code == 0
    register(project, base_model_dir, pattern(5, 5))
    test_file = project / "data" / "prepared" / "test.jsonl"
    test_file.write_text(test_file.read_text() + "\n")
    result = runner.invoke(app, ["promote"])
    assert result.exit_code == 2
    assert "differs from the challenger's evaluation set" in result.output
