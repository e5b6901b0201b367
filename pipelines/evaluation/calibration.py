"""Calibration of label confidences: expected calibration error, reliability, coverage.

A router defers the answers a model is unsure of, so the confidence has to mean what it says.
For each label field and each system whose predictions carry confidences
(`prediction["confidence"][field]`, see `confidence.py` and `classical.py`):

- `<field>.ece`: expected calibration error over `BINS` equal-width confidence bins, the
  support-weighted mean of |accuracy - mean confidence| per bin (Guo et al., 2017);
- `<field>.mean_confidence`: the average confidence (against `accuracy`: over- or under-);
- `<field>.accuracy_at_coverage_<p>`: the accuracy of the `p`% most confident answers
  (ties broken by input order), for p in `COVERAGES`: what a router that defers the rest
  would serve.

An answer without a confidence (no JSON, a null label) counts as confidence 0: it is the
first to be deferred. Written out (thirty lines) rather than taken from a library:
scikit-learn's `calibration_curve` gives the bins but neither ECE nor coverage.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BINS = 10
COVERAGES = (50, 70, 90)


def confidences(preds: list[dict[str, Any]], field: str) -> np.ndarray | None:
    """Each prediction's confidence for `field` (0 where it has none); None: the system
    records no confidences at all (an API baseline)."""
    if not any("confidence" in p for p in preds):
        return None
    values = [(p.get("confidence") or {}).get(field) for p in preds]
    return np.array([v if v is not None else 0.0 for v in values], float)


def reliability(conf: np.ndarray, correct: np.ndarray) -> list[dict[str, float]]:
    """Per non-empty bin: its range, count, mean confidence and accuracy."""
    edges = np.linspace(0, 1, BINS + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, BINS - 1)
    rows = []
    for b in range(BINS):
        inside = which == b
        if inside.any():
            rows.append(
                {
                    "low": float(edges[b]),
                    "high": float(edges[b + 1]),
                    "n": int(inside.sum()),
                    "confidence": float(conf[inside].mean()),
                    "accuracy": float(correct[inside].mean()),
                }
            )
    return rows


def calibration_metrics(conf: np.ndarray, correct: np.ndarray, field: str) -> dict[str, Any]:
    """ECE, mean confidence and accuracy at coverage of one field, as `{"value": x}` metrics."""
    bins = reliability(conf, correct)
    n = len(conf)
    ece = sum(b["n"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins) if n else None
    out = {
        f"{field}.ece": {"value": ece},
        f"{field}.mean_confidence": {"value": float(conf.mean()) if n else None},
    }
    order = np.argsort(-conf, kind="stable")  # most confident first; ties: input order
    for p in COVERAGES:
        k = max(1, int(round(n * p / 100))) if n else 0
        value = float(correct[order[:k]].mean()) if k else None
        out[f"{field}.accuracy_at_coverage_{p}"] = {"value": value}
    return out


def system_calibration(
    preds: list[dict[str, Any]], correct: dict[str, np.ndarray], fields: list[str]
) -> tuple[dict[str, Any], dict[str, list[dict[str, float]]]]:
    """(metrics, reliability bins per field) of one system; empty when it has no confidences."""
    metrics: dict[str, Any] = {}
    bins: dict[str, list[dict[str, float]]] = {}
    for field in fields:
        conf = confidences(preds, field)
        if conf is None or f"{field}.accuracy" not in correct:
            continue
        hits = correct[f"{field}.accuracy"]
        metrics.update(calibration_metrics(conf, hits, field))
        bins[field] = reliability(conf, hits)
    return metrics, bins
