"""The monitor's statistics on constructed data: drift tests, the Bernoulli CUSUM, the weekly rule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from temper.online.monitor.cusum import BernoulliCusum, design, threshold_for, weekly_rule
from temper.online.monitor.drift import (
    DriftTest,
    classifier_test,
    confidence_drift,
    input_drift,
    label_drift,
    mmd_test,
)

DIM = 32


def unit_rows(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    """Gaussian rows (first 4 coordinates' mean moved by `shift`), scaled to norm 1."""
    x = rng.normal(size=(n, DIM))
    x[:, :4] += shift
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def binom_upper(n: int, p: float, tail: float = 1e-3) -> int:
    """The count that `n` tests at level `p` exceed with probability below `tail`."""
    return int(stats.binom.ppf(1 - tail, n, p))


# --- input drift ---------------------------------------------------------------------------


def test_mmd_and_classifier_alarm_on_a_clear_shift():
    rng = np.random.default_rng(1)
    ref, win = unit_rows(rng, 400), unit_rows(rng, 150, shift=0.6)
    results = input_drift(ref, win, alpha=0.01, seed=3, permutations=300)
    assert [r.name for r in results] == ["input_mmd", "input_classifier"]
    assert all(r.alarm for r in results), [r.as_dict() for r in results]
    mmd, clf = results
    assert mmd.p_value == pytest.approx(1 / 301)  # no relabelling beats the observed one
    assert mmd.detail["alpha"] == clf.detail["alpha"] == 0.005  # Bonferroni halves
    assert clf.statistic > 0.8 and clf.n_reference == clf.n_window == 150
    json.dumps([r.as_dict() for r in results])  # the report stores them as JSON


@pytest.mark.parametrize("test", [mmd_test, classifier_test])
def test_false_alarm_rate_on_same_distribution_windows_is_within_alpha(test):
    # alpha = 0.1 over 50 seeded repeats: a test that were anti-conservative (say rate 0.25)
    # would exceed the bound, one at its level almost never does.
    alpha, repeats = 0.1, 50
    kwargs = {"permutations": 200} if test is mmd_test else {}
    alarms, ps = 0, []
    for k in range(repeats):
        rng = np.random.default_rng([7, k])
        r = test(unit_rows(rng, 300), unit_rows(rng, 100), alpha=alpha, seed=k, **kwargs)
        alarms += r.alarm
        ps.append(r.p_value)
        assert 0 < r.p_value <= 1
    bound = binom_upper(repeats, alpha)
    assert alarms <= bound, f"{test.__name__}: {alarms}/{repeats} false alarms at alpha={alpha}"
    assert np.median(ps) > 0.2  # not piled near 0 either


def test_mmd_is_seeded_and_subsamples_the_reference():
    rng = np.random.default_rng(2)
    ref, win = unit_rows(rng, 600), unit_rows(rng, 50)
    a = mmd_test(ref, win, seed=5, permutations=100, max_reference=200)
    b = mmd_test(ref, win, seed=5, permutations=100, max_reference=200)
    assert a == b and a.n_reference == 200 and a.n_window == 50
    assert a.detail["bandwidth"] > 0


def clustered(rng: np.random.Generator, groups: int, per: int, shift: float = 0.0):
    """Rows in groups (think contracts) sharing a random offset, scaled to norm 1; labels."""
    offsets = rng.normal(scale=0.6, size=(groups, DIM))
    x = np.repeat(offsets, per, axis=0) + rng.normal(size=(groups * per, DIM))
    x[:, :4] += shift
    names = [f"g{rng.integers(1 << 40)}" for _ in range(groups)]
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.repeat(names, per).tolist()


def test_grouped_null_holds_for_new_groups_where_the_row_null_does_not():
    rng = np.random.default_rng(11)
    ref, groups = clustered(rng, 80, 5)
    windows = [clustered(rng, 10, 5)[0] for _ in range(30)]  # new groups, same kind
    alpha, bound = 0.1, binom_upper(30, 0.1)
    row = [mmd_test(ref, w, permutations=200, alpha=alpha).alarm for w in windows]
    assert sum(row) >= 20, f"the row-level null alarmed on only {sum(row)}/30 windows"
    for test, kw in ((mmd_test, {"permutations": 200}), (classifier_test, {"null_draws": 100})):
        # One seed: the classifier's null depends on the reference only, computed once.
        alarms = [test(ref, w, alpha=alpha, reference_groups=groups, **kw).alarm for w in windows]
        assert sum(alarms) <= bound, f"{test.__name__}: {sum(alarms)}/30 false alarms, alpha 0.1"


def test_grouped_tests_alarm_on_a_shift_of_new_groups():
    rng = np.random.default_rng(12)
    ref, groups = clustered(rng, 80, 5)
    shifted = clustered(rng, 10, 5, shift=0.8)[0]
    results = input_drift(
        ref, shifted, alpha=0.05, reference_groups=groups, permutations=200, null_draws=100
    )
    assert all(r.alarm and r.detail["null"] == "groups" for r in results), [
        r.as_dict() for r in results
    ]


def test_input_drift_validates_its_arguments():
    rng = np.random.default_rng(0)
    ref, win = unit_rows(rng, 50), unit_rows(rng, 20)
    with pytest.raises(ValueError, match="alpha"):
        mmd_test(ref, win, alpha=1.5)
    with pytest.raises(ValueError, match="dims"):
        mmd_test(ref, win[:, :10])
    with pytest.raises(ValueError, match="2-D"):
        classifier_test(ref, win[0])
    with pytest.raises(ValueError, match="at least 5 rows"):
        classifier_test(ref, win[:3])
    with pytest.raises(ValueError, match="NaN"):
        mmd_test(np.full((5, DIM), np.nan), win)
    with pytest.raises(ValueError, match="permutations"):
        mmd_test(ref, win, permutations=0)
    with pytest.raises(ValueError, match="49 labels for 50 rows"):
        mmd_test(ref, win, reference_groups=["a", "b"] * 24 + ["a"])
    with pytest.raises(ValueError, match="two groups"):
        classifier_test(ref, win, reference_groups=["a"] * 50)
    with pytest.raises(ValueError, match="2 x the window"):
        mmd_test(ref, unit_rows(rng, 30), reference_groups=["a", "b"] * 25)


# --- output drift --------------------------------------------------------------------------


def test_label_drift_alarms_on_a_changed_mix_and_pools_rare_labels():
    ref = ["a"] * 300 + ["b"] * 300 + ["c"] * 200 + ["rare1"] * 2 + ["rare2"] * 1
    same = ["a"] * 75 + ["b"] * 75 + ["c"] * 50
    shifted = ["a"] * 140 + ["b"] * 30 + ["c"] * 30
    quiet = label_drift(ref, same)
    assert not quiet.alarm and quiet.p_value > 0.5
    loud = label_drift(ref, shifted)
    assert loud.alarm and loud.p_value < 1e-6
    # rare1 + rare2 are expected < 5 times in the window, and so is their pool: c joins them.
    assert loud.detail["pooled"] == ["c", "rare1", "rare2"]
    assert loud.detail["categories"] == ["a", "b", "other"] and loud.detail["dof"] == 2
    top = loud.detail["top_changes"][0]
    assert top["label"] == "a" and top["change"] == pytest.approx(0.7 - 300 / 803)


def test_label_drift_with_one_category_has_nothing_to_test():
    r = label_drift(["x"] * 10, ["x"] * 5)
    assert (r.statistic, r.p_value, r.alarm) == (0.0, 1.0, False)
    with pytest.raises(ValueError, match="at least one"):
        label_drift([], ["x"])


def test_confidence_drift_is_a_ks_test():
    rng = np.random.default_rng(4)
    ref = rng.beta(8, 2, 500)
    assert not confidence_drift(ref, rng.beta(8, 2, 200)).alarm
    window = rng.beta(5, 3, 200)
    lower = confidence_drift(ref, window)
    assert lower.alarm and lower.detail["window_mean"] < lower.detail["reference_mean"]
    assert lower.statistic == pytest.approx(stats.ks_2samp(ref, window).statistic)
    with pytest.raises(ValueError, match="non-empty"):
        confidence_drift([], [0.5])


def test_drift_result_is_plain_json():
    t = DriftTest("x", np.float64(1.5), float("nan"), np.bool_(True), 3, 4, {"a": np.arange(2)})
    assert t.as_dict() == {
        "name": "x",
        "statistic": 1.5,
        "p_value": None,
        "alarm": True,
        "n_reference": 3,
        "n_window": 4,
        "detail": {"a": [0, 1]},
    }


# --- quality drift: the CUSUM ----------------------------------------------------------------


def test_cusum_weights_and_path_by_hand():
    c = BernoulliCusum(0.2, 0.25, h=0.5)
    up, down = c.weights
    assert up == pytest.approx(math.log(0.25 / 0.2), rel=5e-3)  # rounded to whole units
    assert down == pytest.approx(math.log(0.75 / 0.8), rel=1e-12)  # the unit's own weight
    # error, error, correct x 3, error, correct: floors at 0 never reached until the end
    errors = [1, 1, 0, 0, 0, 1, 0]
    expected, s = [], 0.0
    for e in errors:
        s = max(0.0, s + (up if e else down))
        expected.append(s)
    assert np.allclose(c.path(errors), expected)
    assert c.path(errors)[1] == pytest.approx(2 * math.log(1.25), rel=5e-3)  # 0.446
    assert c.first_alarm(errors) is None  # 0.446 - 3 * 0.0645 + 0.223 = 0.476 < 0.5
    assert c.first_alarm([1, 1, 1]) == 2  # 0.669 >= 0.5
    assert np.allclose(c.path([0, 0, 1]), [0.0, 0.0, up])  # floored at 0
    runs = np.array([errors, [0] * 7], dtype=bool)
    assert np.allclose(c.path(runs), [expected, [0.0] * 7])  # runs x time at once


def test_cusum_restart_and_start_continue_a_stream():
    c = BernoulliCusum(0.2, 0.4, h=1.0)
    rng = np.random.default_rng(5)
    e = rng.random((3, 400)) < 0.3
    whole = c.path(e, restart=True)
    first = c.path(e[:, :150], restart=True)
    rest = c.path(e[:, 150:], start=first[:, -1], restart=True)
    assert np.allclose(np.hstack([first, rest]), whole)
    alarm = np.flatnonzero(whole[0] >= c.threshold)
    assert len(alarm) > 1
    after = whole[0, alarm[0] + 1]  # restarted: one step from 0
    assert np.isclose(after, 0.0) or np.isclose(after, c.weights[0])


def test_arl_agrees_with_a_direct_simulation():
    c = BernoulliCusum(0.2, 0.4, h=2.0)
    rng = np.random.default_rng(6)
    for p in (0.2, 0.4):
        arl = c.arl(p)
        errors = rng.random((4000, int(12 * arl))) < p
        hit = c.path(errors) >= c.threshold
        assert hit.any(axis=1).all()
        mean = float(np.mean(hit.argmax(axis=1) + 1))
        assert mean == pytest.approx(arl, rel=0.04), (p, mean, arl)


def test_arl_of_the_smallest_threshold_is_geometric():
    c = BernoulliCusum(0.1, 0.3, h=1e-6)  # one unit: the first error alarms
    assert c.threshold_units == 1 and c.arl(0.1) == pytest.approx(10.0)


def test_threshold_for_is_the_smallest_that_meets_the_arl():
    h = threshold_for(0.2, 0.25, 5000)
    c = BernoulliCusum(0.2, 0.25, h)
    assert c.arl(0.2) >= 5000
    assert BernoulliCusum(0.2, 0.25, h - c.unit).arl(0.2) < 5000
    assert c.arl(0.25) < 0.1 * c.arl(0.2)


def test_design_maps_false_alarms_per_year_to_arl0():
    c = design(0.2, 0.25, judged_per_day=150, false_alarms_per_year=2)
    assert c.h == threshold_for(0.2, 0.25, 150 * 365 / 2)
    assert 150 * 365 / 2 <= c.arl(0.2) < 1.01 * 150 * 365 / 2  # granularity of one unit


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0.25, 0.2, 1.0), "p1"),
        ((0.0, 0.2, 1.0), "in \\(0, 1\\)"),
        ((0.2, 1.0, 1.0), "in \\(0, 1\\)"),
        ((0.2, 0.25, 0.0), "h must"),
        ((0.2, 0.25, float("inf")), "h must"),
    ],
)
def test_cusum_validates_its_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        BernoulliCusum(*args)


