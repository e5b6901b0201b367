"""`temper monitor probe`: a fixed set of real clauses asked of each API tier, to see a vendor's
quiet model update before it degrades the fallback.

The probe set is a seeded sample of prepared validation clauses, the same every run. Each run's
answers are stored; the first run of a tier is its reference. A later run repeating fewer of
the reference's labels than chance allows alarms: under no change each probe repeats with
probability `expected_agreement` (temperature 0 is not exactly deterministic at the vendors),
so the agreements are Binomial(n, expected) and the p-value is its lower tail. Each run asks
afresh: the prompt version carries the run id, so the provider cache cannot answer a probe
with an earlier run's reply. The question is the router's own (`teacher.label_one`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...config import ConfigError
from ...io import read_jsonl
from ...providers import open_provider
from ...task import TaskConfig, parse_answer
from ...teacher import label_one
from ..route.config import RouteConfig, TierConfig
from .config import ProbeConfig
from .store import MonitorStore


def probe_set(cfg: ProbeConfig) -> list[tuple[str, str]]:
    """(id, text) of the probe clauses."""
    path = Path(cfg.source)
    if not path.exists():
        raise ConfigError(f"monitor.probe.source: {path} does not exist (run `dvc repro prepare`)")
    rows = read_jsonl(path)
    for i, r in enumerate(rows, 1):
        if "id" not in r or "text" not in r:
            raise ConfigError(f"{path}:{i}: a prepared record needs 'id' and 'text'")
    rng = np.random.default_rng(cfg.seed)
    pick = sorted(rng.choice(len(rows), size=min(cfg.size, len(rows)), replace=False).tolist())
    return [(str(rows[i]["id"]), str(rows[i]["text"])) for i in pick]


def labels_of(task: TaskConfig, answer: str | None) -> str | None:
    """The label fields of an answer as one comparable string (None: no usable answer)."""
    parsed = parse_answer(answer) if answer else None
    if not isinstance(parsed, dict):
        return None
    names = [f.name for f in task.fields if f.kind == "label"] or [f.name for f in task.fields]
    return "|".join(str(parsed.get(n)) for n in names)


@dataclass(frozen=True)
class ProbeResult:
    tier: str
    run: str
    n: int
    answered: int
    agree: int | None  # with the reference run (None: this run is the reference)
    agreement: float | None
    p_value: float | None
    alarm: bool
    usd: float

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def compare(
    cfg: ProbeConfig, task: TaskConfig, reference: dict[str, str | None], now: dict[str, str | None]
) -> tuple[int, int, float]:
    """(agreements, probes compared, p-value) of a run against the reference run."""
    from scipy.stats import binom

    ids = [i for i in reference if i in now and reference[i] is not None]
    agree = sum(labels_of(task, now[i]) == labels_of(task, reference[i]) for i in ids)
    p = float(binom.cdf(agree, len(ids), cfg.expected_agreement)) if ids else 1.0
    return agree, len(ids), p


async def _ask(tier: TierConfig, task: TaskConfig, probes, run: str):
    provider = open_provider(tier.provider)
    version = f"{task.prompt_hash}:probe:{run}"
    try:
        outs = await asyncio.gather(
            *[
                label_one(provider, task, {"text": t}, task.teacher_messages([], t), True, version)
                for _, t in probes
            ]
        )
    finally:
        await provider.aclose()
        provider.close()
    answers, usd = {}, 0.0
    for (pid, _), out in zip(probes, outs, strict=True):
        usd += sum(r.usd for r in out.replies if not r.cached)
        answers[pid] = (
            (task.format_answer(out.answer), None)
            if out.answer is not None
            else (None, (out.reason or "no answer")[:300])
        )
    return answers, usd


def run_probe(
    cfg: ProbeConfig,
    route: RouteConfig,
    task: TaskConfig,
    store: MonitorStore,
    tiers: list[str] | None = None,
) -> list[ProbeResult]:
    """Ask every API tier (or those named) the probe set; compare with each one's reference."""
    chosen = [t for t in route.tiers if tiers is None or t.name in tiers]
    if tiers:
        unknown = sorted(set(tiers) - {t.name for t in route.tiers})
        if unknown:
            raise ConfigError(f"--tier {unknown}: route.tiers has {[t.name for t in route.tiers]}")
    if not chosen:
        raise ConfigError("route.tiers: no API tier to probe")
    gold = [t.name for t in chosen if t.provider.kind == "gold"]
    if gold:
        raise ConfigError(
            f"route tiers {gold} are `gold` (the offline oracle): there is no vendor to probe; "
            "configure real tiers (openai / anthropic) in route.tiers"
        )
    probes = probe_set(cfg)
    run = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    results = []
    for tier in chosen:
        earlier = store.probe_runs(tier.name)
        answers, usd = asyncio.run(_ask(tier, task, probes, run))
        store.add_probes(run, tier.name, answers)
        now = {pid: a for pid, (a, _) in answers.items()}
        answered = sum(a is not None for a in now.values())
        if not earlier:
            results.append(
                ProbeResult(tier.name, run, len(probes), answered, None, None, None, False, usd)
            )
            continue
        agree, n, p = compare(cfg, task, earlier[0][1], now)
        results.append(
            ProbeResult(
                tier.name,
                run,
                len(probes),
                answered,
                agree,
                agree / n if n else None,
                p,
                p < cfg.alpha,
                usd,
            )
        )
    return results


def latest(cfg: ProbeConfig, route: RouteConfig, task: TaskConfig, store: MonitorStore):
    """Each probed tier's last run against its reference: {tier: (agreement, p, alarm)}."""
    out = {}
    for tier in route.tiers:
        runs = store.probe_runs(tier.name)
        if len(runs) < 2:
            continue
        agree, n, p = compare(cfg, task, runs[0][1], runs[-1][1])
        out[tier.name] = (agree / n if n else None, p, p < cfg.alpha)
    return out
