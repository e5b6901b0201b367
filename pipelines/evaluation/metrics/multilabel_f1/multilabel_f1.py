"""Set metrics of list answers (multi-label and list fields): exact set, micro-F1, sample-F1.

An `evaluate.Metric` module of the project, loaded offline by path:

    metric = evaluate.load("pipelines/evaluation/metrics/multilabel_f1")
    metric.compute(predictions=[["A", "B"], []], references=[["A"], ["C"]])

Each answer is compared as a set (order and repeats do not count). `accuracy`: the share of
examples whose predicted set equals the gold set; `micro_f1`: F1 of the pooled items,
2 TP / (predicted + gold items); `sample_f1`: the mean of the per-example F1, where an example
with an empty gold set and an empty prediction scores 1 (it is right), as sklearn's
`f1_score(average="samples", zero_division=1)`. The per-example counts (`tp`, `n_pred`,
`n_gold`) let the project's bootstrap resample micro-F1 as a ratio of sums.
"""

import datasets
import evaluate

_DESCRIPTION = "Exact-set accuracy, micro-F1 and sample-F1 of set-valued answers."
_INPUTS = """
predictions: predicted item lists (an empty list for no answer).
references: gold item lists.
return_per_example: also return the per-example `exact`, `f1`, `tp`, `n_pred`, `n_gold` lists.
"""


class MultilabelF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references, return_per_example=False):
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
        out = {
            "accuracy": sum(exact) / n if n else 0.0,
            "micro_f1": 2 * sum(tp) / pooled if pooled else 1.0,
            "sample_f1": sum(f1) / n if n else 0.0,
        }
        if return_per_example:
            out.update(exact=exact, f1=f1, tp=tp, n_pred=n_pred, n_gold=n_gold)
        return out
