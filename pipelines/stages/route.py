"""The route stage: fit the self tier's confidence threshold, then replay the test split
through the routing policy `temper serve` uses, and price it against sending everything to
an API.

Inputs: `metrics/eval.json` (the winner), `reports/predictions/validation/<winner>.jsonl`
(its answers and label confidences on validation: the threshold is fitted there) and
`reports/predictions/<winner>.jsonl` (the test split: reported there), the price table.
Outputs: `reports/route.json` (`results.RouteResult`), `reports/route.md`,
`reports/route_curve.png` (accuracy vs self share).

Fit (`route.calibrate`): target `accuracy` takes the lowest threshold whose kept answers'
one-sided Clopper-Pearson lower bound reaches `target_accuracy` (the most traffic the self
tier can keep while provably accurate enough); `self_share` the threshold that keeps that
share. Replay: each test answer goes to `Policy.pick(confidence)` (temper.online.route.policy,
the function the server calls). A tier of kind `gold` answers with the gold label: an oracle,
an upper bound on what an API tier can add, named so in every figure; a real tier (openai,
anthropic) is asked the test clauses the policy sends it, as serve asks them (cached by the
provider layer, within its budget), and scored on its answers. Cost per answer: the
self tier's measured machine cost per answer (evaluate); an API answer is priced at its
`price_as` model (the price table) for the teacher's prompt and the answer, chars/4 tokens,
the shared prefix at the cached price when it is long enough for the vendor to cache.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import beta

from ..errors import TemperError
from ..evaluation.metrics import Resamples, estimate, mean_stats
from ..io import read_jsonl
from ..online.route.config import SELF, RouteConfig, TierConfig
from ..online.route.policy import Policy, decisive_confidence
from ..online.route.tiers import ApiTier, TierAnswer, TierFailure
from ..providers.prices import load_prices
from ..results import EvalResult, RouteResult
from ..stats import percentile
from ..task import TaskConfig
from ..teacher import normalise

log = logging.getLogger(__name__)
CHARS_PER_TOKEN = 4.0  # OpenAI's rule of thumb for English; the vendors' tokenizers differ


class RouteError(TemperError, ValueError):
    """The route stage cannot run on these inputs (the message names the file)."""


def lower_bound(k: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson lower bound of a proportion k/n (0 for k = 0)."""
    return float(beta.ppf(1 - confidence, k, n - k + 1)) if k else 0.0


def keep_share(conf: np.ndarray, share: float) -> float:
    """The threshold that keeps at least `share` of the answers (the most confident ones)."""
    ranked = np.sort(conf)[::-1]
    k = max(1, int(np.ceil(share * len(ranked) - 1e-9)))
    return float(ranked[k - 1])


def fit_threshold(conf: np.ndarray, correct: np.ndarray, cfg: RouteConfig) -> tuple[float, bool]:
    """(threshold, whether the target was reached) on the fitting split."""
    c = cfg.calibrate
    if c.target == "self_share":
        if len(conf) == 0:
            return 1.0, False
        return keep_share(conf, c.target_self_share), True
    for t in np.unique(conf):  # ascending: the first that qualifies keeps the most
        kept = conf >= t
        if lower_bound(int(correct[kept].sum()), int(kept.sum()), c.confidence) >= (
            c.target_accuracy
        ):
            return float(t), True
    return 1.0, False  # nothing qualifies: only certain answers stay


def rows_of(
    path: Path, field: str | None, metric: str
) -> tuple[list[dict], np.ndarray, np.ndarray]:
    if not path.exists():
        raise RouteError(f"{path}: not found (the evaluate stage writes it)")
    rows = read_jsonl(path)
    conf = [decisive_confidence(r.get("confidence") or {}, field) for r in rows]
    correct = [float(r.get("scores", {}).get(metric, 0.0)) for r in rows]
    return rows, np.array([0.0 if c is None else c for c in conf]), np.array(correct)


def api_cost(
    task: TaskConfig, tier: TierConfig, prices: Any, rows: list[dict], texts: list[str]
) -> np.ndarray:
    """USD per answer if this tier answered each row (the teacher's prompt, the gold answer)."""
    name = tier.price_as or tier.provider.model
    price = prices.model(name) if name in prices.models else tier.provider.prices.get(name)
    if price is None:
        raise RouteError(
            f"route.tiers.{tier.name}: no price for {name!r} (set price_as to a model of "
            "route.calibrate.prices, or give provider.prices)"
        )
    prefix = len(task.system_message(with_labels=True)) / CHARS_PER_TOKEN
    cached = prefix if prefix >= (getattr(price, "min_cached_prefix", None) or 0) else 0.0
    out = []
    for r, text in zip(rows, texts, strict=True):
        total = len(task.user_message(text)) / CHARS_PER_TOKEN + prefix
        answer = task.format_answer(task.gold_answer(r))
        uncached = total - (cached if getattr(price, "cached_input", None) is not None else 0)
        usd = price.cost(uncached, len(answer) / CHARS_PER_TOKEN)
        if uncached < total:
            usd += (total - uncached) * price.cached_input / 1e6
        out.append(usd)
    return np.array(out)


