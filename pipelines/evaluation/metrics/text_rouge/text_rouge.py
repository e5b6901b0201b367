"""ROUGE-1/2/L/Lsum (F-measure, Porter stemming) of free-text fields, computed offline.

An `evaluate.Metric` module of the project, loaded by path:

    metric = evaluate.load("pipelines/metrics/text_rouge")
    metric.compute(predictions=["90 days"], references=["ninety (90) days"])

Why not `evaluate.load("rouge")`: it fetches its script from the hub and fails offline (and
`mlflow.metrics.rougeL()` then silently returns nothing). This calls Google's `rouge-score`
package, the reference implementation, directly. A `None` prediction scores 0.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "ROUGE F-measures from rouge-score (stemming on), mean and per example."
_INPUTS = """
predictions: generated texts (None counts as the empty text: 0).
references: reference texts.
rouge_types: default rouge1, rouge2, rougeL, rougeLsum.
use_stemmer: default True.
return_per_example: also return the per-example F-measure lists under `<type>_scores`.
"""
ROUGE_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


class TextRouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries (2004)",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self, predictions, references, rouge_types=None, use_stemmer=True, return_per_example=False
    ):
        rouge_types = list(rouge_types or ROUGE_TYPES)
        scorer = rouge_scorer.RougeScorer(rouge_types, use_stemmer=use_stemmer)
        per = {t: [] for t in rouge_types}
        for pred, ref in zip(predictions, references, strict=True):
            scores = scorer.score(ref or "", pred or "")
            for t in rouge_types:
                per[t].append(scores[t].fmeasure)
        n = len(references)
        out = {t: (sum(v) / n if n else 0.0) for t, v in per.items()}
        if return_per_example:
            out.update({f"{t}_scores": v for t, v in per.items()})
        return out
