"""What `temper monitor report` checks: traffic, quality (judge, human, CUSUM), drift, probes.

`run_checks` reads the monitor store and the files the offline stages wrote (the prepared
reference texts, the evaluated answers, metrics/eval.json) and returns one `MonitorResult`:
the report, its plots, the gauges and the exit code are all made from it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from ...config import ConfigError
from ...io import read_jsonl
from ...results import EvalResult, ResultError
from ...task import TaskConfig
from . import cusum, drift
from .config import MonitorConfig
from .judge import judged_errors, spent, wilson, windows
from .review import agreement
from .store import LoggedRequest, MonitorStore

log = logging.getLogger("temper.monitor")


class MonitorResult(BaseModel):
    """`reports/monitor/report.json`."""

    generated: float
    requests: int
    traffic: dict[str, Any]
    quality: dict[str, Any]
    drift: list[dict[str, Any]] = Field(default_factory=list)
    drift_skipped: list[str] = Field(default_factory=list)
    probes: dict[str, dict[str, Any]] = Field(default_factory=dict)
    judge: dict[str, Any]
    alarms: list[str]


def traffic_windows(rows: list[LoggedRequest], hours: float) -> list[dict[str, Any]]:
    """Requests, tier and cache shares and latency per window of `hours`."""
    if not rows:
        return []
    width, start = hours * 3600, rows[0].ts
    slots: dict[int, list[LoggedRequest]] = {}
    for r in rows:
        slots.setdefault(int((r.ts - start) // width), []).append(r)
    out = []
    for k, group in sorted(slots.items()):
        ok = [r for r in group if r.status == 200]
        lat = [r.latency_ms for r in ok if r.latency_ms is not None]
        tiers: dict[str, int] = {}
        for r in ok:
            tiers[r.tier or "none"] = tiers.get(r.tier or "none", 0) + 1
        out.append(
            {
                "start": start + k * width,
                "requests": len(group),
                "tier_share": {t: c / len(ok) for t, c in sorted(tiers.items())},
                "latency_ms_p50": float(np.percentile(lat, 50)) if lat else None,
                "latency_ms_p95": float(np.percentile(lat, 95)) if lat else None,
            }
        )
    return out


def traffic(rows: list[LoggedRequest], hours: float = 24.0) -> dict[str, Any]:
    n = len(rows)
    answered = [r for r in rows if r.status == 200]
    tiers: dict[str, int] = {}
    for r in answered:
        tiers[r.tier or "none"] = tiers.get(r.tier or "none", 0) + 1
    lat = np.array([r.latency_ms for r in answered if r.latency_ms is not None], float)
    errors = sum(1 for r in rows if (r.status or 0) >= 500)
    return {
        "requests": n,
        "answered": len(answered),
        "server_errors": errors,
        "error_rate": errors / n if n else None,
        "tier_share": {k: v / len(answered) for k, v in sorted(tiers.items())} if answered else {},
        "cache_share": sum(r.cache is not None for r in answered) / len(answered)
        if answered
        else None,
        "latency_ms_p50": float(np.percentile(lat, 50)) if lat.size else None,
        "latency_ms_p95": float(np.percentile(lat, 95)) if lat.size else None,
        "prompt_tokens": int(sum(r.prompt_tokens or 0 for r in rows)),
        "completion_tokens": int(sum(r.completion_tokens or 0 for r in rows)),
        "windows": traffic_windows(rows, hours),
        "first": rows[0].ts if rows else None,
        "last": rows[-1].ts if rows else None,
    }


def baseline_accuracy(cfg: MonitorConfig, task: TaskConfig) -> float:
    if cfg.quality.baseline_accuracy is not None:
        return cfg.quality.baseline_accuracy
    path = cfg.drift.eval_file
    try:
        ev = EvalResult.load(path)
    except ResultError as err:
        raise ConfigError(
            f"monitor.quality.baseline_accuracy is null and {err}; set it, or run `dvc repro`"
        ) from None
    if ev.winner is None:
        raise ConfigError(f"{path}: no winner; set monitor.quality.baseline_accuracy")
    value = ev.candidates[ev.winner].metrics[ev.primary_metric].value
    if value is None or not 0 < value < 1:
        raise ConfigError(f"{path}: the winner's {ev.primary_metric} is {value}; set it by hand")
    return float(value)


def quality(cfg: MonitorConfig, task: TaskConfig, store: MonitorStore) -> dict[str, Any]:
    q = cfg.quality
    base = baseline_accuracy(cfg, task)
    agree = agreement(cfg, store)
    out: dict[str, Any] = {"baseline_accuracy": base, "rule": q.rule, "agreement": agree.as_dict()}
    for source in ("judge", "human"):
        ws = windows(store, cfg.judge.window_hours, source)
        out[f"{source}_windows"] = [
            {
                "start": w.start,
                "judged": w.judged,
                "correct": w.correct,
                "unsure": w.unsure,
                "accuracy": w.accuracy,
                "low": w.interval()[0],
                "high": w.interval()[1],
            }
            for w in ws
        ]
    errors = judged_errors(store, "judge")
    n, wrong = len(errors), sum(e for _, e, _ in errors)
    out["judged"], out["judged_accuracy"] = n, (n - wrong) / n if n else None
    out["judged_interval"] = list(wilson(n - wrong, n))
    out["calibrated"] = agree.calibrated(n - wrong, n)
    if not errors:
        return out
    span_days = max((errors[-1][0] - errors[0][0]) / 86400, 1.0)
    per_day = q.judged_per_day or n / span_days
    p0 = 1 - base
    p1 = min(p0 + q.detect_drop, 0.999)
    flags = [e for _, e, _ in errors]
    if q.rule in ("cusum", "both"):
        chart = cusum.design(p0, p1, per_day, q.false_alarms_per_year)
        path = chart.path(flags)
        first = chart.first_alarm(flags)
        out["cusum"] = {
            "p0": p0,
            "p1": p1,
            "h": chart.h,
            "judged_per_day": per_day,
            "false_alarms_per_year": q.false_alarms_per_year,
            "statistic": float(path[-1]),
            "path": [round(float(x), 4) for x in path],
            "times": [t for t, _, _ in errors],
            "alarm": first is not None,
            "alarm_at": errors[first][0] if first is not None else None,
            "alarm_request": errors[first][2] if first is not None else None,
        }
    if q.rule in ("weekly", "both"):
        week = 7 * 86400
        start = errors[0][0]
        sizes: dict[int, list[int]] = {}
        for t, e, _ in errors:
            slot = sizes.setdefault(int((t - start) // week), [0, 0])
            slot[0] += int(e)
            slot[1] += 1
        keys = sorted(sizes)
        alarms = cusum.weekly_rule(
            [sizes[k][0] for k in keys],
            [sizes[k][1] for k in keys],
            baseline_accuracy=base,
            drop=q.detect_drop,
        )
        out["weekly"] = {
            "weeks": [
                {"week": k, "judged": sizes[k][1], "errors": sizes[k][0], "alarm": bool(a)}
                for k, a in zip(keys, alarms, strict=True)
            ],
            "alarm": bool(alarms and alarms[-1]),
        }
    return out


def reference_texts(cfg: MonitorConfig) -> tuple[list[str], list[str]]:
    """The reference's texts and their groups (contracts): the drift tests' null compares a
    window with *new contracts* of the reference's kind, not with its own rows (docs/monitor.md)."""
    texts, groups = [], []
    for name in cfg.drift.reference:
        path = Path(name)
        if not path.exists():
            raise ConfigError(f"monitor.drift.reference: {path} does not exist (run `dvc repro`)")
        for i, row in enumerate(read_jsonl(path), 1):
            if "text" not in row:
                raise ConfigError(f"{path}:{i}: field 'text' missing")
            texts.append(str(row["text"]))
            groups.append(str(row.get("group", f"{path}:{i}")))
    rng = np.random.default_rng(cfg.drift.seed)
    if len(texts) > cfg.drift.max_reference:
        idx = sorted(rng.choice(len(texts), cfg.drift.max_reference, replace=False).tolist())
        texts, groups = [texts[i] for i in idx], [groups[i] for i in idx]
    return texts, groups


