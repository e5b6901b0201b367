"""The classical yardstick: TF-IDF (word 1-2 grams) + logistic regression per label-like field.

A fine-tuned LLM has to earn its place against the cheapest model that could do the job. For
every label-like field of the task (a label, a multi-label set — one-vs-rest, a boolean) this
trains scikit-learn's `TfidfVectorizer` +
`LogisticRegression` on the same distilled training records the candidates were trained on
(`data/distilled/train.jsonl`: the clause text and the teacher's label), predicts the same test
records the candidates answer, and hands back prediction rows in the shape the model's have, so
the same scoring, bootstrap and paired deltas apply. Its confidence is the classifier's
probability of the label it chose, so its calibration is reported beside the adapter's.

It trains in seconds (measured here: 3.4 s on 640 clauses, 21 s on the full split of 4,987) and is
cached in `evaluate.cache_dir` under a key of the training file's hash, the test texts, the
settings and the scikit-learn version.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ..io import read_json, read_jsonl, sha256_file, stable_hash, write_json
from ..task import TaskConfig
from .config import EvalError, EvaluateConfig

log = logging.getLogger(__name__)

# The settings of scripts/tfidf_baseline.py (sublinear tf, a weak penalty C=10; not tuned here)
# but min_df=1, which keeps the rare terms a 160-clause training set has; `max_iter` high
# enough that lbfgs converges on 38 classes.
SETTINGS: dict[str, Any] = {
    "ngram_range": [1, 2],
    "sublinear_tf": True,
    "min_df": 1,
    "C": 10.0,
    "max_iter": 3000,
}


def yardstick_fields(task: TaskConfig) -> list[str]:
    """The fields the yardstick predicts: every label, multi-label and boolean field."""
    return [f.name for f in task.fields if f.kind in ("label", "boolean")]


def _usable(value: Any, kind: str) -> bool:
    """Whether a teacher's answer can train the field's classifier (nulls and mistyped answers
    teach it nothing, so those records are left out for that field)."""
    if kind == "multi":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, bool) if kind == "boolean" else isinstance(value, str)


def training_pairs(path: Path, field: str, kind: str = "label") -> tuple[list[str], list[Any]]:
    """(texts, answers) of one field from distilled records (`text` and the teacher's
    `answer`); `kind` is label, multi or boolean (see `_usable`)."""
    texts, labels = [], []
    for lineno, rec in enumerate(read_jsonl(path), 1):
        if not isinstance(rec.get("text"), str):
            raise EvalError(f"{path}:{lineno}: missing field 'text'")
        answer = rec.get("answer")
        value = answer.get(field) if isinstance(answer, dict) else None
        if _usable(value, kind):
            texts.append(rec["text"])
            labels.append(value)
    return texts, labels


def _vectoriser() -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(
        ngram_range=tuple(SETTINGS["ngram_range"]),
        sublinear_tf=SETTINGS["sublinear_tf"],
        min_df=SETTINGS["min_df"],
    )


def fit_predict_sets(
    texts: list[str], sets: list[list[str]], test_texts: list[str]
) -> tuple[list[list[str]], list[float]]:
    """Multi-label: one logistic regression per label (one-vs-rest), a label kept at p >= 0.5.
    The confidence is that of the least certain label decision (min of max(p, 1 - p))."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MultiLabelBinarizer

    binarizer = MultiLabelBinarizer()
    y = binarizer.fit_transform(sets)
    if y.shape[1] == 0:  # the teacher never gave a label: the only answer seen is the empty set
        return [[] for _ in test_texts], [1.0] * len(test_texts)
    model = make_pipeline(
        _vectoriser(),
        OneVsRestClassifier(LogisticRegression(C=SETTINGS["C"], max_iter=SETTINGS["max_iter"])),
    )
    model.fit(texts, y)
    proba = model.predict_proba(test_texts)
    chosen = [
        [str(c) for c, p in zip(binarizer.classes_, row, strict=True) if p >= 0.5] for row in proba
    ]
    return chosen, [float(min(max(p, 1 - p) for p in row)) for row in proba]