def test_cusum_helpers_validate_their_arguments():
    c = BernoulliCusum(0.2, 0.25, 1.0)
    with pytest.raises(ValueError, match="booleans"):
        c.path([0, 2, 1])
    with pytest.raises(ValueError, match="p must"):
        c.arl(1.0)
    with pytest.raises(ValueError, match="arl0"):
        threshold_for(0.2, 0.25, 0.5)
    with pytest.raises(ValueError, match="judged_per_day"):
        design(0.2, 0.25, 0, 1)
    with pytest.raises(ValueError, match="false_alarms_per_year"):
        design(0.2, 0.25, 10, -1)


# --- the weekly rule -----------------------------------------------------------------------


def test_weekly_rule_alarms_strictly_below_the_bar():
    errors, sizes = [20, 25, 26, 30, 0], [100, 100, 100, 100, 50]
    assert weekly_rule(errors, sizes, baseline_accuracy=0.8) == [False, False, True, True, False]
    assert weekly_rule([25], [100], baseline_accuracy=0.8, drop=0.04) == [True]


def test_weekly_rule_validates_its_arguments():
    with pytest.raises(ValueError, match="sizes"):
        weekly_rule([1, 2], [100], baseline_accuracy=0.8)
    with pytest.raises(ValueError, match="in \\[0, size\\]"):
        weekly_rule([101], [100], baseline_accuracy=0.8)
    with pytest.raises(ValueError, match="> 0"):
        weekly_rule([0], [0], baseline_accuracy=0.8)
    with pytest.raises(ValueError, match="drop"):
        weekly_rule([0], [10], baseline_accuracy=0.8, drop=0.9)
