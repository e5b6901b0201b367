"""The answer kinds beyond a single label, piece by piece (the slow end-to-end run is
tests/test_field_kinds.py): boolean confidence, P/R and macro-F1; the yardstick for booleans
and multi-label sets; and what the reports say when there is nothing to show."""

from __future__ import annotations

import json
import math

import numpy as np

from temper.evaluation.classical import classical_predictions
from temper.evaluation.confidence import confident_fields, value_span
from temper.evaluation.config import EvaluateConfig
from temper.evaluation.field_scores import metric_names, score_field
from temper.evaluation.report import answer_confidence
from temper.io import write_jsonl
from temper.reports.route import _ci
from temper.results import Estimate
from temper.task import TaskConfig

GOVERNING = "This Agreement shall be governed by the laws of the State of {}."
INSURANCE = "The Supplier shall maintain insurance coverage of at least {} dollars."


def kind_task(**field) -> TaskConfig:
    return TaskConfig.model_validate(
        {
            "name": "t",
            "system_prompt": "s",
            "user_template": "{text}",
            "fields": [{"name": "f", "description": "d", "gold": True, **field}],
        }
    )


def test_a_boolean_answer_has_a_confidence_span():
    raw = '{"f": true, "g": "x"}'
    start, end = value_span(raw, "f", True)
    assert raw[start:end] == "true"
    assert value_span('{"f": false}', "f", True) is None
    assert confident_fields(kind_task(kind="boolean")) == ["f"]
    assert confident_fields(kind_task(kind="label", multi=True, labels=["a"])) == []


def test_a_boolean_field_gets_macro_f1_and_per_class_precision_recall():
    f = kind_task(kind="boolean").fields[0]
    assert metric_names(f) == ["f.accuracy", "f.macro_f1"]
    values, refs = [True, True, False, None], [True, False, False, False]
    out = score_field(f, [{}] * 4, values, refs)
    assert out.scores["f.accuracy"].tolist() == [1.0, 0.0, 1.0, 0.0]
    per_class = out.extra["f.per_class"]
    assert per_class["true"]["precision"] == 0.5 and per_class["true"]["recall"] == 1.0
    assert per_class["false"]["recall"] == 1 / 3 and per_class["false"]["support"] == 3
    assert out.extra["f.labels"] == (
        ["true", "true", "false", ""],
        ["true", "false"] * 1 + ["false", "false"],
    )


def test_the_yardstick_answers_booleans_and_label_sets(tmp_path):
    train = tmp_path / "train.jsonl"
    rows = []
    for i in range(6):
        rows.append({"text": GOVERNING.format(f"S{i}"), "answer": {"f": True}})
        rows.append({"text": INSURANCE.format(i), "answer": {"f": False}})
    write_jsonl(train, rows)
    records = [
        {"id": "a", "text": GOVERNING.format("Ohio")},
        {"id": "b", "text": INSURANCE.format(9)},
    ]
    cfg = EvaluateConfig(classical_train=str(train), cache_dir=None)
    preds, info = classical_predictions(records, kind_task(kind="boolean"), cfg)
    assert [p["answer"]["f"] for p in preds] == [True, False] and info["fields"] == ["f"]
    assert all(0.5 < p["confidence"]["f"] <= 1 for p in preds)

    sets = [{"text": GOVERNING.format(f"S{i}"), "answer": {"f": ["law"]}} for i in range(6)] + [
        {"text": INSURANCE.format(i), "answer": {"f": ["money", "risk"]}} for i in range(6)
    ]
    write_jsonl(train, sets)
    multi = kind_task(kind="label", multi=True, labels=["law", "money", "risk"])
    preds, _ = classical_predictions(records, multi, cfg)
    assert [p["answer"]["f"] for p in preds] == [["law"], ["money", "risk"]]
    assert json.loads(preds[1]["output"]) == {"f": ["money", "risk"]}


def test_reports_say_n_a_and_no_spread_instead_of_nan_and_a_fake_interval():
    assert _ci(Estimate(value=math.nan, ci_low=math.nan, ci_high=math.nan), none="n/a (none)") == (
        "n/a (none)"
    )
    assert _ci(Estimate(value=7263.96, ci_low=7263.96, ci_high=7263.96), digits=0) == (
        "7264 (no spread over resamples)"
    )
    assert _ci(Estimate(value=0.5, ci_low=0.4, ci_high=0.6)) == "0.500 [0.400, 0.600]"


