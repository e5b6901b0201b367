"""Per-example scores of one answer field, by its kind (the metrics `metric_names` lists; the
point metrics are `metrics/fields.py`'s).

- label: `accuracy`, `accuracy_any` (any of `gold_all`), `macro_f1` and per-class P/R/F1;
  multi-label: `accuracy` (exact set), `micro_f1`, `sample_f1`;
- text: `exact_match` after SQuAD-style normalisation, ROUGE-1/2/L/Lsum;
- number: `exact` and `within_tolerance` (|answer - gold| <= the field's `tolerance`);
- boolean: `accuracy`, `macro_f1` and per-class P/R/F1 of `true` / `false` (a two-class label);
- list: `set_f1`, the per-example F1 of the normalised item sets;
- every nullable field but a single label: `null_match` (null exactly where gold is null, on
  every example) and `null_agreement` (null on the examples whose gold is null): the quality
  scores above cover only the examples with a gold value, so together they say both how well
  a key term is extracted where there is one and how rarely one is invented where there is not.

Scores that compare with a reference are averaged over the examples that have one (a mask);
a missing or mistyped answer is wrong, never an error. Every array here is per example, so
the bootstrap of `scoring.py` gives each metric its interval.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..task import TaskField
from .metrics.fields import label_metrics, multilabel_f1, text_rouge

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise_text(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, no punctuation, articles or extra whitespace.

    Written out (five lines) because `evaluate.load("squad")` fetches its script from the hub.
    """
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


# Corpus-level metrics (ratios over the whole set: macro-F1, micro-F1) have no score per
# example, and promote's paired comparison needs one: it compares such a primary metric
# through the per-example metric it summarises.
PER_EXAMPLE_COMPANION = {"macro_f1": "accuracy", "micro_f1": "sample_f1"}


def paired_metric(metric: str) -> str:
    """The per-example metric a paired comparison of `metric` uses (itself when it is one)."""
    field, _, name = metric.rpartition(".")
    companion = PER_EXAMPLE_COMPANION.get(name)
    return f"{field}.{companion}" if field and companion else metric


def field_value(pred: dict[str, Any], field: TaskField) -> Any:
    """The answer's value for a field when it has the field's type, else None (a wrong answer).

    label/text: a string; number: a float; boolean: a bool; list and multi-label: a list of
    strings.
    """
    answer = pred.get("answer")
    value = answer.get(field.name) if isinstance(answer, dict) else None
    if field.is_list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return list(value) if ok else None
    if field.kind == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if ok else None
    if field.kind == "boolean":
        return value if isinstance(value, bool) else None
    return value if isinstance(value, str) else None


@dataclass
class FieldScores:
    """What one field adds to a system's per-example scores."""

    scores: dict[str, np.ndarray] = field(default_factory=dict)  # per-example, averaged
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # examples a score averages over
    extra: dict[str, Any] = field(default_factory=dict)  # per-class tables, label pairs
    ratios: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # sum / sum


def metric_names(f: TaskField) -> list[str]:
    """The metrics (with intervals) one field gets."""
    if f.kind == "label" and not f.multi:
        names = ["accuracy", "accuracy_any", "macro_f1"]
    elif f.kind == "label":
        names = ["accuracy", "micro_f1", "sample_f1"]
    else:
        names = {
            "text": ["rouge1", "rouge2", "rougeL", "rougeLsum", "exact_match"],
            "number": ["exact", "within_tolerance"],
            "boolean": ["accuracy", "macro_f1"],
            "list": ["set_f1"],
        }[f.kind]
    if f.nullable and not (f.kind == "label" and not f.multi):
        names += ["null_match", "null_agreement"]
    return [f"{f.name}.{m}" for m in names]


def score_field(
    f: TaskField, records: list[dict[str, Any]], values: list[Any], refs: list[Any]
) -> FieldScores:
    """Per-example scores of one field: `values` are the answers (`field_value`), `refs` the
    references (gold or teacher), one per record."""
    if f.kind == "label" and not f.multi:
        # As before the field kinds: no null_match for single labels.
        return _score_single_label(f, records, values, refs)
    out = FieldScores()
    has_ref = np.array([g is not None for g in refs])
    if f.is_list:
        _score_list(out, f, values, refs, has_ref)
    elif f.kind == "text":
        _score_text(out, f, values, refs, has_ref)
    elif f.kind == "number":
        _score_number(out, f, values, refs, has_ref)
    else:
        _score_boolean(out, f, values, refs, has_ref)
    if f.nullable:
        _score_nulls(out, f, values, refs, has_ref)
    return out


def _add_masked(out: FieldScores, name: str, per: list[Any], has_ref: np.ndarray) -> None:
    """Add a score that compares with the reference, so it averages only where there is one."""
    out.scores[name] = np.array(per, float)
    out.masks[name] = has_ref