def field_kind(task: TaskConfig, name: str) -> str:
    """label, multi or boolean: how the yardstick treats a field."""
    field = next(f for f in task.fields if f.name == name)
    return "multi" if field.multi else field.kind


def fit_predict(
    texts: list[str], labels: list[str], test_texts: list[str]
) -> tuple[list[str], list[float]]:
    """Labels and their probabilities for `test_texts` from a model fitted on (texts, labels)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    if len(set(labels)) < 2:  # logistic regression needs two classes: predict the only one
        return [labels[0]] * len(test_texts), [1.0] * len(test_texts)
    model = make_pipeline(
        _vectoriser(), LogisticRegression(C=SETTINGS["C"], max_iter=SETTINGS["max_iter"])
    )
    model.fit(texts, labels)
    proba = model.predict_proba(test_texts)
    classes = model.classes_
    best = proba.argmax(1)
    return [str(classes[i]) for i in best], [float(proba[k, i]) for k, i in enumerate(best)]


def classical_predictions(
    records: list[dict[str, Any]], task: TaskConfig, cfg: EvaluateConfig
) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """Prediction rows of the yardstick on `records` and what describes it (for
    `results.ClassicalEval`), or None when it cannot run (no label field, no training file)."""
    import sklearn

    fields = yardstick_fields(task)
    if not fields or cfg.classical_train is None:
        return None
    train = Path(cfg.classical_train)
    if not train.exists():
        log.warning("classical yardstick skipped: %s not found (evaluate.classical_train)", train)
        return None
    info: dict[str, Any] = {
        "fields": fields,
        "train_file": str(train),
        "train_sha256": sha256_file(train),
        "settings": {**SETTINGS, "sklearn": sklearn.__version__},
    }
    path = None
    if cfg.cache_dir:
        key = stable_hash({**info, "test": [[r["id"], r["text"]] for r in records], "format": 2})
        path = Path(cfg.cache_dir) / f"classical-{key}.json"
        if path.exists():
            hit = read_json(path)
            log.info("classical yardstick: reusing %s", path)
            return hit["preds"], {**hit["info"], "cached": True}
    t0 = time.perf_counter()
    answers: list[dict[str, Any]] = [{} for _ in records]
    confidences: list[dict[str, float]] = [{} for _ in records]
    n_train = 0
    test_texts = [r["text"] for r in records]
    for field in fields:
        kind = field_kind(task, field)
        texts, labels = training_pairs(train, field, kind)
        if not texts:
            log.warning("classical yardstick skipped: no %s labels in %s", field, train)
            return None
        n_train = max(n_train, len(texts))
        if kind == "multi":
            predicted, probs = fit_predict_sets(texts, labels, test_texts)
        elif kind == "boolean":  # a two-class label: fitted on its JSON spelling, read back
            spelled, probs = fit_predict(texts, [json.dumps(v) for v in labels], test_texts)
            predicted = [json.loads(v) for v in spelled]
        else:
            predicted, probs = fit_predict(texts, labels, test_texts)
        for k, (label, p) in enumerate(zip(predicted, probs, strict=True)):
            answers[k][field] = label
            confidences[k][field] = round(p, 6)
    seconds = time.perf_counter() - t0
    preds = [
        {
            "id": r["id"],
            "output": json.dumps(a, ensure_ascii=False),
            "answer": a,
            "json_ok": True,
            "valid": True,  # for its own fields; the other fields are not its job
            "problems": [],
            "confidence": c,
        }
        for r, a, c in zip(records, answers, confidences, strict=True)
    ]
    info.update(n_train=n_train, seconds=round(seconds, 2), cached=False)
    if path is not None:
        write_json(path, {"preds": preds, "info": info})
    log.info("classical yardstick: %d training records, %.1f s", n_train, seconds)
    return preds, info


def own_metrics(metrics: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    """The metrics of the yardstick's own fields (it answers nothing else)."""
    return {k: v for k, v in metrics.items() if k.split(".", 1)[0] in fields}
