"""The classical yardstick, label confidences' calibration, and the gate against the yardstick
(fast: scikit-learn on a handful of clauses, no language model)."""

from __future__ import annotations

import numpy as np
import pytest

from temper.evaluation.calibration import calibration_metrics, confidences, system_calibration
from temper.evaluation.classical import classical_predictions, training_pairs
from temper.evaluation.config import EvalError, EvaluateConfig
from temper.evaluation.gates import GatesConfig, check
from temper.io import write_jsonl
from temper.results import CandidateEval, Estimate

GOVERNING = "This Agreement shall be governed by the laws of the State of {}."
INSURANCE = "The Supplier shall maintain insurance coverage of at least {} dollars."


def distilled(path, n: int = 6) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append(
            {"text": GOVERNING.format(f"State{i}"), "answer": {"clause_type": "Governing Law"}}
        )
        rows.append({"text": INSURANCE.format(i * 1000), "answer": {"clause_type": "Insurance"}})
    rows.append({"text": "unlabelled", "answer": None})  # a record the teacher failed on
    write_jsonl(path, rows)
    return rows


def test_calibration_by_hand():
    conf = np.array([0.9, 0.8, 0.6, 0.3])
    correct = np.array([1.0, 1.0, 0.0, 0.0])
    m = calibration_metrics(conf, correct, "f")
    # One answer per bin: ECE = mean |accuracy - confidence| = (0.1 + 0.2 + 0.6 + 0.3) / 4.
    assert m["f.ece"]["value"] == pytest.approx(0.3)
    assert m["f.mean_confidence"]["value"] == pytest.approx(0.65)
    assert m["f.accuracy_at_coverage_50"]["value"] == 1.0  # the 2 most confident
    assert m["f.accuracy_at_coverage_70"]["value"] == pytest.approx(2 / 3)  # round(2.8) = 3
    assert m["f.accuracy_at_coverage_90"]["value"] == 0.5  # all 4
    # Perfect calibration: confidence 1 on the right answers, 0 on the wrong ones.
    assert calibration_metrics(correct, correct, "f")["f.ece"]["value"] == 0.0


def test_answers_without_confidence_are_deferred_first_and_api_answers_have_none():
    preds = [{"confidence": {"f": 0.7}}, {"confidence": {"f": None}}, {"confidence": None}]
    assert confidences(preds, "f").tolist() == [0.7, 0.0, 0.0]
    assert confidences([{"output": "x"}], "f") is None
    metrics, bins = system_calibration([{"output": "x"}], {"f.accuracy": np.ones(1)}, ["f"])
    assert metrics == {} and bins == {}


def test_yardstick_learns_from_the_distilled_records_and_is_cached(tmp_path, task):
    train = tmp_path / "train.jsonl"
    distilled(train)
    texts, labels = training_pairs(train, "clause_type")
    assert len(texts) == 12 and set(labels) == {"Governing Law", "Insurance"}  # 1 unlabelled
    records = [
        {"id": "a", "text": GOVERNING.format("New York")},
        {"id": "b", "text": INSURANCE.format(5)},
    ]
    cfg = EvaluateConfig(classical_train=str(train), cache_dir=str(tmp_path / "cache"))
    preds, info = classical_predictions(records, task, cfg)
    assert [p["answer"]["clause_type"] for p in preds] == ["Governing Law", "Insurance"]
    assert all(0.5 < p["confidence"]["clause_type"] <= 1 for p in preds)
    assert info["n_train"] == 12 and info["cached"] is False and info["fields"] == ["clause_type"]
    again, info2 = classical_predictions(records, task, cfg)
    assert again == preds and info2["cached"] is True
    # Another training file is another yardstick: not served from the cache.
    distilled(train, n=7)
    _, info3 = classical_predictions(records, task, cfg)
    assert info3["cached"] is False and info3["n_train"] == 14


def test_yardstick_off_or_missing_file_and_bad_records(tmp_path, task):
    records = [{"id": "a", "text": "x"}]
    assert classical_predictions(records, task, EvaluateConfig(classical_train=None)) is None
    missing = EvaluateConfig(classical_train=str(tmp_path / "nope.jsonl"), cache_dir=None)
    assert classical_predictions(records, task, missing) is None
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"answer": {"clause_type": "Insurance"}}])
    with pytest.raises(EvalError, match=r"bad.jsonl:1: missing field 'text'"):
        classical_predictions(records, task, EvaluateConfig(classical_train=str(bad)))


def test_gate_against_the_yardstick():
    def entry(low: float | None) -> CandidateEval:
        est = {"clause_type.accuracy": Estimate(value=0.7, ci_low=0.6, ci_high=0.8)}
        delta = None if low is None else {"clause_type.accuracy": Estimate(value=0.0, ci_low=low)}
        return CandidateEval(adapter="a", seconds=1, metrics=est, delta_vs_classical=delta)

    cfg = GatesConfig(
        min_delta_low=None, min_json_valid_rate=None, min_delta_vs_classical_low=-0.05
    )
    gate = lambda e: next(  # noqa: E731
        c for c in check(cfg, "clause_type.accuracy", e).checks if "classical" in c.gate
    )
    assert gate(entry(-0.04)).passed and not gate(entry(-0.06)).passed
    assert not gate(entry(None)).passed and "cannot pass" in gate(entry(None)).note
    off = check(GatesConfig(min_delta_low=None), "clause_type.accuracy", entry(-0.5))
    assert all("classical" not in c.gate for c in off.checks)
