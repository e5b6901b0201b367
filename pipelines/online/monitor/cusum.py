"""Quality drift: a Bernoulli CUSUM on judged (or reviewed) errors, and the common weekly rule.

The CUSUM (Reynolds & Stoumbos 1999) adds log(p1/p0) for an error and log((1-p1)/(1-p0)) for
a correct answer, floors the sum at 0 and alarms when it reaches h. It is the sequential
likelihood-ratio test of "error rate p1" against "p0", so no chart with the same in-control
false-alarm rate detects a shift to p1 sooner on average (Moustakides 1986).

Both weights are held as integer multiples of one unit (the smaller weight is `resolution`
units, the other rounded to whole units: under 1% off, with the default resolution). The chart's
state then lives on the integers 0 .. H-1, and the Markov chain of Brook & Evans (1972) on
those states is exact: `arl` solves it rather than approximating a continuous state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

RESOLUTION = 50  # units in the smaller weight (the rounding of the other is < 1 / 100)
MAX_UNITS = 1 << 22  # thresholds beyond this many units (ARLs far past any use) are refused
DAYS_PER_YEAR = 365


def _check_rates(p0: float, p1: float) -> None:
    if not (0 < p0 < 1 and 0 < p1 < 1):
        raise ValueError(f"error rates must be in (0, 1), got p0={p0}, p1={p1}")
    if not p0 < p1:
        raise ValueError(f"p1 (the error rate to detect) must exceed p0, got p0={p0}, p1={p1}")


@dataclass(frozen=True)
class BernoulliCusum:
    """An upper Bernoulli CUSUM for an error rate rising from p0 to p1, alarming at h."""

    p0: float  # in-control error rate (0.20 at 80% accuracy)
    p1: float  # error rate to detect fastest (0.25)
    h: float  # decision threshold, in log-likelihood-ratio units
    resolution: int = RESOLUTION

    def __post_init__(self) -> None:
        _check_rates(self.p0, self.p1)
        if not (math.isfinite(self.h) and self.h > 0):
            raise ValueError(f"h must be a positive number, got {self.h}")
        if self.resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {self.resolution}")
        if self.threshold_units > MAX_UNITS:
            raise ValueError(f"h={self.h} is beyond any useful run length")

    @property
    def unit(self) -> float:
        """The size of one integer step of the chart's state."""
        up = math.log(self.p1 / self.p0)
        down = math.log((1 - self.p0) / (1 - self.p1))
        return min(up, down) / self.resolution

    @property
    def steps(self) -> tuple[int, int]:
        """(units an error adds, units a correct answer removes)."""
        unit = self.unit
        return (
            round(math.log(self.p1 / self.p0) / unit),
            round(math.log((1 - self.p0) / (1 - self.p1)) / unit),
        )

    @property
    def weights(self) -> tuple[float, float]:
        """(error, correct) increments as the chart adds them (the rounded log ratios)."""
        up, down = self.steps
        return up * self.unit, -down * self.unit

    @property
    def threshold_units(self) -> int:
        # The tolerance keeps h = k * unit (as `threshold_for` returns) at exactly k units.
        return max(1, math.ceil(self.h / self.unit - 1e-9))

    @property
    def threshold(self) -> float:
        """The threshold as the chart applies it: h rounded up to whole units."""
        return self.threshold_units * self.unit

    def _scan(self, errors: Any, start: Any, restart: bool) -> np.ndarray:
        e = np.asarray(errors)
        if e.ndim not in (1, 2):
            raise ValueError(f"errors must be 1-D (one stream) or 2-D (runs x time), got {e.shape}")
        if e.dtype != bool:
            if e.size and not np.isin(e, (0, 1)).all():
                raise ValueError("errors must be booleans (or 0/1): True = an error")
            e = e.astype(bool)
        up, down = self.steps
        cap = self.threshold_units
        s0 = np.rint(np.asarray(start, dtype=np.float64) / self.unit).astype(np.int64)
        if (s0 < 0).any():
            raise ValueError("start must be >= 0")
        if e.ndim == 1:  # one stream: plain Python is faster than numpy per step
            if s0.ndim:
                raise ValueError("start must be a number for a 1-D stream")
            s, out = int(s0), []
            for err in e.tolist():
                if restart and s >= cap:
                    s = 0
                s = s + up if err else max(0, s - down)
                out.append(s)
            return np.asarray(out, dtype=np.int64)
        inc = np.where(e.T, up, -down).astype(np.int64)  # (time, runs): each step contiguous
        out = np.empty_like(inc)
        s = np.broadcast_to(s0, (e.shape[0],)).copy()
        for t in range(inc.shape[0]):
            if restart:
                np.putmask(s, s >= cap, 0)
            np.add(s, inc[t], out=s)
            np.maximum(s, 0, out=s)
            out[t] = s
        return out.T

    def path(
        self, errors: Sequence[bool] | np.ndarray, *, start: Any = 0.0, restart: bool = False
    ) -> np.ndarray:
        """S_t after each observation (the last axis is time; 2-D input is runs x time).

        start: S before the first observation (a number, or one per run: a previous
        chunk's last column). restart: after an alarm the next observation starts from 0,
        as after an investigated alarm; the alarming S_t itself is kept.
        """
        return self._scan(errors, start, restart) * self.unit

    def first_alarm(self, errors: Sequence[bool] | np.ndarray, *, start: float = 0.0) -> int | None:
        """Index of the first observation with S_t >= h (None: no alarm)."""
        units = self._scan(errors, start, False)
        if units.ndim != 1:
            raise ValueError("first_alarm takes one stream (1-D)")
        hits = np.flatnonzero(units >= self.threshold_units)
        return int(hits[0]) if len(hits) else None

    def arl(self, p: float) -> float:
        """Average run length (observations to the first alarm, from S = 0) at error rate p.

        Exact for this chart: the Brook & Evans Markov chain on its integer states
        0 .. H-1, L = (I - Q)^-1 1, read at state 0.
        """
        if not 0 < p < 1:
            raise ValueError(f"p must be in (0, 1), got {p}")
        up, down = self.steps
        return _arl_units(p, up, down, self.threshold_units)


