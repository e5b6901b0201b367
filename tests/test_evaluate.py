"""Stage evaluate: parsing, scoring, gates and the `temper gate` exit codes; then (slow) the
real base model with a real LoRA adapter end to end, MLflow in a tmp sqlite store."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from temper.cli import app
from temper.evaluation.config import EvalError, EvaluateConfig
from temper.evaluation.gates import GatesConfig, check
from temper.evaluation.metrics import Resamples
from temper.evaluation.predict import api_predictions
from temper.evaluation.records import load_records
from temper.evaluation.scoring import answer_fields, deltas, references_for, score_system
from temper.io import read_json, read_jsonl, write_jsonl
from temper.results import CandidateEval, EvalResult, TrainResult

ROOT = Path(__file__).resolve().parents[1]


def record(i: int, label: str, key: str | None, gold_all: list[str] | None = None) -> dict:
    return {
        "id": f"r{i}",
        "text": f"clause {i}",
        "prompt": [],
        "gold": {"clause_type": label, "key_term": key},
        "gold_all": {"clause_type": gold_all or [label]},
    }


def pred(i: int, output: str | None, task) -> dict:
    return {
        "id": f"r{i}",
        "output": output,
        "latency_ms": 10.0 + i,
        "amortised_ms": 4.0,
        "new_tokens": 5,
        **answer_fields(task, output),
    }


def test_unparseable_and_off_schema_answers_are_counted_never_fatal(task):
    ok = answer_fields(task, 'Sure! ```json\n{"clause_type": "Insurance", "key_term": null}\n```')
    assert ok["valid"] and ok["answer"]["clause_type"] == "Insurance"
    for text in [
        "no json here",
        "{broken",
        None,
        '{"clause_type": "Made Up", "key_term": null}',
        '{"clause_type": "Insurance"}',
        "[1, 2]",
    ]:
        out = answer_fields(task, text)
        assert not out["valid"] and out["problems"]
        # JSON, but off-schema: counts for json_valid_rate, not for schema_valid_rate.
        assert out["json_ok"] == (text is not None and text.startswith('{"'))


def test_scores_by_hand(task):
    records = [
        record(0, "Insurance", None),
        record(1, "Governing Law", "New York"),
        record(2, "Audit Rights", None, ["Audit Rights", "Insurance"]),
        record(3, "Governing Law", "Delaware"),
    ]
    preds = [
        pred(0, '{"clause_type": "Insurance", "key_term": null}', task),
        pred(1, '{"clause_type": "Governing Law", "key_term": "the State of New York"}', task),
        pred(2, '{"clause_type": "Insurance", "key_term": null}', task),
        pred(3, "I think it is about Delaware law.", task),
    ]  # unparseable
    refs = references_for(task, records, None)
    rs = Resamples.draw(4, 500, seed=0)
    metrics, stats, ex = score_system(task, records, preds, refs, rs, {"usd_per_1k": 0.5})
    assert metrics["json_valid_rate"]["value"] == 0.75
    assert metrics["schema_valid_rate"]["value"] == 0.75
    assert metrics["clause_type.accuracy"]["value"] == 0.5
    assert metrics["clause_type.accuracy_any"]["value"] == 0.75  # r2's second gold label
    # ROUGE only where gold has a key term (r1, r3). r1: 5 predicted words, 2 reference words,
    # both found: F1 = 2 * (2/5 * 1) / (2/5 + 1) = 4/7; r3 (unparseable) = 0.
    assert metrics["key_term.rouge1"]["value"] == pytest.approx((4 / 7 + 0) / 2)
    assert metrics["key_term.null_match"]["value"] == 0.75
    # Key-term quality counts the clauses with a gold key term (r1, r3); null agreement the
    # others (r0, r2), both answered null.
    assert metrics["key_term.exact_match"]["value"] == 0.0
    assert metrics["key_term.null_agreement"]["value"] == 1.0
    assert metrics["usd_per_1k"] == {"value": 0.5}
    # Latency is per request (each answer's own time); the amortised figure is apart.
    assert metrics["latency_ms_mean"]["value"] == pytest.approx(11.5)
    # Percentiles are nearest rank (temper.stats): an observed latency, never interpolated.
    assert metrics["latency_ms_p50"]["value"] == 11.0
    assert metrics["latency_ms_p95"]["value"] == 13.0
    assert metrics["latency_ms_amortised"]["value"] == 4.0
    for m in metrics.values():
        if "ci_low" in m:
            assert m["ci_low"] <= m["value"] <= m["ci_high"]
    # Paired deltas against itself are exactly zero in every resample.
    d = deltas(stats, stats, rs)
    assert d["clause_type.accuracy"] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def test_api_baseline_missing_answers_are_wrong_and_counted(tmp_path, task):
    records = [record(0, "Insurance", None), record(1, "Audit Rights", None)]
    path = tmp_path / "baseline_test.jsonl"
    write_jsonl(
        path,
        [
            {
                "id": "r0",
                "output": '{"clause_type": "Insurance", "key_term": null}',
                "latency_ms": 800.0,
                "input_tokens": 400,
                "output_tokens": 12,
                "usd": 0.0001,
            }
        ],
    )
    preds, info = api_predictions(records, path, task)
    assert info == {"missing": 1}
    assert preds[0]["valid"] and not preds[1]["valid"] and preds[1]["output"] is None


def test_raw_format_is_mapped_and_bad_rows_name_file_line_and_field(tmp_path, task):
    from temper.records.sources import FieldMap

    fmap = FieldMap(
        id="id",
        text="clause",
        group="contract_id",
        gold={"clause_type": "category", "key_term": "answer"},
        gold_all={"clause_type": "labels"},
    )
    raw = tmp_path / "raw.jsonl"
    rows = [
        {
            "id": "a",
            "clause": "  This Agreement is governed by  New York law.",
            "contract_id": "c1",
            "category": "Governing Law",
            "labels": ["Governing Law"],
            "answer": "New York",
        }
    ]
    write_jsonl(raw, rows)
    recs = load_records(raw, task, fmap)
    assert recs[0]["text"] == "This Agreement is governed by New York law."
    assert recs[0]["prompt"] == task.messages(recs[0]["text"])
    assert recs[0]["gold"] == {"clause_type": "Governing Law", "key_term": "New York"}
    write_jsonl(
        raw,
        rows
        + [{"id": "b", "contract_id": "c1", "category": "Insurance", "labels": [], "answer": "No"}],
    )
    with pytest.raises(EvalError, match=r"raw.jsonl:2: missing field 'clause'"):
        load_records(raw, task, fmap)
    # A file without the multi-label column is scored against the single label, as prepare
    # reads it (docs/prepare.md).
    write_jsonl(raw, [{k: v for k, v in r.items() if k != "labels"} for r in rows])
    assert load_records(raw, task, fmap)[0]["gold_all"] == {"clause_type": ["Governing Law"]}


def entry(acc: float, low: float | None, valid: float) -> CandidateEval:
    """A candidate's evaluation as the evaluate stage records it (`results.CandidateEval`)."""
    delta = (
        None
        if low is None
        else {"clause_type.accuracy": {"value": acc - 0.1, "ci_low": low, "ci_high": acc}}
    )
    return CandidateEval.model_validate(
        {
            "adapter": "models/candidates/x/adapter",
            "seconds": 1.0,
            "metrics": {
                "clause_type.accuracy": {"value": acc, "ci_low": acc - 0.05, "ci_high": acc + 0.05},
                "json_valid_rate": {"value": valid},
                "latency_ms_p95": {"value": 900.0},
            },
            "delta_vs_baseline": delta,
        }
    )


