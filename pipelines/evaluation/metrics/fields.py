"""The point metrics of one task field over a set: labels, sets of items, and ROUGE.

Plain functions over lists, each with its per-example values on request: the bootstrap in
`metrics/__init__.py` resamples those. They used to be `evaluate.Metric` modules loaded by
path; `import evaluate` alone took 6.3 s of every evaluate stage's 24 s (it imports
transformers' pipelines), to wrap the same few lines around scikit-learn and rouge-score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def label_metrics(
    predictions: Sequence[str | None],
    references: Sequence[str],
    references_all: Sequence[Sequence[str] | None] | None = None,
    return_per_example: bool = False,
) -> dict[str, Any]:
    """Accuracy (exact and any-of-gold), macro-F1 and per-class precision/recall/F1.

    `None` or "" (no answer), or any value outside the label set, is a wrong answer, never an
    error. Macro-F1 averages over the classes that occur in the references, so a class the
    model invents does not dilute it (the same rule as the bootstrap's `macro_f1_stats`).
    `references_all`: every acceptable gold label of each example (CUAD labels one span with
    several types); an example counts for `accuracy_any` when its prediction is any of them.
    """
    from sklearn.metrics import precision_recall_fscore_support

    if references_all is None:
        references_all = [[r] for r in references]
    if len(references_all) != len(references):
        raise ValueError("references_all must have one list per reference")
    answers = [p or None for p in predictions]
    pairs = list(zip(answers, references, references_all, strict=True))
    correct = [int(p is not None and p == r) for p, r, _ in pairs]
    correct_any = [int(p is not None and (p == r or p in (alls or []))) for p, r, alls in pairs]
    classes = sorted(set(references))
    # None becomes a marker no reference can equal, so it counts as a wrong prediction.
    marked = ["\u0000none" if p is None else p for p in answers]
    precision, recall, f1, support = precision_recall_fscore_support(
        list(references), marked, labels=classes, zero_division=0
    )
    n = len(references)
    out: dict[str, Any] = {
        "accuracy": sum(correct) / n if n else 0.0,
        "accuracy_any": sum(correct_any) / n if n else 0.0,
        "macro_f1": float(f1.mean()) if classes else 0.0,
        "per_class": {
            c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
        },
    }
    if return_per_example:
        out.update(correct=correct, correct_any=correct_any)
    return out


def multilabel_f1(
    predictions: Sequence[Sequence[str] | None],
    references: Sequence[Sequence[str] | None],
    return_per_example: bool = False,
) -> dict[str, Any]:
    """Exact-set accuracy, micro-F1 and sample-F1 of set-valued answers.

    Each answer is compared as a set (order and repeats do not count). `micro_f1` is the F1 of
    the pooled items, 2 TP / (predicted + gold items); `sample_f1` the mean per-example F1,
    where an empty gold set and an empty prediction score 1 (sklearn's
    `f1_score(average="samples", zero_division=1)`). The per-example counts (`tp`, `n_pred`,
    `n_gold`) let the bootstrap resample micro-F1 as a ratio of sums.
    """
    exact, f1, tp, n_pred, n_gold = [], [], [], [], []
    for pred, ref in zip(predictions, references, strict=True):
        p, g = set(pred or []), set(ref or [])
        hits = len(p & g)
        exact.append(int(p == g))
        f1.append(1.0 if not p and not g else 2 * hits / (len(p) + len(g)))
        tp.append(hits)
        n_pred.append(len(p))
        n_gold.append(len(g))
    n = len(references)
    pooled = sum(n_pred) + sum(n_gold)
    out: dict[str, Any] = {
        "accuracy": sum(exact) / n if n else 0.0,
        "micro_f1": 2 * sum(tp) / pooled if pooled else 1.0,
        "sample_f1": sum(f1) / n if n else 0.0,
    }
    if return_per_example:
        out.update(exact=exact, f1=f1, tp=tp, n_pred=n_pred, n_gold=n_gold)
    return out


def text_rouge(
    predictions: Sequence[str | None],
    references: Sequence[str | None],
    rouge_types: Sequence[str] = ROUGE_TYPES,
    use_stemmer: bool = True,
    return_per_example: bool = False,
) -> dict[str, Any]:
    """ROUGE F-measures (Porter stemming) from Google's `rouge-score`, the reference
    implementation, mean and per example (`<type>_scores`). A `None` prediction scores 0.
    (`evaluate.load("rouge")` fetches its script from the hub and fails offline, and
    `mlflow.metrics.rougeL()` then silently returns nothing.)"""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    per: dict[str, list[float]] = {t: [] for t in rouge_types}
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref or "", pred or "")
        for t in rouge_types:
            per[t].append(scores[t].fmeasure)
    n = len(references)
    out: dict[str, Any] = {t: (sum(v) / n if n else 0.0) for t, v in per.items()}
    if return_per_example:
        out.update({f"{t}_scores": v for t, v in per.items()})
    return out