def test_texts(test_file: str, rows: list[dict]) -> list[str]:
    """The clause text of each prediction row (the rows hold answers, not inputs)."""
    if not Path(test_file).exists():
        raise RouteError(f"{test_file}: not found (the test split evaluate scored)")
    by_id = {r["id"]: r.get("text") or "" for r in read_jsonl(test_file)}
    missing = [r["id"] for r in rows if r["id"] not in by_id]
    if missing:
        raise RouteError(f"{test_file}: no record for predictions {missing[:5]}")
    return [by_id[r["id"]] for r in rows]


def replay(
    tiers: list[str],
    correct: np.ndarray,
    costs: dict[str, np.ndarray],
    tier_right: dict[str, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """(correct per row, USD per row) when row i is answered by `tiers[i]`; an API tier
    without measured answers in `tier_right` is the oracle (always right)."""
    n = len(tiers)
    right = np.array(
        [correct[i] if t == SELF else tier_right.get(t, np.ones(n))[i] for i, t in enumerate(tiers)]
    )
    usd = np.array([costs[t][i] for i, t in enumerate(tiers)])
    return right, usd


def ask_tier(
    tier: TierConfig, task: TaskConfig, texts: list[str], gold: list[Any], label: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """A real API tier's answers to `texts`, asked as serve asks it (`ApiTier`, through the
    provider layer's cache and budget): (right per text, USD per text, failures). A failure
    (error, timeout, cap, invalid answer) counts as a wrong answer that cost nothing new."""
    api = ApiTier(tier)

    async def one(text: str) -> TierAnswer | None:
        try:
            return await api.ask(task, text)
        except TierFailure:
            return None

    async def main() -> list[TierAnswer | None]:
        try:
            return await asyncio.gather(*(one(t) for t in texts))
        finally:
            await api.aclose()

    answers = asyncio.run(main())
    right = [
        float(a is not None and normalise(a.answer.get(label)) == normalise(g))
        for a, g in zip(answers, gold, strict=True)
    ]
    usd = [a.usd if a is not None else 0.0 for a in answers]
    return np.array(right), np.array(usd), sum(a is None for a in answers)


def curve(conf: np.ndarray, correct: np.ndarray, points: int = 41) -> list[dict[str, float]]:
    """Accuracy (oracle-deferred) and kept accuracy against the self tier's share."""
    out = []
    for share in np.linspace(0, 1, points):
        t = keep_share(conf, share) if share and len(conf) else 1.01
        kept = conf >= t
        acc = float(np.where(kept, correct, 1.0).mean()) if len(conf) else float("nan")
        out.append(
            {
                "threshold": round(min(t, 1.0), 6),
                "self_share": float(kept.mean()) if len(conf) else 0.0,
                "accuracy": acc,
                "kept_accuracy": float(correct[kept].mean()) if kept.any() else float("nan"),
            }
        )
    return out


def latency_percentile(
    values: np.ndarray, mask: np.ndarray, q: float, rs: Resamples
) -> dict | None:
    """The q-th percentile of `values` where `mask`, with its bootstrap interval."""
    if not mask.any():
        return None
    stats = []
    for idx in rs.idx:
        picked = values[idx][mask[idx] > 0]
        stats.append(percentile(picked, q) if picked.size else np.nan)
    return estimate(float(percentile(values[mask > 0], q)), np.array(stats), rs)


@dataclass
class Split:
    """One split's rows of the winner's predictions, its confidences and right/wrong."""

    rows: list[dict[str, Any]]
    conf: np.ndarray
    right: np.ndarray


def run(cfg: RouteConfig, task: TaskConfig) -> RouteResult:
    """Fit, replay, price and report; returns what `reports/route.json` holds."""
    c = cfg.calibrate
    ev = EvalResult.load(c.eval)
    winner = ev.winner or (ev.selection.chosen if ev.selection else None)
    if winner is None:
        raise RouteError(f"{c.eval}: no winner to route for (no candidate passed the gates)")
    test, fit, fitted_on = read_splits(cfg, winner, ev.primary_metric)
    threshold, reached = fit_threshold(fit.conf, fit.right, cfg)
    tiers = [Policy.from_config(cfg, threshold).pick(float(x)) for x in test.conf]
    prices = load_prices(c.prices)
    texts = test_texts(ev.test_file, test.rows)
    self_usd = ev.candidates[winner].metrics["usd_per_1k"].value / 1000
    costs = {SELF: np.full(len(test.rows), self_usd)}
    for tier in cfg.tiers:
        costs[tier.name] = api_cost(task, tier, prices, test.rows, texts)
    all_api = {t.name: float(costs[t.name].mean() * 1000) for t in cfg.tiers}  # list prices
    tier_right, failures = ask_api_tiers(cfg, task, tiers, test, texts, costs, ev.primary_metric)
    right, usd = replay(tiers, test.right, costs, tier_right)
    rs = Resamples.draw(len(test.rows), c.n_resamples, c.seed, c.confidence)
    result = RouteResult(
        winner=winner,
        passed_gates=ev.winner is not None,
        oracle=all(t.provider.kind == "gold" for t in cfg.tiers),
        fitted_on=fitted_on,
        target=c.target,
        target_value=c.target_accuracy if c.target == "accuracy" else c.target_self_share,
        target_reached=reached,
        threshold=threshold,
        n_fit=len(fit.conf),
        n_test=len(test.rows),
        all_api_usd_per_1k=all_api,
        self_usd_per_1k=self_usd * 1000,
        api_failures=failures,
        prices={t.name: t.price_as or t.provider.model for t in cfg.tiers},
        prices_verified=prices.verified,
        prices_as_of=str(prices.as_of),
        curve_fit=curve(fit.conf, fit.right),
        curve_test=curve(test.conf, test.right),
        **estimates(cfg, tiers, test, right, usd, rs),
    )
    from ..reports.route import write_route_reports

    result.save(Path(c.reports_dir) / "route.json")
    write_route_reports(result, Path(c.reports_dir))
    log.info(
        "route: threshold %.3f, self share %.2f, accuracy %.3f",
        threshold,
        result.shares[SELF],
        result.accuracy.value,
    )
    return result


def read_splits(cfg: RouteConfig, winner: str, metric: str) -> tuple[Split, Split, str]:
    """The winner's test predictions, and those the threshold is fitted on: validation, or
    the test split itself (optimistic, with a warning) when evaluate wrote none."""
    pred_dir = Path(cfg.calibrate.predictions_dir)
    test = Split(*rows_of(pred_dir / f"{winner}.jsonl", cfg.field, metric))
    val_path = pred_dir / "validation" / f"{winner}.jsonl"
    if not val_path.exists():
        log.warning("%s not found: fitting on the test split (optimistic)", val_path)
        return test, test, "test"
    return test, Split(*rows_of(val_path, cfg.field, metric)), "validation"


def ask_api_tiers(
    cfg: RouteConfig,
    task: TaskConfig,
    tiers: list[str],
    test: Split,
    texts: list[str],
    costs: dict[str, np.ndarray],
    metric: str,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Ask each API tier the requests routed to it (the gold tier is the oracle: always
    right, priced at `price_as`); `costs` becomes what the answers really cost (cache hits:
    0). Returns right/wrong per tier and its failures."""
    label = metric.split(".")[0]
    tier_right: dict[str, np.ndarray] = {}
    failures: dict[str, int] = {}
    for tier in cfg.tiers:
        if tier.provider.kind == "gold":
            continue
        idx = [i for i, t in enumerate(tiers) if t == tier.name]
        tier_right[tier.name] = np.zeros(len(tiers))
        got, spent, failures[tier.name] = ask_tier(
            tier,
            task,
            [texts[i] for i in idx],
            [(test.rows[i].get("gold") or {}).get(label) for i in idx],
            label,
        )
        tier_right[tier.name][idx] = got
        costs[tier.name][idx] = spent
    return tier_right, failures


def estimates(
    cfg: RouteConfig,
    tiers: list[str],
    test: Split,
    right: np.ndarray,
    usd: np.ndarray,
    rs: Resamples,
) -> dict[str, Any]:
    """The replay's figures with bootstrap intervals: shares, accuracy, price, latency."""
    names = [SELF, *(t.name for t in cfg.tiers)]
    is_tier = {n: np.array([t == n for t in tiers], float) for n in names}
    kept = is_tier[SELF]
    latency = np.array([r.get("latency_ms") or np.nan for r in test.rows])
    return {
        "tiers": names,
        "shares": {n: float(v.mean()) for n, v in is_tier.items()},
        "share_estimates": {
            n: estimate(v.mean(), mean_stats(v, rs), rs) for n, v in is_tier.items()
        },
        "accuracy": estimate(right.mean(), mean_stats(right, rs), rs),
        "self_only_accuracy": estimate(test.right.mean(), mean_stats(test.right, rs), rs),
        "kept_accuracy": estimate(
            test.right[kept > 0].mean() if kept.any() else np.nan,
            mean_stats(test.right, rs, kept),
            rs,
        ),
        "usd_per_1k": estimate(usd.mean() * 1000, mean_stats(usd, rs) * 1000, rs),
        "self_latency_ms_p50": latency_percentile(latency, kept, 50, rs),
        "self_latency_ms_p95": latency_percentile(latency, kept, 95, rs),
    }