def evaluation(**candidates: CandidateEval) -> EvalResult:
    return EvalResult.model_validate(
        {
            "primary_metric": "clause_type.accuracy",
            "n_examples": 10,
            "test_file": "t.jsonl",
            "test_sha256": "0" * 64,
            "confidence": 0.95,
            "n_resamples": 1000,
            "task": {"name": "clause_review", "prompt_hash": "x"},
            "baseline": None,
            "candidates": candidates,
            "winner": None,
            "gates_config": {},
            "seconds": 1.0,
            "judge": {"enabled": False, "provider": "replay", "model": "m", "sample_frac": 0.2},
        }
    )


def test_gates(tmp_path):
    cfg = GatesConfig(
        min_primary=0.5, min_delta_low=0.0, min_json_valid_rate=0.95, max_p95_latency_ms=1000
    )
    good = check(cfg, "clause_type.accuracy", entry(0.7, 0.02, 0.99))
    assert good.passed and len(good.checks) == 4
    bad = check(cfg, "clause_type.accuracy", entry(0.7, -0.01, 0.99))
    assert not bad.passed
    assert [c.gate for c in bad.checks if not c.passed] == ["min_delta_low"]
    slow = check(
        cfg.model_copy(update={"max_p95_latency_ms": 500}),
        "clause_type.accuracy",
        entry(0.7, 0.02, 0.99),
    )
    assert [c.gate for c in slow.checks if not c.passed] == ["max_p95_latency_ms"]
    no_base = check(cfg, "clause_type.accuracy", entry(0.7, None, 1))
    assert not no_base.passed  # no baseline: a delta gate cannot pass


