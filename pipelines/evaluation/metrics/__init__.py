"""The project's metrics: the point metrics of a field (`fields.py`) and the bootstrap behind
the CIs.

Confidence intervals: a percentile bootstrap written here with numpy, vectorised. Why not
`scipy.stats.bootstrap`: every metric of every system must be resampled with the *same*
resamples so that candidate-minus-baseline differences are paired by construction, and
ratio metrics (macro-F1, per-class precision/recall, ROUGE over the examples that have a
reference) are functions of per-class counts, which a (B, n) matrix of resample counts turns
into a few matrix products. scipy would redraw per call and call the statistic per resample
slice; its BCa variant also needs a jackknife (n extra evaluations) per metric. One draw of
indices, `Resamples`, serves every metric here, seeded and deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...stats import percentile


@dataclass
class Resamples:
    """B bootstrap resamples of n examples: indices (B, n) and counts (B, n)."""

    idx: np.ndarray
    counts: np.ndarray
    confidence: float

    @classmethod
    def draw(
        cls, n: int, n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95
    ) -> Resamples:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(n_resamples, n)) if n else np.zeros((n_resamples, 0), int)
        counts = np.zeros((n_resamples, n), dtype=np.float64)
        np.add.at(counts, (np.arange(n_resamples)[:, None], idx), 1.0)
        return cls(idx, counts, confidence)

    def interval(self, stats: np.ndarray) -> tuple[float, float]:
        """Percentile interval of resampled statistics (NaNs, e.g. empty classes, ignored)."""
        alpha = (1 - self.confidence) / 2
        stats = stats[~np.isnan(stats)]
        if stats.size == 0:
            return float("nan"), float("nan")
        low, high = np.quantile(stats, [alpha, 1 - alpha])
        return float(low), float(high)


def estimate(point: float, stats: np.ndarray, rs: Resamples) -> dict[str, float]:
    low, high = rs.interval(stats)
    return {"value": float(point), "ci_low": low, "ci_high": high}


def mean_stats(values: np.ndarray, rs: Resamples, mask: np.ndarray | None = None) -> np.ndarray:
    """Resampled means of per-example values (over the examples in `mask` when given)."""
    values = np.asarray(values, dtype=np.float64)
    if mask is None:
        return rs.counts @ values / max(values.size, 1)
    mask = np.asarray(mask, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rs.counts @ (values * mask)) / (rs.counts @ mask)


def ratio_stats(
    num: np.ndarray, den: np.ndarray, rs: Resamples, empty: float = 1.0
) -> tuple[float, np.ndarray]:
    """A ratio of per-example sums (micro-F1: 2 TP / (predicted + gold)): point and resamples.

    `empty` is the value where the denominator is 0 (nothing predicted, nothing to predict).
    """
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    top, bottom = rs.counts @ num, rs.counts @ den
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = np.where(bottom > 0, top / np.maximum(bottom, 1e-12), empty)
    return (float(num.sum() / den.sum()) if den.sum() > 0 else empty), boot


def masked_mean(values: np.ndarray, mask: np.ndarray | None = None) -> float:
    values = np.asarray(values, dtype=np.float64)
    if mask is None:
        return float(values.mean()) if values.size else float("nan")
    mask = np.asarray(mask, dtype=bool)
    return float(values[mask].mean()) if mask.any() else float("nan")


def percentile_stats(values: np.ndarray, q: float, rs: Resamples) -> np.ndarray:
    """Resampled q-th percentiles (e.g. p95 latency), as `stats.percentile` defines them."""
    values = np.asarray(values, dtype=np.float64)
    return percentile(values[rs.idx], q, axis=1)


def class_counts(
    pred: list[str | None], gold: list[str], classes: list[str], weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted true positives, predicted and gold counts per class: each (rows, C)."""
    index = {c: i for i, c in enumerate(classes)}
    n, k = len(gold), len(classes)
    gold_1h = np.zeros((n, k))
    pred_1h = np.zeros((n, k))
    for i, (p, g) in enumerate(zip(pred, gold, strict=True)):
        if g in index:
            gold_1h[i, index[g]] = 1
        if p in index:
            pred_1h[i, index[p]] = 1
    tp = weights @ (gold_1h * pred_1h)
    return tp, weights @ pred_1h, weights @ gold_1h


def f1_precision_recall(
    tp: np.ndarray, n_pred: np.ndarray, n_gold: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class F1, precision, recall from counts; NaN where a class is absent (recall)
    or never predicted (precision: 0, as sklearn's zero_division=0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(n_pred > 0, tp / np.maximum(n_pred, 1e-12), 0.0)
        recall = np.where(n_gold > 0, tp / np.maximum(n_gold, 1e-12), np.nan)
        f1 = np.where(n_gold > 0, 2 * tp / np.maximum(n_pred + n_gold, 1e-12), np.nan)
    return f1, precision, recall


def macro_f1_stats(
    pred: list[str | None], gold: list[str], rs: Resamples
) -> tuple[float, np.ndarray]:
    """Macro-F1 over the classes present in the gold labels: point value and resamples.

    A class missing from one resample is left out of that resample's average (NaN-mean).
    """
    classes = sorted(set(gold))
    ones = np.ones((1, len(gold)))
    point = f1_precision_recall(*class_counts(pred, gold, classes, ones))[0]
    boot = f1_precision_recall(*class_counts(pred, gold, classes, rs.counts))[0]
    with np.errstate(invalid="ignore"):
        return float(np.nanmean(point)), np.nanmean(boot, axis=1)
