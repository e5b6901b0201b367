"""The one definition of a percentile that every floor shares (latency p50/p95 of the
teacher's calls in distil, of the answers in evaluate, of the self tier in route).

Nearest rank (numpy's `inverted_cdf`): a p95 is a latency that was observed, never a value
interpolated between two; NaN (a request with no timing) is left out.
"""

from __future__ import annotations

import numpy as np

METHOD = "inverted_cdf"


def percentile(values: np.ndarray | list[float], q: float, axis: int | None = None) -> np.ndarray:
    """The q-th percentile of `values` (along `axis`), NaN ignored."""
    return np.nanpercentile(np.asarray(values, dtype=np.float64), q, axis=axis, method=METHOD)