def test_non_inferiority_vs_the_api_teacher_superiority_vs_the_base_model():
    """auto: the API teacher need only not be beaten by more than the margin (strictly); the
    base model must be beaten. Each check names the test it ran."""
    from temper.evaluation.gates import baseline_test

    cfg = GatesConfig(min_primary=None, min_json_valid_rate=None, min_judge_win_rate=None)
    assert cfg.vs_baseline == "auto" and cfg.non_inferiority_margin == 0.05
    slightly_worse = entry(0.7, -0.03, 1.0)
    api = check(cfg, "clause_type.accuracy", slightly_worse, "api")
    assert api.passed and [c.gate for c in api.checks] == ["non_inferiority"]
    assert api.checks[0].threshold == -0.05 and api.checks[0].op == ">"
    assert "non-inferiority vs API teacher" in api.checks[0].note
    base = check(cfg, "clause_type.accuracy", slightly_worse, "base_model")
    assert not base.passed and [c.gate for c in base.checks] == ["min_delta_low"]
    assert "superiority vs base model" in base.checks[0].note
    at_margin = check(cfg, "clause_type.accuracy", entry(0.7, -0.05, 1.0), "api")
    assert not at_margin.passed  # ci_low must be strictly above -margin
    forced = cfg.model_copy(update={"vs_baseline": "superiority"})
    assert not check(forced, "clause_type.accuracy", slightly_worse, "api").passed
    assert baseline_test(cfg.model_copy(update={"vs_baseline": "non_inferiority"}), None) == (
        "non_inferiority"
    )
    off = cfg.model_copy(update={"non_inferiority_margin": None})
    assert check(off, "clause_type.accuracy", entry(0.7, -0.5, 1.0), "api").checks == []
    no_base = check(cfg, "clause_type.accuracy", entry(0.7, None, 1.0), "api")
    assert not no_base.passed  # no deltas: cannot show non-inferiority either


def selected(result: EvalResult, split: str, values: dict, chosen: str | None) -> EvalResult:
    from temper.results import Selection

    result.selection = Selection(
        split=split,
        file="v.jsonl",
        sha256="1" * 64,
        n_examples=5,
        metric="clause_type.accuracy",
        values=values,
        chosen=chosen,
    )
    return result