def _score_single_label(
    f: TaskField, records: list[dict[str, Any]], values: list[Any], refs: list[Any]
) -> FieldScores:
    """A single label: accuracy against the gold label and against any of `gold_all` (CUAD
    labels one span with several types), plus the per-class table macro-F1 comes from."""
    out = FieldScores()
    key = f"{f.name}."
    gold_all = [
        (r.get("gold_all") or {}).get(f.name) or [g] for r, g in zip(records, refs, strict=True)
    ]
    res = label_metrics(
        predictions=values,
        references=[str(g) for g in refs],
        references_all=gold_all,
        return_per_example=True,
    )
    out.scores[key + "accuracy"] = np.array(res["correct"], float)
    out.scores[key + "accuracy_any"] = np.array(res["correct_any"], float)
    out.extra[key + "per_class"] = res["per_class"]
    out.extra[key + "labels"] = (values, [str(g) for g in refs])
    return out


def _score_list(
    out: FieldScores, f: TaskField, values: list[Any], refs: list[Any], has_ref: np.ndarray
) -> None:
    """A list or a multi-label: per-example set F1; multi-labels also get the exact-set
    accuracy and micro-F1, kept as sums (a ratio over the whole set has no per-example value)."""
    key = f"{f.name}."
    norm = (lambda items: items) if f.kind == "label" else _normalise_items
    res = multilabel_f1(
        predictions=[norm(v or []) for v in values],
        references=[norm(g or []) for g in refs],
        return_per_example=True,
    )
    if f.kind == "label":
        _add_masked(out, key + "accuracy", res["exact"], has_ref)
        _add_masked(out, key + "sample_f1", res["f1"], has_ref)
        weight = has_ref.astype(float)
        tp, pooled = np.array(res["tp"], float), np.add(res["n_pred"], res["n_gold"])
        out.ratios[key + "micro_f1"] = (2 * tp * weight, pooled * weight)
    else:
        _add_masked(out, key + "set_f1", res["f1"], has_ref)


def _score_text(
    out: FieldScores, f: TaskField, values: list[Any], refs: list[Any], has_ref: np.ndarray
) -> None:
    """Free text: ROUGE for partial credit, exact match after SQuAD normalisation."""
    key = f"{f.name}."
    res = text_rouge(
        predictions=values,
        references=refs,
        return_per_example=True,
    )
    for rouge in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        _add_masked(out, key + rouge, res[f"{rouge}_scores"], has_ref)
    exact = [
        v is not None and g is not None and normalise_text(v) == normalise_text(g)
        for v, g in zip(values, refs, strict=True)
    ]
    _add_masked(out, key + "exact_match", exact, has_ref)


def _score_number(
    out: FieldScores, f: TaskField, values: list[Any], refs: list[Any], has_ref: np.ndarray
) -> None:
    """A number: exactly equal, and within the field's `tolerance` (a close value counts)."""
    key = f"{f.name}."
    pairs = list(zip(values, refs, strict=True))
    exact = [v is not None and g is not None and v == g for v, g in pairs]
    _add_masked(out, key + "exact", exact, has_ref)
    within = [v is not None and g is not None and abs(v - g) <= f.tolerance for v, g in pairs]
    _add_masked(out, key + "within_tolerance", within, has_ref)


def _score_boolean(
    out: FieldScores, f: TaskField, values: list[Any], refs: list[Any], has_ref: np.ndarray
) -> None:
    """A boolean, scored as a two-class label (its JSON spelling) so it gets P/R and F1."""
    key = f"{f.name}."
    correct = [v is not None and v == g for v, g in zip(values, refs, strict=True)]
    _add_masked(out, key + "accuracy", correct, has_ref)
    spelled = [json.dumps(v) if isinstance(v, bool) else "" for v in values]
    gold = [json.dumps(g) for g in refs]  # a null gold is the class "null"
    res = label_metrics(
        predictions=spelled,
        references=gold,
        references_all=[[g] for g in gold],
        return_per_example=True,
    )
    out.extra[key + "per_class"] = res["per_class"]
    out.extra[key + "labels"] = (spelled, gold)


def _score_nulls(
    out: FieldScores, f: TaskField, values: list[Any], refs: list[Any], has_ref: np.ndarray
) -> None:
    """A nullable field: the quality scores skip the examples whose gold is null, so these say
    how rarely a value is invented there: null exactly where gold is null (every example), and
    null on the examples whose gold is null (only those)."""
    key = f"{f.name}."
    out.scores[key + "null_match"] = np.array(
        [(v is None) == (g is None) for v, g in zip(values, refs, strict=True)], float
    )
    out.scores[key + "null_agreement"] = np.array([v is None for v in values], float)
    out.masks[key + "null_agreement"] = ~has_ref


def _normalise_items(items: list[str]) -> list[str]:
    """List items compared as normalised strings (empty ones dropped)."""
    return [n for n in (normalise_text(str(i)) for i in items) if n]