def reference_embeddings(cfg: MonitorConfig, embedder: Any) -> tuple[np.ndarray, list[str]]:
    """The reference texts' embeddings (cached beside the report, keyed by texts and model)
    and their groups."""
    texts, groups = reference_texts(cfg)
    key = hashlib.sha256("\n".join([embedder.name, *texts]).encode()).hexdigest()[:16]
    cache = Path(cfg.report_dir) / f"reference-{key}.npy"
    if cache.exists():
        return np.load(cache), groups
    vectors = np.asarray(embedder.embed(texts), np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, vectors)
    tmp.replace(cache)
    return vectors, groups


def reference_predictions(cfg: MonitorConfig) -> list[dict[str, Any]]:
    path = Path(cfg.drift.reference_predictions)
    if path.is_dir():
        ev = EvalResult.load(cfg.drift.eval_file)
        if ev.winner is None:
            raise ConfigError(f"{cfg.drift.eval_file}: no winner to compare the answers with")
        path = path / f"{ev.winner}.jsonl"
    if not path.exists():
        raise ConfigError(f"monitor.drift.reference_predictions: {path} does not exist")
    return read_jsonl(path)


def output_drift(
    cfg: MonitorConfig, task: TaskConfig, rows: list[LoggedRequest]
) -> list[drift.DriftTest]:
    field = task.label_field()
    preds = reference_predictions(cfg)
    ref_labels = [str((p.get("answer") or {}).get(field)) for p in preds if field]
    ref_conf = [
        v
        for p in preds
        if (
            v := min(
                (c for c in (p.get("confidence") or {}).values() if c is not None), default=None
            )
        )
        is not None
    ]
    mine = [r for r in rows if r.status == 200 and r.labels]
    out = []
    if field and mine:
        out.append(
            drift.label_drift(
                ref_labels, [str(r.labels.get(field)) for r in mine], alpha=cfg.drift.alpha
            )
        )
    conf = [r.confidence for r in mine if r.confidence is not None and r.tier == "self"]
    if ref_conf and len(conf) >= 10:
        out.append(drift.confidence_drift(ref_conf, conf, alpha=cfg.drift.alpha))
    return out