def test_winner_is_chosen_on_validation_and_must_pass_its_gates_on_test():
    from temper.evaluation.gates import best, gate_all

    cfg = GatesConfig(min_primary=0.5, min_delta_low=None, min_judge_win_rate=None)
    # a is better on test, b on validation: b wins (test figures do not pick).
    result = selected(
        evaluation(a=entry(0.8, None, 1.0), b=entry(0.6, None, 1.0)),
        "validation",
        {"a": 0.5, "b": 0.55},
        "b",
    )
    assert gate_all(cfg, result) == "b"
    # The chosen one fails its gates on test: no winner, not the runner-up by its test score.
    result.candidates["b"] = entry(0.4, None, 1.0)
    assert gate_all(cfg, result) is None
    # On test (no validation split): the best passing candidate on test.
    result = selected(
        evaluation(a=entry(0.8, None, 1.0), b=entry(0.6, None, 1.0)), "test", {}, None
    )
    assert gate_all(cfg, result) == "a"
    # Ties go to the first name in alphabetical order; a missing value ranks last.
    assert best({"b": 0.5, "a": 0.5, "c": 0.4}) == "a"
    assert best({"b": None, "a": 0.1}) == "a" and best({}) is None


def test_gate_command_exit_codes(tmp_path):
    path = tmp_path / "eval.json"
    evaluation(a=entry(0.7, 0.02, 0.99), b=entry(0.6, 0.01, 0.90)).save(path)
    runner = CliRunner()
    params = str(ROOT / "params.yaml")
    res = runner.invoke(app, ["gate", "-p", params, "--eval", str(path)])
    assert res.exit_code == 0, res.output
    assert "winner: a" in res.output and "FAIL" in res.output  # b fails json_valid_rate
    res = runner.invoke(app, ["gate", "-p", params, "--eval", str(path), "-c", "b"])
    assert res.exit_code == 1 and "b: FAIL" in res.output
    res = runner.invoke(
        app, ["gate", "-p", params, "--eval", str(path), "-S", "gates.min_primary=0.9"]
    )
    assert res.exit_code == 1 and "no candidate passes" in res.output
    res = runner.invoke(app, ["gate", "-p", params, "--eval", str(tmp_path / "missing.json")])
    assert res.exit_code == 2
    res = runner.invoke(app, ["gate", "-p", params, "--eval", str(path), "-c", "zzz"])
    assert res.exit_code == 2
    (tmp_path / "old.json").write_text('{"primary_metric": "m", "candidates": {}}')
    res = runner.invoke(app, ["gate", "-p", params, "--eval", str(tmp_path / "old.json")])
    assert res.exit_code == 2 and "not a EvalResult" in res.output  # names the file, not a guess


# --------------------------------------------------------------------------- slow: real model


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core runner two OpenMP threads that spin-wait for each
    other ran these tests 6x slower than one (measured); restored afterwards."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.slow
def test_prefix_cache_gives_the_same_answers(base_model_dir, task, prepared_dir, one_thread):
    from temper.evaluation.generation import generate, load_model

    records = read_jsonl(prepared_dir / "test.jsonl")[:6]
    prompts = [task.teacher_messages([], r["text"]) for r in records]  # label list: long prefix
    model, tok = load_model(base_model_dir)
    with_cache = generate(model, tok, prompts, 12, batch_size=3, progress=False)
    without = generate(model, tok, prompts, 12, batch_size=3, prefix_cache=False, progress=False)
    assert [g.text for g in with_cache] == [g.text for g in without]
    # Each answer's own latency lies between its batch's first token and the batch's end.
    assert all(g.new_tokens > 0 and g.latency_ms >= g.first_token_ms > 0 for g in with_cache)
    assert all(g.amortised_ms * 3 >= g.latency_ms * 0.999 for g in with_cache)