def _arl_units(p: float, up: int, down: int, cap: int) -> float:
    from scipy.sparse import csc_matrix, identity
    from scipy.sparse.linalg import spsolve

    s = np.arange(cap)
    rises = s[s + up < cap]  # an error from these states does not alarm
    rows = np.r_[rises, s]
    cols = np.r_[rises + up, np.maximum(s - down, 0)]
    vals = np.r_[np.full(len(rises), p), np.full(cap, 1 - p)]
    q = csc_matrix((vals, (rows, cols)), shape=(cap, cap))  # duplicates (state 0) are summed
    lengths = spsolve((identity(cap, format="csc") - q).tocsc(), np.ones(cap))
    return float(np.atleast_1d(lengths)[0])


def threshold_for(p0: float, p1: float, arl0: float, *, resolution: int = RESOLUTION) -> float:
    """The smallest h whose in-control ARL is >= arl0 (bisection on whole units of h)."""
    _check_rates(p0, p1)
    if not (math.isfinite(arl0) and arl0 > 1):
        raise ValueError(f"arl0 must be a number > 1, got {arl0}")
    chart = BernoulliCusum(p0, p1, 1.0, resolution)
    up, down = chart.steps

    def arl(units: int) -> float:
        return _arl_units(p0, up, down, units)

    if arl(1) >= arl0:
        return chart.unit
    lo, hi = 1, 2  # invariant: arl(lo) < arl0 <= arl(hi) once hi is found
    while arl(hi) < arl0:
        lo, hi = hi, hi * 2
        if hi > MAX_UNITS:
            raise ValueError(f"arl0={arl0} needs a threshold beyond any useful run length")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if arl(mid) >= arl0 else (mid, hi)
    return hi * chart.unit


def design(
    p0: float, p1: float, judged_per_day: float, false_alarms_per_year: float
) -> BernoulliCusum:
    """The chart whose in-control ARL is judged_per_day * 365 / false_alarms_per_year.

    With the chart restarted after each alarm, alarms form a renewal process, so the long-run
    false-alarm rate is exactly 1 / ARL0 per observation.
    """
    if not (math.isfinite(judged_per_day) and judged_per_day > 0):
        raise ValueError(f"judged_per_day must be > 0, got {judged_per_day}")
    if not (math.isfinite(false_alarms_per_year) and false_alarms_per_year > 0):
        raise ValueError(f"false_alarms_per_year must be > 0, got {false_alarms_per_year}")
    arl0 = judged_per_day * DAYS_PER_YEAR / false_alarms_per_year
    return BernoulliCusum(p0, p1, threshold_for(p0, p1, arl0))


def weekly_rule(
    week_errors: Sequence[int],
    week_sizes: Sequence[int],
    *,
    baseline_accuracy: float,
    drop: float = 0.05,
) -> list[bool]:
    """The common advice as written: alarm in a week whose sampled accuracy < baseline - drop."""
    if len(week_errors) != len(week_sizes):
        raise ValueError(f"{len(week_errors)} weeks of errors but {len(week_sizes)} sizes")
    if not 0 < baseline_accuracy < 1:
        raise ValueError(f"baseline_accuracy must be in (0, 1), got {baseline_accuracy}")
    if not 0 < drop < baseline_accuracy:
        raise ValueError(f"drop must be in (0, baseline_accuracy), got {drop}")
    bar = baseline_accuracy - drop
    out = []
    for errors, size in zip(week_errors, week_sizes, strict=True):
        if size <= 0:
            raise ValueError(f"a week's sample size must be > 0, got {size}")
        if not 0 <= errors <= size:
            raise ValueError(f"errors must be in [0, size], got {errors} of {size}")
        # The tolerance keeps "75 of 100 at a 0.75 bar" on the no-alarm side despite 0.8-0.05.
        out.append((size - errors) / size < bar - 1e-12)
    return out
