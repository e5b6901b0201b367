"""Label metrics for one task field: exact and any-of-gold accuracy, macro-F1, per-class P/R/F1.

An `evaluate.Metric` module of the project, loaded offline by path:

    metric = evaluate.load("pipelines/metrics/label_metrics")
    metric.compute(predictions=["A", None], references=["A", "B"],
                   references_all=[["A"], ["B", "C"]])

`None` or "" (no answer), or any value outside the label set, is a wrong answer, never an
error. Macro-F1
averages over the classes that occur in the references, so a class the model invents does
not dilute it (the same rule as the project's bootstrap in `pipelines/metrics/__init__.py`).
"""

import datasets
import evaluate
from sklearn.metrics import precision_recall_fscore_support

_DESCRIPTION = "Accuracy (exact and any-of-gold), macro-F1 and per-class precision/recall."
_INPUTS = """
predictions: predicted labels (str, or None for an unparseable answer).
references: the gold label of each example.
references_all: optional, every acceptable gold label of each example (multi-label records);
    an example counts for `accuracy_any` when its prediction is any of them.
return_per_example: also return the 0/1 `correct` and `correct_any` lists.
"""


class LabelMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, references_all=None, return_per_example=False):
        if references_all is None:
            references_all = [[r] for r in references]
        if len(references_all) != len(references):
            raise ValueError("references_all must have one list per reference")
        predictions = [p or None for p in predictions]
        correct = [
            int(p is not None and p == r) for p, r in zip(predictions, references, strict=True)
        ]
        correct_any = [
            int(p is not None and (p == r or p in (alls or [])))
            for p, r, alls in zip(predictions, references, references_all, strict=True)
        ]
        classes = sorted(set(references))
        # None becomes a marker no reference can equal, so it counts as a wrong prediction.
        preds = ["\u0000none" if p is None else p for p in predictions]
        precision, recall, f1, support = precision_recall_fscore_support(
            references, preds, labels=classes, zero_division=0
        )
        n = len(references)
        out = {
            "accuracy": sum(correct) / n if n else 0.0,
            "accuracy_any": sum(correct_any) / n if n else 0.0,
            "macro_f1": float(f1.mean()) if classes else 0.0,
            "per_class": {
                c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                for c, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
            },
        }
        if return_per_example:
            out["correct"] = correct
            out["correct_any"] = correct_any
        return out