@pytest.mark.slow
def test_stage_end_to_end_with_a_real_adapter(
    tmp_path, base_model_dir, task, prepared_dir, one_thread, caplog
):
    import mlflow
    from fake_api import FakeAPI
    from registry_fixtures import template_db, tiny_adapter

    from temper.evaluation.judge import JudgeConfig
    from temper.providers import ProviderConfig
    from temper.stages import evaluate
    from temper.tracking import MlflowConfig, Tracking

    # The yardstick's training records, in the distilled format (text + the teacher's answer).
    distilled = tmp_path / "distilled_train.jsonl"
    train_rows = read_jsonl(prepared_dir / "train.jsonl")
    write_jsonl(distilled, [{"text": r["text"], "answer": r["gold"]} for r in train_rows])
    cands = tmp_path / "candidates"
    for name in ("tiny", "tiny2"):
        shutil.copytree(tiny_adapter(str(base_model_dir)), cands / name / "adapter")
    # tiny's training record names a logged model of another MLflow store (a clone, a
    # teammate's store): its evaluation run still gets the training figures, unlinked.
    TrainResult(
        candidate="tiny",
        steps=3,
        train_loss=1.0,
        train_loss_mean=1.1,
        val_loss=0.9,
        base_val_loss=1.6,
        train_seconds=2.0,
        train_tokens=100,
        tokens_per_s=50.0,
        peak_rss_mb=1.0,
        peak_cuda_mb=None,
        train_records=4,
        clauses_cut=0,
        val_records=2,
        trainable_params=10,
        precision="fp32",
        gradient_checkpointing=False,
        num_processes=1,
        rank_weight_hashes=["x"],
        rank_tokens=[100],
        resumed=False,
        mlflow_run_id=None,
        mlflow_model_id="m-0123456789abcdef",
        base_model_hash="b",
        data_hash="d",
        config={"rank": 2, "method": "lora"},
    ).save(cands / "tiny" / "train_metrics.json")
    shutil.copy(template_db(), tmp_path / "mlflow.db")
    mlflow_cfg = MlflowConfig(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_root=str(tmp_path / "mlartifacts"),
    )
    cfg = EvaluateConfig(
        test=str(prepared_dir / "test.jsonl"),
        validation=str(prepared_dir / "validation.jsonl"),
        candidates_dir=str(cands),
        baseline="auto",
        baseline_file=str(tmp_path / "none.jsonl"),
        baseline_few_shot=1,
        few_shot_from=str(prepared_dir / "train.jsonl"),
        max_examples=6,
        batch_size=4,
        n_resamples=300,
        threads=1,
        cache_dir=str(tmp_path / "cache"),
        metrics=str(tmp_path / "metrics" / "eval.json"),
        reports_dir=str(tmp_path / "reports"),
        worst_examples=3,
        progress=False,
        classical_train=str(distilled),
    )
    gates = GatesConfig(
        min_primary=0.0, min_delta_low=None, min_json_valid_rate=None, min_judge_win_rate=0.9
    )
    with FakeAPI(responder=lambda messages: '{"winner": "A"}') as api:  # position-biased judge
        judge = JudgeConfig(
            enabled=True,
            sample_frac=0.5,
            provider=ProviderConfig(
                kind="openai",
                model="judge-x",
                base_url=api.openai_url,
                cache=str(tmp_path / "judge.sqlite"),
                prices={"judge-x": {"input": 1, "output": 1}},
            ),
        )
        setup = evaluate.Setup(
            base_model_dir, judge, gates, tracking=Tracking(mlflow_cfg, {"test": "evaluate"})
        )
        with caplog.at_level(logging.INFO, logger="temper.evaluation.generation"):
            result = evaluate.run(cfg, task, setup)
        # 3 sampled examples x both orders; tiny2 is a copy of tiny, so its identical
        # questions are answered from the provider's cache.
        assert api.requests == 3 * 2

    saved = read_json(cfg.metrics)
    # Two loads: the base for the baseline, then tiny, kept loaded from its test answers to
    # its validation answers (tiny2's come from the cache).
    loads = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")]
    assert len(loads) == 2 and "adapter" not in loads[0] and "tiny/adapter" in loads[1], loads
    # Chosen on validation; equal scores (tiny2 is a copy): the first name breaks the tie.
    assert saved["winner"] == result.winner == "tiny"
    sel = saved["selection"]
    assert sel["split"] == "validation" and sel["n_examples"] == 6 and sel["chosen"] == "tiny"
    assert sel["file"] == cfg.validation and sel["metric"] == "clause_type.accuracy"
    for name in ("tiny", "tiny2"):
        val = saved["candidates"][name]["validation_metrics"]["clause_type.accuracy"]
        assert sel["values"][name] == val["value"] and val["ci_low"] <= val["value"]
    assert saved["baseline"]["kind"] == "base_model" and saved["n_examples"] == 6
    assert saved["baseline"]["cached"] is False
    # tiny2's files are tiny's: its answers come from the cache the first one filled.
    assert saved["candidates"]["tiny"]["cached"] is False
    assert saved["candidates"]["tiny2"]["cached"] is True
    for name in ("tiny", "tiny2"):
        entry = saved["candidates"][name]
        acc = entry["metrics"]["clause_type.accuracy"]
        assert acc["ci_low"] <= acc["value"] <= acc["ci_high"]
        assert "clause_type.accuracy" in entry["delta_vs_baseline"]
        assert entry["gates"]["passed"] is True  # the judge gate is skipped: uncalibrated
        assert entry["judge"]["flip_rate"] == 1.0 and entry["judge"]["calibrated"] is False
        assert entry["metrics"]["tokens_per_s"]["value"] > 0
        rows = read_jsonl(tmp_path / "reports" / "predictions" / f"{name}.jsonl")
        assert len(rows) == 6 and all("clause_type.accuracy" in r["scores"] for r in rows)
        # Constrained decoding (the default): every answer fits the schema, and every
        # answer carries the probability the model gave its label.
        assert entry["metrics"]["schema_valid_rate"]["value"] == 1.0
        # (rounded to 6 decimals: an untrained adapter's forced label can round to 0)
        assert all(0 <= r["confidence"]["clause_type"] <= 1 for r in rows)
        for key in ("ece", "mean_confidence", "accuracy_at_coverage_50"):
            assert 0 <= entry["metrics"][f"clause_type.{key}"]["value"] <= 1
        # Paired against the yardstick on its own field only.
        assert set(entry["delta_vs_classical"]) == {
            "clause_type.accuracy",
            "clause_type.accuracy_any",
            "clause_type.macro_f1",
        }
    classical = saved["classical"]
    assert classical["n_train"] == len(train_rows) and classical["fields"] == ["clause_type"]
    assert classical["cached"] is False and classical["train_file"] == str(distilled)
    assert not any(k.startswith("key_term") for k in classical["metrics"])
    cl_rows = read_jsonl(tmp_path / "reports" / "predictions" / "classical.jsonl")
    assert len(cl_rows) == 6 and all(0 < r["confidence"]["clause_type"] <= 1 for r in cl_rows)
    report = (tmp_path / "reports" / "eval.md").read_text()
    assert "winner chosen on validation (n=6" in report and "reported on test (n=6)" in report
    assert "test against the base_model baseline: superiority" in report
    for heading in (
        "## Metrics",
        "## Gates",
        "## LLM judge",
        "**no** (not gated)",
        "## Per category",
        "## Worst examples",
        "## Candidate - classical yardstick (paired)",
        "## Key terms (`key_term`)",
        "## Calibration",
        "gate off (`gates.min_delta_vs_classical_low: null`)",
    ):
        assert heading in report
    for png in ("per_class_accuracy.png", "deltas.png", "reliability.png"):
        assert (tmp_path / "reports" / png).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "reports" / "plots" / "deltas.csv").read_text().startswith("row,")

    # One MLflow child run per system under the pipeline run, with metrics and the report.
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(mlflow_cfg.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`temper.stage` = 'evaluate'")
    systems = sorted(r.data.tags["temper.system"] for r in runs)
    assert systems == ["baseline", "classical", "tiny", "tiny2"]
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1
    tiny = next(r for r in runs if r.data.tags["temper.system"] == "tiny")
    assert tiny.data.params["train.rank"] == "2" and tiny.data.metrics["train.val_loss"] == 0.9
    tiny2 = next(r for r in runs if r.data.tags["temper.system"] == "tiny2")
    tiny1 = next(r for r in runs if r.data.tags["temper.system"] == "tiny")
    assert tiny1.data.tags["temper.winner"] == "true"
    assert "validation.clause_type.accuracy" in tiny1.data.metrics
    assert "clause_type.accuracy" in tiny2.data.metrics
    arts = [a.path for a in client.list_artifacts(tiny2.info.run_id, "evaluate")]
    assert "evaluate/eval.md" in arts and "evaluate/tiny2.jsonl" in arts
    assert str(tmp_path) in tiny2.info.artifact_uri  # the tmp store, not the project's

    # Ad hoc: any adapter on a raw-format JSONL, no baseline, outputs under --out.
    raw = tmp_path / "raw.jsonl"
    raw_rows = read_jsonl(ROOT / "data" / "raw" / "contracts" / "test.jsonl")[:3]
    raw.write_text("".join(json.dumps(r) + "\n" for r in raw_rows))
    out = tmp_path / "adhoc"
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            "-p",
            str(ROOT / "params.yaml"),
            "-S",
            f"model.dir={base_model_dir}",
            "-S",
            "evaluate.progress=false",
            "-S",
            "evaluate.n_resamples=200",
            "-S",
            "evaluate.threads=1",
            "-S",
            f"evaluate.cache_dir={tmp_path / 'adhoc-cache'}",  # not the checkout's .cache
            "--data",
            str(raw),
            "--adapter",
            str(cands / "tiny" / "adapter"),
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    adhoc = read_json(out / "eval.json")
    assert adhoc["n_examples"] == 3 and list(adhoc["candidates"]) == ["tiny"]
    assert adhoc["baseline"] is None and (out / "eval.md").exists()
    assert np.isfinite(adhoc["candidates"]["tiny"]["metrics"]["json_valid_rate"]["value"])


@pytest.mark.slow
def test_answers_are_reused_only_when_nothing_that_shapes_them_changed(
    tmp_path, base_model_dir, task, prepared_dir, one_thread
):
    """The base model's and a candidate's answers come back from `cache_dir` when model,
    adapter, prompts and generation settings are the same, and are made again when a setting
    or one adapter weight changes."""
    from registry_fixtures import tiny_adapter
    from safetensors.torch import load_file, save_file

    from temper.evaluation.predict import cached_predictions

    records = read_jsonl(prepared_dir / "test.jsonl")[:2]
    prompts = [r["prompt"] for r in records]
    cache = tmp_path / "cache"
    cfg = EvaluateConfig(cache_dir=str(cache), progress=False, threads=1, max_examples=2)
    first, seconds, hit = cached_predictions(records, prompts, base_model_dir, task, cfg)
    assert not hit and seconds > 0 and len(first) == 2
    again, seconds2, hit2 = cached_predictions(records, prompts, base_model_dir, task, cfg)
    assert hit2 and again == first and seconds2 == seconds
    other = cfg.model_copy(update={"stop_at_json": False})  # a setting that shapes the answers
    _, _, hit3 = cached_predictions(records, prompts, base_model_dir, task, other)
    assert not hit3 and len(list(cache.glob("baseline-*.json"))) == 2

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter(str(base_model_dir)), adapter)
    made = cached_predictions(records, prompts, base_model_dir, task, cfg, adapter=adapter)
    assert made[2] is False and len(list(cache.glob("answers-*.json"))) == 1
    reused = cached_predictions(records, prompts, base_model_dir, task, cfg, adapter=adapter)
    assert reused == (made[0], made[1], True)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0  # one changed weight: another adapter
    save_file(tensors, weights)
    changed = cached_predictions(records, prompts, base_model_dir, task, cfg, adapter=adapter)
    assert changed[2] is False and len(list(cache.glob("answers-*.json"))) == 2


