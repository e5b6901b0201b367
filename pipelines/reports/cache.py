"""`reports/cache.md` and `reports/cache.png`: the cache evaluation's threshold table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import atomic_open
from ..results import CacheEvalResult, CacheRow, Rate


def pct(rate: Rate) -> str:
    """`12.3% [10.1, 14.8]` (percent, Wilson 95%), or `-` when there was nothing to count."""
    if rate.value is None:
        return "-"
    return f"{100 * rate.value:.1f}% [{100 * rate.ci_low:.1f}, {100 * rate.ci_high:.1f}]"


def _row(r: CacheRow, chosen: float | None) -> str:
    name = "exact only" if r.threshold is None else f"{r.threshold:.2f}"
    if r.threshold == chosen:
        name = f"**{name}** (default)"
    origins = ", ".join(f"{k} {v}" for k, v in r.wrong_by_origin.items()) or "-"
    return (
        f"| {name} | {r.hits} ({r.exact_hits} / {r.similar_hits}) | {pct(r.hit_rate)} | "
        f"{r.wrong_hits} | {pct(r.wrong_among_hits)} | {pct(r.wrong_any_label)} | "
        f"{pct(r.added_error)} | {origins} |"
    )


def _clip(text: str, n: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= n else text[: n - 1] + "…"


def write_report(
    result: CacheEvalResult, cfg: Any, examples: dict[float, list[dict]], path: str | Path
) -> None:
    """The markdown report: how the replay was built, the table, the default, examples."""
    lines = [
        "# Semantic cache: hit rate and wrong hits on real clauses",
        "",
        "Written by the `cache_eval` stage (`temper cache-eval`; docs/cache.md explains it).",
        "",
        _verdict(result, cfg),
        "",
        *_replay_lines(result, cfg),
        *_threshold_lines(result, cfg),
        *_wrong_hit_lines(examples, result.default.threshold),
    ]
    with atomic_open(path) as handle:
        handle.write("\n".join(lines))


def _verdict(result: CacheEvalResult, cfg: Any) -> str:
    """The default threshold and why; when none meets the bound, the closest one, so the
    reader sees how far off the similarity layer is."""
    d = result.default
    chosen = d.threshold
    pick = next((r for r in result.thresholds if r.threshold == chosen), result.exact)
    scored = [r for r in result.thresholds if r.wrong_among_hits.ci_high is not None]
    closest = min(scored, key=lambda r: r.wrong_among_hits.ci_high, default=None)
    nearest = (
        f" The lowest upper bound was {pct(closest.wrong_among_hits)} at {closest.threshold:.2f}."
        if closest is not None
        else ""
    )
    return (
        f"**Default threshold: {chosen:.2f}** (hit rate {pct(pick.hit_rate)}, "
        f"wrong among hits {pct(d.wrong_among_hits)}): the highest hit rate whose wrong-hit "
        f"rate has a Wilson 95% upper bound <= {100 * cfg.max_wrong_upper:g}%."
        if d.bound_met
        else f"**No threshold meets the bound** (Wilson 95% upper bound of wrong hits / hits "
        f"<= {100 * cfg.max_wrong_upper:g}%): the default is the exact layer alone "
        f"(hit rate {pct(result.exact.hit_rate)}).{nearest}"
    )


def _replay_lines(result: CacheEvalResult, cfg: Any) -> list[str]:
    """How the replay was built and what counts as a wrong hit: the numbers mean nothing
    without it."""
    n = result.exact.requests
    origins = ", ".join(f"{k} {v}" for k, v in result.replay.items())
    return [
        "## The replay",
        "",
        f"{n} requests, against an empty cache, in a seeded random arrival order (seed "
        f"{result.seed}; each hard negative arrives after its source): {origins}.",
        "",
        f"- Test split: every clause of `{cfg.prepared_dir}/test.jsonl`.",
        f"- Train near-duplicates: training clauses whose word-3-gram Jaccard with a test or "
        f"another training clause is >= {cfg.near_dup_threshold} (prepare's measure and code; "
        "prepare reports these pairs and, unless `prepare.near_dup.drop_cross_split`, keeps both sides).",
        "- Hard negatives: governing-law clauses with the state swapped for another state, "
        "notice clauses with the number of days changed, dated clauses (effective, expiration, "
        f"agreement date) with the year moved 1-5 years, from the {', '.join(cfg.hard_negatives_from)} "
        "split(s); the gold key term is edited with the clause. A source not otherwise in "
        "the replay is added before its negative.",
        f"- Answers: {result.answer_source}. A hit is wrong when the cached answer differs "
        "from the request's own gold answer (clause type and key term, case and spaces "
        "normalised); without the cache the oracle is never wrong, so the added error is "
        "wrong hits / requests. A real system's added error is at most its wrong hits.",
        "- The exact layer: prepare removed exact duplicates (case and punctuation aside), so "
        f"this replay has {result.exact.hits} verbatim repeats; an exact hit returns what the "
        "same model version answered for the same text: for a deterministic (greedy) system it "
        "adds no error of its own.",
        f"- Embedder {result.embedder}; {result.long_inputs} requests are longer than "
        f"{result.max_tokens} word pieces and never hit on similarity. Numbers guard "
        f"(`cache.match_numbers`): {'on' if result.match_numbers else 'off'} (a similarity "
        "hit needs the same digits and number words in both texts).",
        "- `any gold label`: CUAD labels one span with several clause types and prepare keeps "
        "one as `gold`; this column counts a hit wrong only when the cached type is none of the "
        "clause's labels (`gold_all`) or the key term differs. The rule uses the strict column.",
        "",
    ]


def _threshold_lines(result: CacheEvalResult, cfg: Any) -> list[str]:
    """The table of every threshold (the exact layer first, the default in bold) and the plot."""
    chosen = result.default.threshold
    return [
        "## Every threshold",
        "",
        "Rates in percent with Wilson 95% intervals. Hits: all (exact / similar).",
        "",
        "| threshold | hits | hit rate | wrong hits | wrong among hits | wrong among hits, "
        "any gold label | added error (wrong / requests) | wrong hits by origin |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        _row(result.exact, chosen if chosen is None else -1.0),
        *[_row(r, chosen) for r in result.thresholds],
        "",
        f"![hit rate and wrong-hit rate vs threshold]({Path(cfg.plot).name})",
        "",
    ]


def _wrong_hit_lines(examples: dict[float, list[dict]], chosen: float | None) -> list[str]:
    """The first wrong hits at the default and at 0.95: what a wrong hit looks like."""
    lines: list[str] = []
    shown = sorted({t for t in (chosen, 0.95) if t in examples})
    for t in shown:
        wrong = examples[t][:5]
        lines += [f"## Wrong hits at {t:.2f} (first {len(wrong)} of {len(examples[t])})", ""]
        for o in wrong:
            req, hit = o["request"], o["hit"]
            lines += [
                f"- cos {hit.similarity:.3f}, {req['origin']}: `{_clip(req['text'])}` "
                f"(gold {list(req['answer'])}) served the answer of `{_clip(o['cached']['text'])}` "
                f"({hit.answer})",
            ]
        lines.append("")
    return lines


def write_plot(result: CacheEvalResult, path: str | Path, bound: float) -> None:
    """Hit rate and wrong-hit rate (among hits) vs threshold, with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.thresholds if r.threshold is not None]
    xs = [r.threshold for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, get, colour in (
        ("hit rate", lambda r: r.hit_rate, "tab:blue"),
        ("wrong among hits", lambda r: r.wrong_among_hits, "tab:red"),
    ):
        ys = [get(r).value if get(r).value is not None else float("nan") for r in rows]
        lo = [get(r).ci_low if get(r).ci_low is not None else float("nan") for r in rows]
        hi = [get(r).ci_high if get(r).ci_high is not None else float("nan") for r in rows]
        ax.plot(xs, ys, marker="o", ms=3, label=label, color=colour)
        ax.fill_between(xs, lo, hi, alpha=0.2, color=colour)
    if result.default.threshold is not None:
        ax.axvline(result.default.threshold, ls="--", color="grey", label="default")
    ax.axhline(bound, ls=":", color="tab:red", lw=1, label=f"bound {100 * bound:g}%")
    ax.set_xlabel("cosine threshold")
    ax.set_ylabel("rate (Wilson 95%)")
    ax.set_title(f"semantic cache replay ({result.exact.requests} requests)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
