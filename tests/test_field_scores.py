"""Metrics per field kind: hand-computed values, an interval for each, typed answers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from temper.evaluation.field_scores import field_value, normalise_text
from temper.evaluation.metrics import Resamples
from temper.evaluation.metrics.fields import multilabel_f1
from temper.evaluation.scoring import answer_fields, metric_names, references_for, score_system
from temper.task import TaskConfig

FIELDS = [
    {"name": "tags", "kind": "label", "multi": True, "labels": ["x", "y", "z"], "gold": True},
    {"name": "note", "kind": "text", "gold": True, "nullable": True},
    {"name": "amount", "kind": "number", "tolerance": 0.5, "gold": True},
    {"name": "urgent", "kind": "boolean", "gold": True},
    {"name": "parties", "kind": "list", "gold": True},
]
TASK = TaskConfig(name="t", system_prompt="s", user_template="{text}", fields=FIELDS)
GOLD = [
    {
        "tags": ["x", "y"],
        "note": "The  Acme Corp.",
        "amount": 10,
        "urgent": True,
        "parties": ["Acme"],
    },
    {"tags": ["z"], "note": None, "amount": "2", "urgent": "no", "parties": ["Beta", "Gamma"]},
    {"tags": [], "note": "90 days", "amount": 1, "urgent": False, "parties": []},
    {"tags": ["y"], "note": "x", "amount": 5, "urgent": True, "parties": ["C"]},
]
ANSWERS = [
    '{"tags": ["y", "x"], "note": "acme corp", "amount": 10.4, "urgent": true, "parties": ["the acme"]}',
    '{"tags": ["z", "x"], "note": null, "amount": 2, "urgent": false, "parties": ["beta", "Delta"]}',
    '{"tags": [], "note": "ninety days", "amount": 3, "urgent": "no", "parties": []}',
    "no answer",
]


def scored():
    records = [{"id": str(i), "text": "t", "gold": g} for i, g in enumerate(GOLD)]
    preds = [{"new_tokens": 1, **answer_fields(TASK, a)} for a in ANSWERS]
    refs = references_for(TASK, records, None)
    rs = Resamples.draw(len(records), 400, seed=0)
    return score_system(TASK, records, preds, refs, rs, {})


def test_metrics_per_kind_by_hand():
    metrics, _, _ = scored()
    value = {k: m["value"] for k, m in metrics.items()}
    # Multi-label: sets {x,y}={x,y} yes; {z,x} vs {z} no; {} = {} yes; no answer vs {y} no.
    assert value["tags.accuracy"] == 0.5
    # micro: TP 2+1+0+0 = 3; predicted 2+2+0+0 = 4, gold 2+1+0+1 = 4 -> 2*3/8.
    assert value["tags.micro_f1"] == pytest.approx(6 / 8)
    # samples: 1, 2*1/3, 1 (both empty), 0.
    assert value["tags.sample_f1"] == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)
    # Text: exact after normalisation ("The  Acme Corp." == "acme corp"), over the 3 with gold.
    assert value["note.exact_match"] == pytest.approx(1 / 3)
    assert value["note.null_match"] == 0.75  # r3 answered nothing (null) where gold is "x"
    assert value["note.null_agreement"] == 1.0  # r1, the one null gold, answered null
    # Number: 10.4 vs 10 (within 0.5, not exact), 2 vs 2, 3 vs 1, none vs 5.
    assert value["amount.exact"] == 0.25 and value["amount.within_tolerance"] == 0.5
    # Boolean: right, right ("no" -> False), "no" is not a boolean: wrong, no answer.
    assert value["urgent.accuracy"] == 0.5
    # As a two-class label: true 1 of 2 found, never wrongly said (P 1, R 1/2, F1 2/3); false
    # the same: macro-F1 2/3.
    assert value["urgent.macro_f1"] == pytest.approx(2 / 3)
    # List set F1 on normalised items: {acme}/{acme} 1, {beta,delta}/{beta,gamma} 1/2,
    # {}/{} 1, none/{c} 0.
    assert value["parties.set_f1"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    names = [n for n in metric_names(TASK) if not n.startswith("latency")]  # none timed here
    assert set(names) <= set(metrics) and len(names) == 17
    for name in names:
        m = metrics[name]
        assert m["ci_low"] <= m["value"] <= m["ci_high"], name


def test_micro_f1_interval_is_a_paired_bootstrap_of_the_ratio():
    _, stats, ex = scored()
    point, boot = stats["tags.micro_f1"]
    assert boot.shape == (400,) and np.isfinite(boot).all()
    assert boot.min() < point < boot.max()  # the resamples move it


def test_multilabel_f1_matches_sklearn():
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c", "d"]
    gold = [[lab for lab in labels if rng.random() < 0.4] or ["a"] for _ in range(50)]
    pred = [[lab for lab in labels if rng.random() < 0.4] for _ in range(50)]
    out = multilabel_f1(predictions=pred, references=gold)

    def onehot(rows):
        return np.array([[lab in r for lab in labels] for r in rows], int)

    g, p = onehot(gold), onehot(pred)
    assert out["micro_f1"] == pytest.approx(f1_score(g, p, average="micro"))
    assert out["sample_f1"] == pytest.approx(f1_score(g, p, average="samples", zero_division=1))
    assert out["accuracy"] == pytest.approx((g == p).all(axis=1).mean())


def test_answers_are_read_by_type():
    fields = TASK.by_name
    pred = {"answer": {"amount": 3, "urgent": 1, "parties": ["a", 2], "tags": ["x"], "note": 5}}
    assert field_value(pred, fields["amount"]) == 3.0
    assert field_value(pred, fields["urgent"]) is None  # 1 is not a boolean
    assert field_value(pred, fields["parties"]) is None  # not all strings
    assert field_value(pred, fields["tags"]) == ["x"]
    assert field_value(pred, fields["note"]) is None
    assert field_value({"answer": {"amount": True}}, fields["amount"]) is None


def test_squad_normalisation():
    assert normalise_text("The  Acme, Corp.") == "acme corp"
    assert normalise_text("an Apple a day") == "apple day"


def test_corpus_level_metrics_are_paired_through_their_per_example_companion():
    from temper.evaluation.field_scores import paired_metric

    assert paired_metric("label.macro_f1") == "label.accuracy"
    assert paired_metric("labels.micro_f1") == "labels.sample_f1"
    assert paired_metric("clause_type.accuracy") == "clause_type.accuracy"
    assert paired_metric("latency_ms_mean") == "latency_ms_mean"