def test_unknown_primary_metric_fails_before_any_generation(tmp_path, task):
    from temper.stages import evaluate

    cfg = EvaluateConfig(primary_metric="clause_type.acuracy", candidates_dir=str(tmp_path))
    with pytest.raises(evaluate.ConfigError, match="clause_type.accuracy_any"):
        evaluate.run(cfg, task, evaluate.Setup(tmp_path))


def test_adapter_uris_resolve_through_the_mlflow_store(tmp_path):
    """`--adapter models:/name@alias` and `runs:/<id>/adapter` download from the store."""
    import mlflow
    from registry_fixtures import template_db

    from temper.evaluation.generation import resolve_adapter
    from temper.tracking import MlflowConfig, setup

    shutil.copy(template_db(), tmp_path / "mlflow.db")
    setup(
        MlflowConfig(
            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
            artifact_root=str(tmp_path / "mlartifacts"),
        )
    )
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 2}')
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("temper")
    run = client.create_run(exp.experiment_id)
    client.log_artifacts(run.info.run_id, str(folder), "adapter")
    client.create_registered_model("m")
    version = client.create_model_version(
        "m", f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id
    )
    client.set_registered_model_alias("m", "champion", version.version)
    for uri in (f"runs:/{run.info.run_id}/adapter", "models:/m@champion"):
        local = resolve_adapter(uri)
        assert (local / "adapter_config.json").read_text() == '{"r": 2}'
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        resolve_adapter(tmp_path / "nowhere")


