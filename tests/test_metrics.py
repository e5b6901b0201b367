"""The point metrics of a field (`metrics/fields.py`) and the bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from rouge_score import rouge_scorer
from sklearn.metrics import f1_score

from temper.evaluation.metrics import Resamples, macro_f1_stats, mean_stats, percentile_stats
from temper.evaluation.metrics.fields import label_metrics, text_rouge


def test_rouge_matches_hand_computed_and_rouge_score():
    preds = ["the cat sat", "90 days", None, "New York"]
    refs = ["the cat sat on the mat", "ninety (90) days", "12/31/2006", "New York"]
    out = text_rouge(predictions=preds, references=refs, return_per_example=True)
    # By hand: unigrams 3/3 precision, 3/6 recall -> F 2/3; bigrams 2/2 and 2/5 -> F 4/7.
    assert out["rouge1_scores"][0] == pytest.approx(2 / 3)
    assert out["rouge2_scores"][0] == pytest.approx(4 / 7)
    assert out["rouge1_scores"][2] == 0.0  # no answer scores 0, no crash
    assert out["rougeL_scores"][3] == 1.0
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for i, (p, r) in enumerate(zip(preds, refs, strict=True)):
        ref_scores = scorer.score(r, p or "")
        for kind in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            assert out[f"{kind}_scores"][i] == pytest.approx(ref_scores[kind].fmeasure)
    assert out["rougeL"] == pytest.approx(np.mean(out["rougeL_scores"]))


def test_label_metrics_exact_any_of_gold_and_per_class():
    out = label_metrics(
        predictions=["A", "", "C", "B"],  # "" = unparseable answer: wrong, not an error
        references=["A", "B", "B", "B"],
        references_all=[["A"], ["B"], ["B", "C"], ["B"]],
        return_per_example=True,
    )
    assert out["correct"] == [1, 0, 0, 1]
    assert out["correct_any"] == [1, 0, 1, 1]  # "C" is one of the third record's gold labels
    assert out["accuracy"] == 0.5 and out["accuracy_any"] == 0.75
    assert out["per_class"]["B"] == {
        "precision": 1.0,
        "recall": pytest.approx(1 / 3),
        "f1": pytest.approx(0.5),
        "support": 3,
    }
    # Macro over the reference classes A and B: (1 + 0.5) / 2; the invented "C" is not a class.
    assert out["macro_f1"] == pytest.approx(0.75)


def test_all_unanswered_is_zero_not_a_crash():
    out = label_metrics(predictions=["", ""], references=["A", "B"])
    assert out["accuracy"] == 0.0 and out["macro_f1"] == 0.0


def test_macro_f1_point_matches_sklearn():
    rng = np.random.default_rng(1)
    labels = list("ABCDE")
    gold = [labels[i] for i in rng.integers(0, 5, 300)]
    pred = [
        g if rng.random() < 0.6 else (None if rng.random() < 0.2 else labels[rng.integers(5)])
        for g in gold
    ]
    rs = Resamples.draw(len(gold), 200, seed=0)
    point, boot = macro_f1_stats(pred, gold, rs)
    expected = f1_score(
        gold,
        [p or "none" for p in pred],
        labels=sorted(set(gold)),
        average="macro",
        zero_division=0,
    )
    assert point == pytest.approx(expected)
    assert boot.shape == (200,) and np.all((boot >= 0) & (boot <= 1))
    assert np.quantile(boot, 0.025) < point < np.quantile(boot, 0.975)


def test_bootstrap_interval_covers_the_truth_about_95_percent():
    """Coverage on synthetic data: 300 samples of a Bernoulli(0.3) mean, n=200."""
    rng = np.random.default_rng(123)
    covered = 0
    trials = 300
    for t in range(trials):
        x = (rng.random(200) < 0.3).astype(float)
        rs = Resamples.draw(200, 1000, seed=t)
        low, high = rs.interval(mean_stats(x, rs))
        covered += low <= 0.3 <= high
    assert 0.90 <= covered / trials <= 0.99


def test_paired_delta_interval_covers_the_true_difference():
    """Two correlated systems on the same examples; the true accuracy gap is 0.10."""
    rng = np.random.default_rng(7)
    covered, widths_paired, widths_unpaired = 0, [], []
    trials = 200
    for t in range(trials):
        u = rng.random(300)
        a = (u < 0.6).astype(float)  # system A right when u < 0.6
        b = (u < 0.5).astype(float)  # system B right on a subset: strongly correlated
        rs = Resamples.draw(300, 1000, seed=t)
        low, high = rs.interval(mean_stats(a, rs) - mean_stats(b, rs))
        covered += low <= 0.1 <= high
        widths_paired.append(high - low)
        other = Resamples.draw(300, 1000, seed=t + 10_000)
        lo2, hi2 = rs.interval(mean_stats(a, rs) - mean_stats(b, other))
        widths_unpaired.append(hi2 - lo2)
    assert 0.90 <= covered / trials <= 0.99
    # Pairing is what makes the delta interval tight: independent resamples are far wider.
    assert np.mean(widths_paired) < 0.6 * np.mean(widths_unpaired)


def test_resamples_are_seeded_and_masked_means_ignore_missing_references():
    a = Resamples.draw(50, 300, seed=5)
    b = Resamples.draw(50, 300, seed=5)
    assert np.array_equal(a.idx, b.idx)
    assert np.all(a.counts.sum(axis=1) == 50)
    values = np.arange(50, dtype=float)
    mask = values % 2 == 0
    point_stats = mean_stats(values, Resamples.draw(50, 1, seed=0), mask)
    assert np.isfinite(point_stats).all()
    full = Resamples(np.arange(50)[None, :], np.ones((1, 50)), 0.95)
    assert mean_stats(values, full, mask)[0] == pytest.approx(values[mask].mean())
    # nearest rank (temper.stats): an observed value
    assert percentile_stats(values, 95, full)[0] == np.percentile(values, 95, method="inverted_cdf")
