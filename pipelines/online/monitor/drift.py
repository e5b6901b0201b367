"""Input and output drift: two-sample tests of a production window against a reference.

Pure functions, arrays in and a `DriftTest` out. Input drift compares sentence embeddings
(all-MiniLM-L6-v2, unit rows) with a kernel MMD permutation test and a classifier two-sample
test; output drift compares the predicted label mix (chi-square) and the confidence
distribution (Kolmogorov-Smirnov) with the evaluated answers'. Clauses of one contract are
alike, so the input tests take the reference's contracts (`reference_groups`) to ask "is this
window unlike new contracts of the reference's kind?" rather than "unlike these contracts?"
(see `input_drift`). A window of a few contracts' clauses is still a shift, and may alarm.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats
from scipy.optimize import minimize
from scipy.special import expit
from threadpoolctl import threadpool_limits

# The classifier test subsamples the reference to this many times the window's size. 1 keeps
# the classes balanced, so the held-out folds split evenly and no class weighting is needed
# (the AUC itself does not depend on the balance).
REFERENCE_FACTOR = 1
# Inverse L2 strength of the logistic regression on standardised features. The classifier
# sees ~2 * window rows in 384 dimensions, more dimensions than rows, so it needs a strong
# penalty to generalise to the held-out fold at all.
CLASSIFIER_C = 0.01
MIN_EXPECTED = 5  # chi-square: categories expected fewer times than this are pooled


@dataclass(frozen=True)
class DriftTest:
    """One two-sample test of a window against the reference."""

    name: str  # "input_mmd", "input_classifier", "output_labels", "output_confidence"
    statistic: float
    p_value: float
    alarm: bool  # p_value < the alpha it was run with (in `detail["alpha"]`)
    n_reference: int
    n_window: int
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON types (numpy scalars and arrays converted, NaN as null)."""
        return _plain(asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN
    return value


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _rows(name: str, a: Any, min_rows: int) -> np.ndarray:
    x = np.asarray(a, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows x dims), got shape {x.shape}")
    if len(x) < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {len(x)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} has NaN or infinite values")
    return x


def _prepare(
    reference: Any, window: Any, groups: Sequence[Any] | None, min_rows: int, keep: int, rng: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Checked arrays, the reference subsampled (seeded) to `keep` rows with its groups."""
    x, y = _rows("reference", reference, min_rows), _rows("window", window, min_rows)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"reference has {x.shape[1]} dims but window has {y.shape[1]}")
    g = None
    if groups is not None:
        g = np.asarray([str(v) for v in groups])
        if len(g) != len(x):
            raise ValueError(f"reference_groups has {len(g)} labels for {len(x)} rows")
        if len(set(g)) < 2:
            raise ValueError("reference_groups needs at least two groups")
    if len(x) > keep:
        idx = np.sort(rng.choice(len(x), size=keep, replace=False))
        x, g = x[idx], (g[idx] if g is not None else None)
    if g is not None and len(x) < 2 * len(y):
        raise ValueError(f"a grouped null needs >= 2 x the window's {len(y)} reference rows")
    return x, y, g


def _group_splits(
    groups: np.ndarray, m: int, draws: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """`draws` group-disjoint splits of the reference, like a window of new contracts.

    Each holds out random groups until they have >= m rows; the pseudo-window is m of those
    rows, the pseudo-reference every row of the other groups. Returns (pseudo-reference mask
    (draws, n), pseudo-window rows (draws, m)).
    """
    codes = np.unique(groups, return_inverse=True)[1]
    sizes = np.bincount(codes)
    keep = np.ones((draws, len(groups)), dtype=bool)
    win = np.empty((draws, m), dtype=np.int64)
    for k in range(draws):
        order = rng.permutation(len(sizes))
        held = order[: int(np.searchsorted(np.cumsum(sizes[order]), m)) + 1]
        pool = np.flatnonzero(np.isin(codes, held))
        keep[k, pool] = False
        win[k] = rng.choice(pool, size=m, replace=False)
    return keep, win


def _rbf(z: np.ndarray) -> tuple[np.ndarray, float]:
    """RBF kernel matrix of the rows, bandwidth the median pairwise distance."""
    sq = np.einsum("ij,ij->i", z, z)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0)
    np.fill_diagonal(d2, 0.0)
    off = d2[np.triu_indices(len(z), k=1)]
    med2 = float(np.median(off))
    if med2 <= 0:  # mostly duplicate rows: any positive scale will do
        med2 = float(off[off > 0].mean()) if (off > 0).any() else 1.0
    return np.exp(-d2 / (2.0 * med2)), math.sqrt(med2)  # diagonal exactly 1


def _mmd2(kernel: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Unbiased MMD^2 of each column pair of 0/1 row indicators (two matrix products)."""
    na, nb = a.sum(axis=0), b.sum(axis=0)
    kb = kernel @ b
    xx = np.einsum("ip,ip->p", a, kernel @ a) - na  # less the diagonal, which is 1
    yy = np.einsum("ip,ip->p", b, kb) - nb
    xy = np.einsum("ip,ip->p", a, kb)
    return xx / (na * (na - 1)) + yy / (nb * (nb - 1)) - 2.0 * xy / (na * nb)


def _p_value(null: np.ndarray, observed: float) -> float:
    # A null draw equal to the observed statistic must count as ">=" despite rounding.
    hits = int(np.sum(null >= observed - 1e-12 * max(1.0, abs(observed))))
    return (1 + hits) / (1 + len(null))


def mmd_test(
    reference: np.ndarray,
    window: np.ndarray,
    *,
    alpha: float = 0.01,
    permutations: int = 500,
    seed: int = 0,
    max_reference: int = 1000,
    reference_groups: Sequence[Any] | None = None,
) -> DriftTest:
    """Unbiased MMD^2 with an RBF kernel, and a permutation p-value ((1 + #null >= obs) / (1 + B)).

    The bandwidth is the median pairwise distance of the pooled sample (a function of the
    pooled set only, so the permutation test stays exact). Without groups the null relabels
    rows; with `reference_groups` (e.g. contract ids) it is B group-disjoint splits of the
    reference (see `input_drift`). Cost: O((n + m)^2 * B) in matrix products.
    """
    _check_alpha(alpha)
    if permutations < 1:
        raise ValueError(f"permutations must be >= 1, got {permutations}")
    rng = np.random.default_rng(seed)
    x, y, g = _prepare(reference, window, reference_groups, 2, max(max_reference, 2), rng)
    n, m = len(x), len(y)
    kernel, bandwidth = _rbf(np.vstack([x, y]))
    is_ref = np.r_[np.ones(n), np.zeros(m)][:, None]
    observed = float(_mmd2(kernel, is_ref, 1.0 - is_ref)[0])
    if g is None:  # uniform random relabellings of the pooled rows
        a = np.zeros((permutations, n + m))
        picks = np.argsort(rng.random((permutations, n + m)), axis=1)[:, :n]
        np.put_along_axis(a, picks, 1.0, axis=1)
        null = _mmd2(kernel, a.T, 1.0 - a.T)
    else:
        keep, win = _group_splits(g, m, permutations, rng)
        b = np.zeros((permutations, n))
        np.put_along_axis(b, win, 1.0, axis=1)
        null = _mmd2(kernel[:n, :n], keep.T.astype(np.float64), b.T)
    p = _p_value(null, observed)
    detail = {"alpha": alpha, "bandwidth": bandwidth, "permutations": permutations}
    detail |= {"null": "rows" if g is None else "groups", "null_mean": float(null.mean())}
    detail |= {"null_max": float(null.max()), "seed": seed}
    return DriftTest("input_mmd", observed, p, p < alpha, n, m, detail)


def _logistic_scores(train: np.ndarray, labels: np.ndarray, test: np.ndarray) -> np.ndarray:
    """L2 logistic regression (C = CLASSIFIER_C) on standardised features: test log-odds.

    Fitted with scipy's L-BFGS directly: a few ms a fit, where the grouped null needs
    thousands of fits.
    """
    mu, sd = train.mean(axis=0), train.std(axis=0) + 1e-12
    xs, ts = (train - mu) / sd, (test - mu) / sd
    sign = 2.0 * labels - 1.0

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        margin = sign * (xs @ theta[:-1] + theta[-1])
        g = -CLASSIFIER_C * sign * expit(-margin)
        value = CLASSIFIER_C * np.logaddexp(0.0, -margin).sum() + 0.5 * theta[:-1] @ theta[:-1]
        return value, np.r_[xs.T @ g + theta[:-1], g.sum()]

    theta = minimize(loss, np.zeros(xs.shape[1] + 1), jac=True, method="L-BFGS-B").x
    return ts @ theta[:-1] + theta[-1]


def _cv_auc(
    ref: np.ndarray, win: np.ndarray, folds: int, rng: np.random.Generator
) -> tuple[float, list[float], list[float]]:
    """Out-of-fold AUC (window = positive), and each fold's one-sided Mann-Whitney p and AUC."""
    feats = np.vstack([ref, win])
    labels = np.r_[np.zeros(len(ref)), np.ones(len(win))]
    fold = np.empty(len(labels), dtype=np.int64)
    for cls in (0.0, 1.0):  # stratified: each fold holds its share of both classes
        rows = np.flatnonzero(labels == cls)
        fold[rng.permutation(rows)] = np.arange(len(rows)) % folds
    scores = np.empty(len(labels))
    fold_p, fold_auc = [], []
    for f in range(folds):
        test = fold == f
        s = _logistic_scores(feats[~test], labels[~test], feats[test])
        scores[test] = s
        pos, neg = s[labels[test] == 1], s[labels[test] == 0]
        res = stats.mannwhitneyu(pos, neg, alternative="greater")
        fold_p.append(float(res.pvalue))
        fold_auc.append(float(res.statistic) / (len(pos) * len(neg)))  # AUC = U / (n1 n0)
    u = stats.mannwhitneyu(scores[labels == 1], scores[labels == 0]).statistic
    return float(u) / (len(ref) * len(win)), fold_p, fold_auc


_NULL_CACHE: dict[tuple, np.ndarray] = {}


def _classifier_null(
    x: np.ndarray, g: np.ndarray, m: int, folds: int, seed: int, draws: int
) -> np.ndarray:
    """Out-of-fold AUCs of `draws` group-disjoint splits of the reference (memoised: they
    depend on the reference and the window's size only, and cost draws x folds fits)."""
    digest = hashlib.sha256(x.tobytes() + "\0".join(g).encode()).hexdigest()
    key = (digest, m, folds, seed, draws, CLASSIFIER_C, REFERENCE_FACTOR)
    if key not in _NULL_CACHE:
        rng = np.random.default_rng([seed, 1])
        keep, win = _group_splits(g, m, draws, rng)
        aucs = []
        for k in range(draws):
            rows = np.flatnonzero(keep[k])
            rows = rng.choice(rows, size=min(len(rows), REFERENCE_FACTOR * m), replace=False)
            aucs.append(_cv_auc(x[np.sort(rows)], x[win[k]], folds, rng)[0])
        while len(_NULL_CACHE) >= 8:
            _NULL_CACHE.pop(next(iter(_NULL_CACHE)))
        _NULL_CACHE[key] = np.asarray(aucs)
    return _NULL_CACHE[key]


def classifier_test(
    reference: np.ndarray,
    window: np.ndarray,
    *,
    alpha: float = 0.01,
    folds: int = 5,
    seed: int = 0,
    max_reference: int = 1000,
    reference_groups: Sequence[Any] | None = None,
    null_draws: int = 300,
) -> DriftTest:
    """Classifier two-sample test: can a logistic regression tell window rows from reference?

    The reference is subsampled to `REFERENCE_FACTOR` x the window's size (balanced).
    statistic: AUC of the out-of-fold predicted log-odds (ranked as the probabilities are).
    p-value without groups: in each fold a one-sided Mann-Whitney test of the held-out window
    scores against the held-out reference scores, Bonferroni over the folds (folds x the
    smallest). With `reference_groups`: the AUC against `null_draws` group-disjoint splits of
    the reference (see `input_drift`).
    """
    # Why this p-value: the Mann-Whitney test on the pooled out-of-fold scores is not valid
    # (each model was trained on the other folds' rows, so the pooled scores are dependent).
    # Within one fold it is exact: with no drift the held-out rows are exchangeable and the
    # model never saw them, so their scores are too. Bonferroni holds under any dependence
    # between folds. A label-permutation test re-fitting the whole procedure is valid too,
    # but costs folds x permutations fits and cannot go below 1 / (1 + permutations): with
    # 100 it could never reach the alpha / 2 = 0.005 of `input_drift`.
    _check_alpha(alpha)
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if null_draws < 1:
        raise ValueError(f"null_draws must be >= 1, got {null_draws}")
    rng = np.random.default_rng(seed)
    x, y, g = _prepare(reference, window, reference_groups, folds, max(max_reference, folds), rng)
    m = len(y)
    rows = np.sort(rng.choice(len(x), size=min(len(x), REFERENCE_FACTOR * m), replace=False))
    # One BLAS thread: these fits are small, and threads fighting over busy cores made each
    # fit 10x slower (measured on 2 cores).
    with threadpool_limits(limits=1):
        auc, fold_p, fold_auc = _cv_auc(x[rows], y, folds, rng)
        null = _classifier_null(x, g, m, folds, seed, null_draws) if g is not None else None
    detail: dict[str, Any] = {"alpha": alpha, "folds": folds, "fold_auc": fold_auc}
    detail |= {"C": CLASSIFIER_C, "reference_factor": REFERENCE_FACTOR, "seed": seed}
    if null is None:
        p = min(1.0, folds * min(fold_p))
        detail |= {"null": "rows", "fold_p_values": fold_p}
    else:
        p = _p_value(null, auc)
        detail |= {"null": "groups", "null_draws": null_draws}
        detail |= {"null_mean_auc": float(null.mean()), "null_max_auc": float(null.max())}
    return DriftTest("input_classifier", auc, p, p < alpha, len(rows), m, detail)


def input_drift(
    reference: np.ndarray,
    window: np.ndarray,
    *,
    alpha: float = 0.01,
    seed: int = 0,
    permutations: int = 500,
    max_reference: int = 1000,
    reference_groups: Sequence[Any] | None = None,
    null_draws: int = 300,
) -> list[DriftTest]:
    """Both input tests, each at alpha / 2 (Bonferroni): "any alarms" has rate <= alpha.

    reference_groups (one label per reference row, e.g. its contract): clauses of one
    contract are alike (parties, defined terms, drafting), so a window of new contracts
    differs from the reference's contracts even when the kind of traffic has not changed;
    the row-level tests then alarm on almost every window (measured on CUAD: test-split
    clauses against train + validation, tests/test_monitor_drift.py). With groups, the null
    is "a window of new contracts of the reference's kind": each test's statistic against
    the same statistic on group-disjoint splits of the reference.
    """
    _check_alpha(alpha)
    common = {"seed": seed, "max_reference": max_reference, "reference_groups": reference_groups}
    return [
        mmd_test(reference, window, alpha=alpha / 2, permutations=permutations, **common),
        classifier_test(reference, window, alpha=alpha / 2, null_draws=null_draws, **common),
    ]


def label_drift(
    reference_labels: Sequence[str], window_labels: Sequence[str], *, alpha: float = 0.01
) -> DriftTest:
    """Chi-square test of homogeneity of the label mix (rare categories pooled as "other")."""
    _check_alpha(alpha)
    ref, win = Counter(map(str, reference_labels)), Counter(map(str, window_labels))
    nr, nw = sum(ref.values()), sum(win.values())
    if not nr or not nw:
        raise ValueError("label_drift needs at least one reference and one window label")
    total = nr + nw
    column = {c: ref[c] + win[c] for c in set(ref) | set(win)}

    def expected(count: int) -> float:  # the smaller row's expected count of a column
        return min(nr, nw) * count / total

    kept = sorted((c for c in column if expected(column[c]) >= MIN_EXPECTED), key=column.get)
    pooled = sorted(c for c in column if c not in kept)
    # "other" must meet the rule too: grow it with the rarest kept categories until it does.
    while pooled and expected(sum(column[c] for c in pooled)) < MIN_EXPECTED and kept:
        pooled.append(kept.pop(0))
    groups = [[c] for c in sorted(kept)] + ([sorted(pooled)] if pooled else [])
    names = sorted(kept) + (["other"] if pooled else [])
    share = {
        c: {"label": c, "reference": ref[c] / nr, "window": win[c] / nw} for c in sorted(column)
    }
    for s in share.values():
        s["change"] = s["window"] - s["reference"]
    top = sorted(share.values(), key=lambda s: -abs(s["change"]))[:5]
    detail: dict[str, Any] = {"alpha": alpha, "categories": names, "pooled": sorted(pooled)}
    detail["top_changes"] = top
    if len(groups) < 2:  # one column: nothing to compare
        detail["note"] = f"fewer than two categories expected >= {MIN_EXPECTED} times"
        return DriftTest("output_labels", 0.0, 1.0, False, nr, nw, detail)
    table = np.array([[sum(cnt[c] for c in g) for g in groups] for cnt in (ref, win)])
    res = stats.chi2_contingency(table)
    detail["dof"] = int(res.dof)
    p = float(res.pvalue)
    return DriftTest("output_labels", float(res.statistic), p, p < alpha, nr, nw, detail)


def confidence_drift(
    reference: Sequence[float], window: Sequence[float], *, alpha: float = 0.01
) -> DriftTest:
    """Two-sample Kolmogorov-Smirnov test of the answers' confidences."""
    _check_alpha(alpha)
    r, w = np.asarray(reference, dtype=np.float64), np.asarray(window, dtype=np.float64)
    for name, v in (("reference", r), ("window", w)):
        if v.ndim != 1 or not len(v):
            raise ValueError(f"{name} confidences must be a non-empty 1-D sequence")
        if not np.isfinite(v).all():
            raise ValueError(f"{name} confidences have NaN or infinite values")
    res = stats.ks_2samp(r, w)
    p = float(res.pvalue)
    detail = {"alpha": alpha, "reference_mean": float(r.mean()), "window_mean": float(w.mean())}
    detail |= {"reference_median": float(np.median(r)), "window_median": float(np.median(w))}
    return DriftTest(
        "output_confidence", float(res.statistic), p, p < alpha, len(r), len(w), detail
    )
