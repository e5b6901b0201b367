"""Stage cache_eval: how often the semantic cache answers, and how often it answers wrong.

The replay (docs/cache.md), against an empty cache, one request after another:
- every clause of the test split;
- every training clause that is a near-duplicate (word-3-gram Jaccard >= `near_dup_threshold`,
  prepare's measure) of a test or another training clause: the repeats real traffic has.
  prepare keeps these (it reports the pairs, and drops none by default), so they are found
  again here with the same code (`temper.records.neardup`);
- hard negatives (`temper.records.edits`): governing-law, notice and dated clauses of
  `hard_negatives_from` with the state, the days or the year changed, each arriving after its
  unedited source (which is added to the replay if it is not in it).
Arrival order: a seeded random time per clause; a hard negative at a random time after its
source. The answer a miss stores is the request's own gold answer (an oracle system), so a
hit is wrong exactly when the new request's gold answer (clause type and key term,
normalised) differs from the cached one, and the added error is wrong hits / requests.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from ..config import Section
from ..io import read_jsonl
from ..online.cache import CacheConfig, FixedEmbedder, SemanticCache, SentenceEmbedder, text_key
from ..records.edits import hard_negatives
from ..records.neardup import find_near_duplicates
from ..reports.cache import write_plot, write_report
from ..results import CacheDefault, CacheEvalResult, CacheRow, Rate

log = logging.getLogger(__name__)

VERSION = "replay"  # one model version throughout: the keys are tested in tests/test_cache.py
Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval


class CacheEvalConfig(Section):
    """`cache_eval:` in params.yaml."""

    prepared_dir: str = Field("data/prepared", description="prepare's split files.")
    near_dup_threshold: float = Field(
        0.8, gt=0, le=1, description="Jaccard of a near-duplicate (as prepare.near_dup)."
    )
    near_dup_num_perm: int = Field(64, gt=0, description="MinHash permutations (as prepare).")
    hard_negatives_from: list[Literal["train", "validation", "test"]] = Field(
        default_factory=lambda: ["test", "train"],
        description="Splits whose governing-law, notice and dated clauses are edited.",
    )
    thresholds: list[float] = Field(
        default_factory=lambda: [round(0.80 + i / 100, 2) for i in range(20)],
        description="Cosine thresholds replayed (besides the exact layer alone).",
    )
    max_wrong_upper: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="The default threshold: the highest hit rate whose wrong-hit rate "
        "(among hits) has a Wilson 95% upper bound at most this.",
    )
    seed: int = Field(0, description="Seed of the arrival order.")
    report: str = Field("reports/cache.md", description="The report.")
    metrics: str = Field("reports/cache.json", description="The result (CacheEvalResult).")
    plot: str = Field("reports/cache.png", description="Hit and wrong-hit rate vs threshold.")


def wilson(k: int, n: int, z: float = Z95) -> Rate:
    """k of n with the Wilson score interval. Written out (scipy has no Wilson interval and
    statsmodels is not a dependency): it stays inside [0, 1] and is not degenerate at k = 0,
    which matters here, where most rows have no or few wrong hits."""
    if n == 0:
        return Rate(k=k, n=n, value=None, ci_low=None, ci_high=None)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Rate(k=k, n=n, value=p, ci_low=max(0.0, centre - half), ci_high=min(1.0, centre + half))


def answer_of(gold: dict[str, Any]) -> tuple[str, str | None]:
    """The gold answer as compared: clause type and key term, case folded, spaces collapsed."""

    def norm(value: Any) -> str | None:
        return None if value is None else " ".join(str(value).casefold().split())

    return norm(gold.get("clause_type")) or "", norm(gold.get("key_term"))


def labels_of(record: dict[str, Any]) -> set[str]:
    """Every gold clause type of a clause (CUAD labels one span with several), normalised."""
    labels = (record.get("gold_all") or {}).get("clause_type") or []
    return {answer_of({"clause_type": x})[0] for x in labels} | {answer_of(record["gold"])[0]}


def build_replay(splits: dict[str, list[dict[str, Any]]], cfg: CacheEvalConfig) -> list[dict]:
    """The requests in arrival order: id, origin, text, answer (see the module doc)."""
    test, train = splits["test"], splits["train"]
    pool = test + train
    found = find_near_duplicates(
        [r["text"] for r in pool], cfg.near_dup_threshold, cfg.near_dup_num_perm
    )
    paired = {i for a, b, _ in found.pairs for i in (a, b)}
    base = {r["id"]: (r, "test") for r in test}
    for i in sorted(paired):
        if i >= len(test):
            base.setdefault(pool[i]["id"], (pool[i], "train near-duplicate"))
    negatives = hard_negatives([r for s in cfg.hard_negatives_from for r in splits[s]])
    by_id = {r["id"]: r for s in cfg.hard_negatives_from for r in splits[s]}
    for neg in negatives:
        src = by_id[neg["source_id"]]
        base.setdefault(src["id"], (src, f"{src['split']} hard-negative source"))
    rng = np.random.default_rng(cfg.seed)
    timed = []
    arrival = {}
    for rid, (record, origin) in base.items():
        arrival[rid] = float(rng.random())
        timed.append((arrival[rid], rid, origin, record["text"], record))
    for neg in negatives:
        start = arrival[neg["source_id"]]
        when = start + (1 - start) * float(rng.random())
        record = {**by_id[neg["source_id"]], "gold": neg["gold"]}
        timed.append((when, neg["id"], f"hard negative: {neg['kind']}", neg["text"], record))
    timed.sort(key=lambda t: (t[0], t[1]))
    return [
        {
            "id": rid,
            "origin": origin,
            "text": text,
            "answer": answer_of(record["gold"]),
            "labels": labels_of(record),
        }
        for _, rid, origin, text, record in timed
    ]


def replay(
    requests: list[dict],
    embedder: FixedEmbedder | None,
    threshold: float,
    max_tokens: int | None,
    match_numbers: bool,
) -> list[dict[str, Any]]:
    """Each request against the cache as it stands: a hit answers it, a miss stores it."""
    size = len(requests) + 1  # nothing evicted: the replay measures matching, not the bound
    cache = SemanticCache(":memory:", embedder, threshold, size, max_tokens, match_numbers)
    owner: dict[str, dict] = {}
    outcomes = []
    for request in requests:
        hit = cache.get(request["text"], VERSION)
        if hit is None:
            cache.put(request["text"], VERSION, list(request["answer"]))
            owner.setdefault(text_key(request["text"]), request)
            outcomes.append({"request": request, "hit": None})
            continue
        cached = owner[hit.key]
        wrong = tuple(hit.answer) != request["answer"]
        # Still wrong when any gold label of the clause counts as its type:
        wrong_any = wrong and (
            hit.answer[0] not in request["labels"] or hit.answer[1] != request["answer"][1]
        )
        outcomes.append(
            {"request": request, "hit": hit, "cached": cached, "wrong": wrong, "any": wrong_any}
        )
    cache.close()
    return outcomes


def row_of(threshold: float | None, outcomes: list[dict[str, Any]]) -> CacheRow:
    hits = [o for o in outcomes if o["hit"] is not None]
    wrong = [o for o in hits if o["wrong"]]
    n = len(outcomes)
    return CacheRow(
        threshold=threshold,
        requests=n,
        hits=len(hits),
        exact_hits=sum(o["hit"].kind == "exact" for o in hits),
        similar_hits=sum(o["hit"].kind == "similar" for o in hits),
        wrong_hits=len(wrong),
        hit_rate=wilson(len(hits), n),
        wrong_among_hits=wilson(len(wrong), len(hits)),
        wrong_any_label=wilson(sum(o["any"] for o in wrong), len(hits)),
        added_error=wilson(len(wrong), n),
        wrong_by_origin=dict(sorted(Counter(o["request"]["origin"] for o in wrong).items())),
    )


def choose_default(exact: CacheRow, rows: list[CacheRow], bound: float) -> CacheDefault:
    """The highest hit rate among the thresholds whose wrong-among-hits upper bound is at most
    `bound` (ties: the higher threshold); the exact layer alone when none qualifies."""
    rule = (
        f"highest hit rate with the Wilson 95% upper bound of wrong hits / hits <= {bound:g}; "
        "none: the exact layer alone"
    )
    ok = [
        r
        for r in rows
        if r.hits and r.wrong_among_hits.ci_high is not None and r.wrong_among_hits.ci_high <= bound
    ]
    best = max(ok, key=lambda r: (r.hits, r.threshold), default=None)
    pick = best or exact
    return CacheDefault(
        threshold=pick.threshold,
        hit_rate=pick.hit_rate.value or 0.0,
        hit_rate_ci=[pick.hit_rate.ci_low, pick.hit_rate.ci_high],
        wrong_among_hits=pick.wrong_among_hits,
        added_error=pick.added_error,
        bound_met=best is not None,
        rule=rule,
    )


def run(cfg: CacheEvalConfig, cache: CacheConfig) -> CacheEvalResult:
    """Replay, score every threshold, choose the default, write the report, JSON and PNG."""
    splits = {
        s: [{**r, "split": s} for r in read_jsonl(Path(cfg.prepared_dir) / f"{s}.jsonl")]
        for s in ("train", "test", *cfg.hard_negatives_from)
    }
    requests = build_replay(splits, cfg)
    origins = dict(sorted(Counter(r["origin"] for r in requests).items()))
    log.info("cache_eval: %d requests %s; embedding", len(requests), origins)
    base = SentenceEmbedder(cache.embedder, cache.threads)
    embedder = FixedEmbedder(base, [r["text"] for r in requests])
    max_tokens = cache.max_tokens or base.max_tokens
    long_inputs = sum(n > max_tokens for n in embedder.count_tokens([r["text"] for r in requests]))
    exact_outcomes = replay(requests, None, 1.0, max_tokens, cache.match_numbers)
    exact = row_of(None, exact_outcomes)
    rows, examples = [], {}
    for t in cfg.thresholds:
        outcomes = replay(requests, embedder, t, max_tokens, cache.match_numbers)
        rows.append(row_of(t, outcomes))
        examples[t] = [o for o in outcomes if o["hit"] is not None and o["wrong"]]
    default = choose_default(exact, rows, cfg.max_wrong_upper)
    result = CacheEvalResult(
        default=default,
        exact=exact,
        thresholds=rows,
        replay=origins,
        answer_source="oracle: a miss stores the request's own gold answer",
        embedder=base.name,
        max_tokens=max_tokens,
        long_inputs=long_inputs,
        match_numbers=cache.match_numbers,
        seed=cfg.seed,
    )
    result.save(cfg.metrics)
    write_plot(result, cfg.plot, cfg.max_wrong_upper)
    write_report(result, cfg, examples, cfg.report)
    return result