def test_the_worst_examples_are_the_most_confidently_wrong():
    rows = [
        {"id": "1", "confidence": {"f": 0.2}},
        {"id": "2", "confidence": {"f": 0.9}},
        {"id": "3", "confidence": None},
        {"id": "4", "confidence": {"g": 0.5, "h": 0.7}},
    ]
    order = sorted(rows, key=lambda p: -(answer_confidence(p, "f") or -1.0))
    assert [r["id"] for r in order] == ["2", "4", "1", "3"]
    assert np.isclose(answer_confidence(rows[3], None), 0.5)


def test_few_shot_and_stratified_sampling_take_list_answers():
    """A multi-label task's evaluate died in pick_few_shot: `unhashable type: 'list'`."""
    from temper.records.sampling import pick_few_shot, stratified_sample

    task = kind_task(kind="label", multi=True, labels=["a", "b"])
    train = [
        {"id": str(i), "text": "t", "gold": {"f": g}}
        for i, g in enumerate([["a"], ["a"], ["a", "b"]])
    ]
    shots = pick_few_shot(task, train, 3, "seed")
    assert sorted(json.dumps(r["gold"]["f"]) for r in shots) == ['["a", "b"]', '["a"]']
    assert len(stratified_sample(train, 2, "f", 0)) == 2


def test_the_confusion_matrix_of_a_boolean_and_of_many_labels(tmp_path):
    from temper.evaluation import confusion

    per_class = {
        "r16": {"f.labels": (["true", "", "false", "true"], ["true", "true", "false", "false"])}
    }
    rows = confusion.pairs(per_class, "r16", "f")
    assert rows == [
        ("true", "true"),
        ("true", "(no answer)"),
        ("false", "false"),
        ("false", "true"),
    ]
    table = confusion.markdown(rows, "r16", "f")
    assert table[2] == "| gold \\ answer | (no answer) | false | true |", table[2]
    assert table[4:6] == ["| false | 0 | 1 | 1 |", "| true | 1 | 0 | 1 |"], table
    path = confusion.write_csv(tmp_path / "c.csv", rows)
    assert path.read_text().splitlines()[:2] == ["actual,predicted", "true,true"]
    many = [(f"c{i}", f"c{(i + 1) % 20}") for i in range(20)] + [("c1", "c2")]
    top = confusion.markdown(many, "r16", "f")
    assert "10 most frequent" in top[0] and top[4] == "| c1 | c2 | 2 |"
    assert confusion.pairs({}, "r16", "f") == [] and confusion.markdown([], "r16", "f") == []


def test_the_route_report_says_when_no_candidate_passed_the_gates():
    """route.md said "Winner r16" although evaluate chose none (r16 was only its pick)."""
    from temper.reports.route import render
    from temper.results import RouteResult

    est = {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6}
    nothing = {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    result = RouteResult.model_validate(
        {
            "winner": "r16",
            "passed_gates": False,
            "oracle": True,
            "fitted_on": "validation",
            "target": "accuracy",
            "target_value": 0.9,
            "target_reached": False,
            "threshold": 1.0,
            "n_fit": 8,
            "n_test": 8,
            "tiers": ["self", "frontier"],
            "shares": {"self": 0.0, "frontier": 1.0},
            "share_estimates": {"self": est, "frontier": est},
            "accuracy": est,
            "self_only_accuracy": est,
            "kept_accuracy": nothing,
            "usd_per_1k": est,
            "all_api_usd_per_1k": {"frontier": 1.0},
            "self_usd_per_1k": 0.01,
            "self_latency_ms_p50": {"value": 7263.96, "ci_low": 7263.96, "ci_high": 7263.96},
            "self_latency_ms_p95": {"value": 7263.96, "ci_low": 7263.96, "ci_high": 7263.96},
            "prices": {"frontier": "gpt-6.1-sol"},
            "prices_verified": False,
            "prices_as_of": "2026-12",
            "curve_fit": [],
            "curve_test": [],
        }
    )
    text = render(result)
    assert "No candidate passed the gates" in text and "Winner `r16`" not in text
    assert "nan" not in text and "n/a (it kept none)" in text
    assert "7264 (no spread over resamples)" in text
    assert "Winner `r16`" in render(result.model_copy(update={"passed_gates": True}))
