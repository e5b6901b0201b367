"""The cache evaluation's arithmetic: Wilson intervals, the threshold rule, the replay, edits."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import pytest

from temper.online.cache import CacheConfig, normalise
from temper.records.edits import change_days, change_year, hard_negatives, swap_state
from temper.results import CacheEvalResult, CacheRow
from temper.stages import cache_eval
from temper.stages.cache_eval import CacheEvalConfig, build_replay, choose_default, wilson


def test_wilson_matches_the_interval_computed_by_hand():
    # 5 of 10, z = 1.96: centre 0.5, half-width 1.96 * sqrt(0.025 + 3.8415/400) / 1.38415
    # = 0.2634, so [0.2366, 0.7634] (the textbook value).
    r = wilson(5, 10)
    assert (r.value, round(r.ci_low, 4), round(r.ci_high, 4)) == (0.5, 0.2366, 0.7634)
    # 0 of n: the upper bound is z^2 / (n + z^2) = 3.8415 / 13.8415 = 0.2775 for n = 10.
    r = wilson(0, 10)
    assert r.ci_low == 0 and r.ci_high == pytest.approx(3.841459 / 13.841459, abs=1e-6)
    assert wilson(3, 0).value is None and wilson(3, 0).ci_high is None


def test_a_one_percent_bound_needs_381_clean_hits():
    # With no wrong hit at all, 380 hits leave the upper bound just above 1%, 381 below.
    assert wilson(0, 380).ci_high > 0.01 >= wilson(0, 381).ci_high


def row(threshold: float | None, hits: int, wrong: int, n: int = 1000) -> CacheRow:
    return CacheRow(
        threshold=threshold,
        requests=n,
        hits=hits,
        exact_hits=0,
        similar_hits=hits,
        wrong_hits=wrong,
        hit_rate=wilson(hits, n),
        wrong_among_hits=wilson(wrong, hits),
        wrong_any_label=wilson(wrong, hits),
        added_error=wilson(wrong, n),
        wrong_by_origin={},
    )


def test_the_default_is_the_highest_hit_rate_within_the_bound():
    exact = row(None, 50, 0)
    rows = [
        row(0.90, 700, 30),  # most hits, but 4.3% wrong
        row(0.93, 500, 0),  # 0 of 500: upper bound 0.76%: qualifies
        row(0.95, 400, 0),  # qualifies with fewer hits
        row(0.97, 300, 0),  # 0 of 300: upper bound 1.26%: too few hits to show it
    ]
    d = choose_default(exact, rows, 0.01)
    assert d.bound_met and d.threshold == 0.93 and d.hit_rate == 0.5
    assert d.wrong_among_hits.ci_high == pytest.approx(3.841459 / 503.841459, abs=1e-6)
    none = choose_default(exact, [rows[0], rows[3], row(0.99, 0, 0)], 0.01)
    assert not none.bound_met and none.threshold is None and none.hit_rate == 0.05


def test_edits_change_the_fact_and_its_key_term():
    law = "This Agreement shall be governed by the laws of the State of New York."
    text, term = swap_state(law, "New York", "seed")
    assert "New York" not in text and text == law.replace("New York", term)
    assert swap_state("governed by the laws of West Virginia", "Virginia", "s") is None
    notice = "unless either party gives notice at least ninety (90) days before the end"
    text, term = change_days(notice, "90 days", "seed")
    new = int(term.split()[0])
    assert new != 90 and f"({new}) days" in text and "90" not in text and "ninety" not in text
    dated = "This Agreement expires on December 31, 2020 (the Term)."
    text, term = change_year(dated, "12/31/2020", "seed")
    year = int(term.rsplit("/", 1)[1])
    assert 2021 <= year <= 2025 and text == dated.replace("2020", str(year))
    assert change_year(dated, "perpetual", "seed") is None


class WordsEmbedder:
    """Bag of words hashed into 4096 dimensions (fast; shared words, high cosine)."""

    name = "words"
    max_tokens = 256

    def __init__(self, *args, **kwargs) -> None:
        pass

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), 4096), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in normalise(text).split():
                out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % 4096] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(t.split()) + 2 for t in texts]


def record(rid: str, split: str, text: str, clause_type: str, key_term: str | None) -> dict:
    gold = {"clause_type": clause_type, "key_term": key_term}
    return {"id": rid, "split": split, "text": text, "gold": gold, "gold_all": {}}


LAW = "This Agreement and all disputes arising out of it shall be governed by and construed in accordance with the laws of the State of {} without regard to its conflict of law provisions."


def splits() -> dict[str, list[dict]]:
    test = [
        record("t1", "test", LAW.format("Delaware"), "Governing Law", "Delaware"),
        record("t2", "test", "Licensee may not assign this Agreement without consent.", "Anti-Assignment", None),
    ]  # fmt: skip
    train = [
        record("a", "train", LAW.format("Texas"), "Governing Law", "Texas"),
        record("b", "train", "Either party may terminate for convenience on notice.", "Termination for Convenience", None),
    ]  # fmt: skip
    return {"test": test, "train": train, "validation": []}


def test_the_replay_holds_test_near_duplicates_and_negatives_after_their_sources():
    cfg = CacheEvalConfig(hard_negatives_from=["test"], seed=3)
    requests = build_replay(splits(), cfg)
    origin = {r["id"]: r["origin"] for r in requests}
    assert origin == {
        "t1": "test",
        "t2": "test",
        "a": "train near-duplicate",  # Jaccard 0.82 with t1
        "t1~state": "hard negative: state",
    }
    order = [r["id"] for r in requests]
    assert order.index("t1") < order.index("t1~state")
    neg = next(r for r in requests if r["id"] == "t1~state")
    assert neg["answer"][0] == "governing law" and neg["answer"][1] != "delaware"
    assert len(hard_negatives(splits()["train"])) == 1  # a: Texas


def test_the_stage_scores_every_threshold_and_writes_its_outputs(tmp_path, monkeypatch):
    from temper.io import write_jsonl

    for name, records in splits().items():
        write_jsonl(tmp_path / f"{name}.jsonl", records)
    monkeypatch.setattr(cache_eval, "SentenceEmbedder", WordsEmbedder)
    cfg = CacheEvalConfig(
        prepared_dir=str(tmp_path),
        thresholds=[0.5, 0.99],
        report=str(tmp_path / "cache.md"),
        metrics=str(tmp_path / "cache.json"),
        plot=str(tmp_path / "cache.png"),
    )
    result = cache_eval.run(cfg, CacheConfig(match_numbers=False))
    assert CacheEvalResult.load(tmp_path / "cache.json") == result
    low, high = result.thresholds
    # At 0.5 the Delaware clause answers its Texas near-duplicate and its state-swapped copy:
    # both wrong (another state). At 0.99 nothing is that close.
    assert low.hits >= 2 and low.wrong_hits >= 2 and high.hits == 0
    assert math.isclose(low.added_error.value, low.wrong_hits / low.requests)
    assert not result.default.bound_met and result.default.threshold is None
    assert "No threshold meets the bound" in (tmp_path / "cache.md").read_text()
    assert (tmp_path / "cache.png").stat().st_size > 1000