def test_raw_file_is_scored_whatever_its_split_column_holds(tmp_path, task):
    """`temper evaluate --data FILE`: a raw file's split column (here "production") is not
    the prepare stage's split mapping and must not stop the evaluation."""
    from temper.records.sources import FieldMap

    fmap = FieldMap(
        id="id",
        text="clause",
        group="contract_id",
        split="split",
        gold={"clause_type": "category", "key_term": "answer"},
    )
    raw = tmp_path / "incoming.jsonl"
    write_jsonl(
        raw,
        [
            {
                "id": f"p{i}",
                "clause": f"Clause {i} is governed by Texas law.",
                "contract_id": "c9",
                "split": "production",
                "category": "Governing Law",
                "answer": "Texas",
            }
            for i in range(2)
        ],
    )
    recs = load_records(raw, task, fmap)
    assert [r["id"] for r in recs] == ["p0", "p1"]
    assert recs[0]["gold"] == {"clause_type": "Governing Law", "key_term": "Texas"}


def test_report_names_the_split_that_chose_and_the_test_against_the_baseline():
    from temper.evaluation.eval_report import no_winner, selection_lines

    result = selected(
        evaluation(a=entry(0.8, -0.02, 1.0), b=entry(0.6, -0.02, 1.0)), "test", {"a": 0.8, "b": 0.6}, "a"
    )  # fmt: skip
    data = result.model_dump(mode="json")
    data["gates_config"] = GatesConfig().model_dump()
    data["baseline"] = {"name": "baseline", "kind": "api", "metrics": {}}
    text = "\n".join(selection_lines(data))
    assert "warning: winner chosen on the test split (n=10)" in text and "optimistic" in text
    assert "test against the api baseline: non-inferiority" in text and "> -0.05" in text
    data["selection"]["split"], data["selection"]["chosen"] = "validation", "b"
    data["gates_config"]["vs_baseline"] = "superiority"
    text = "\n".join(selection_lines(data))
    assert "winner chosen on validation (n=5, `v.jsonl`), reported on test (n=10)" in text
    assert "superiority" in text and ">= 0.0" in text
    assert no_winner(data) == "none (b, chosen on validation, fails its gates on test)"