def run_checks(
    cfg: MonitorConfig,
    task: TaskConfig,
    store: MonitorStore,
    embedder: Any = None,
    probes: dict[str, tuple[float | None, float, bool]] | None = None,
) -> MonitorResult:
    """Every check on the store as it is now (`embedder`: for input drift; None: skipped)."""
    rows = store.requests()
    window = store.requests(limit=cfg.drift.window, newest=True)
    tests: list[drift.DriftTest] = []
    skipped: list[str] = []
    vectors = [r.embedding for r in window if r.embedding is not None]
    if embedder is None:
        skipped.append("input drift: no embedder")
    elif len(vectors) < cfg.drift.window // 2:
        skipped.append(
            f"input drift: {len(vectors)} embedded requests, need {cfg.drift.window // 2}"
        )
    else:
        ref, groups = reference_embeddings(cfg, embedder)
        tests += drift.input_drift(
            ref,
            np.stack(vectors),
            reference_groups=groups,
            max_reference=cfg.drift.max_reference,
            alpha=cfg.drift.alpha,
            seed=cfg.drift.seed,
            permutations=cfg.drift.permutations,
        )
    try:
        tests += output_drift(cfg, task, window)
    except (ConfigError, ResultError) as err:
        skipped.append(f"output drift: {err}")
    qual = quality(cfg, task, store)
    alarms = [f"drift:{t.name}" for t in tests if t.alarm]
    if qual.get("cusum", {}).get("alarm"):
        alarms.append("quality:cusum")
    if qual.get("weekly", {}).get("alarm"):
        alarms.append("quality:weekly")
    probe_out = {
        tier: {"agreement": a, "p_value": p, "alarm": alarm}
        for tier, (a, p, alarm) in (probes or {}).items()
    }
    alarms += [f"probe:{tier}" for tier, v in probe_out.items() if v["alarm"]]
    return MonitorResult(
        generated=time.time(),
        requests=len(rows),
        traffic=traffic(rows, cfg.judge.window_hours),
        quality=qual,
        drift=[t.as_dict() for t in tests],
        drift_skipped=skipped,
        probes=probe_out,
        judge={"spent_usd": spent(store), "budget_usd": cfg.judge.provider.max_usd},
        alarms=alarms,
    )
