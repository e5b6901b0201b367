"""Scoring answers: per-example scores, metrics with intervals, paired deltas, costs.

Per task field, by its kind (`field_scores.py`): label fields get exact and any-of-gold
accuracy, macro-F1 and per-class precision/recall; multi-label fields exact-set accuracy,
micro- and sample-F1; text fields exact match and ROUGE-1/2/L/Lsum on the examples with a
reference; number fields exact and within-tolerance; boolean fields accuracy; list fields set F1. An answer with no JSON object lowers
`json_valid_rate` and is wrong on every field; one that parses but breaks the schema (an
unknown label, a missing field) lowers `schema_valid_rate`, and its fields are still read (an
unknown label is never right). Every metric gets a percentile-bootstrap interval; every
candidate-minus-baseline difference a paired one (the same resamples for both systems).

Latency is per request: each answer's own time from its batch's start to the step that
finished it (`latency_ms_mean`, `latency_ms_p50`, `latency_ms_p95`). The batch's wall time per
example is reported apart as `latency_ms_amortised`: a throughput figure, not a latency.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..stats import percentile
from ..task import TaskConfig
from .config import EvaluateConfig
from .field_scores import field_value, score_field
from .field_scores import metric_names as field_metric_names
from .metrics import (
    Resamples,
    estimate,
    macro_f1_stats,
    mean_stats,
    percentile_stats,
    ratio_stats,
)


def answer_fields(task: TaskConfig, text: str | None) -> dict[str, Any]:
    """Parse a reply: the parsed answer (or None), whether it is JSON at all (`json_ok`),
    whether it fits the schema (`valid`: fields, types, allowed labels) and the problems."""
    answer = task.parse(text)
    missing = "empty reply" if task.is_text else "no JSON object found"
    problems = task.validate_answer(answer) if answer is not None else [missing]
    return {
        "answer": answer,
        "json_ok": answer is not None,
        "valid": not problems,
        "problems": problems,
    }


def per_example(
    task: TaskConfig,
    records: list[dict[str, Any]],
    preds: list[dict[str, Any]],
    references: dict[str, list[Any]],
) -> dict[str, Any]:
    """Per-example score arrays (what the bootstrap resamples) and per-class point metrics."""
    out: dict[str, Any] = {
        # json_valid_rate: the reply holds a JSON object (what "valid JSON" gates look at);
        # schema_valid_rate: it also has exactly the schema's fields, types and labels.
        "json_valid_rate": np.array([p["json_ok"] for p in preds], float),
        "schema_valid_rate": np.array([p["valid"] for p in preds], float),
    }
    masks: dict[str, np.ndarray] = {}
    extra: dict[str, Any] = {}
    ratios: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for field in task.fields:
        if field.name not in references:
            continue
        values = [field_value(p, field) for p in preds]
        scored = score_field(field, records, values, references[field.name])
        out.update(scored.scores)
        masks.update(scored.masks)
        extra.update(scored.extra)
        ratios.update(scored.ratios)
    latency = [p.get("latency_ms") for p in preds]
    if all(v is not None for v in latency):
        out["latency_ms_mean"] = np.array(latency, float)
        extra["latency_ms"] = np.array(latency, float)  # for the percentiles
    amortised = [p.get("amortised_ms") for p in preds]
    if all(v is not None for v in amortised):
        out["latency_ms_amortised"] = np.array(amortised, float)
    return {"scores": out, "masks": masks, "extra": extra, "ratios": ratios}


def system_stats(ex: dict[str, Any], rs: Resamples) -> dict[str, tuple[float, np.ndarray]]:
    """(point, resampled values) of every metric of one system."""
    stats = {}
    for key, values in ex["scores"].items():
        mask = ex["masks"].get(key)
        point = (
            float(values[mask].mean())
            if mask is not None and mask.any()
            else (float(values.mean()) if mask is None else float("nan"))
        )
        stats[key] = (point, mean_stats(values, rs, mask))
    for key, (pred, gold) in (
        (k[: -len(".labels")], v) for k, v in ex["extra"].items() if k.endswith(".labels")
    ):
        stats[f"{key}.macro_f1"] = macro_f1_stats(pred, gold, rs)
    for key, (num, den) in ex.get("ratios", {}).items():  # micro-F1: a ratio of sums
        stats[key] = ratio_stats(num, den, rs)
    if "latency_ms" in ex["extra"]:
        # Per-request percentiles: each answer's own time, as its caller would see it.
        latency = ex["extra"]["latency_ms"]
        for q in (50, 95):
            stats[f"latency_ms_p{q}"] = (
                float(percentile(latency, q)),
                percentile_stats(latency, q, rs),
            )
    return stats


def score_system(
    task: TaskConfig,
    records: list[dict[str, Any]],
    preds: list[dict[str, Any]],
    references: dict[str, list[Any]],
    rs: Resamples,
    cost: dict[str, float],
) -> tuple[dict[str, Any], dict[str, tuple[float, np.ndarray]], dict[str, Any]]:
    ex = per_example(task, records, preds, references)
    stats = system_stats(ex, rs)
    metrics = {k: estimate(p, s, rs) for k, (p, s) in sorted(stats.items())}
    for key, value in cost.items():
        metrics[key] = {"value": value}
    return metrics, stats, ex


def metric_names(task: TaskConfig) -> list[str]:
    """The metrics with intervals this task gets (what primary_metric and gates may name)."""
    names = [
        "json_valid_rate",
        "schema_valid_rate",
        "latency_ms_mean",
        "latency_ms_p50",
        "latency_ms_p95",
        "latency_ms_amortised",
    ]
    for f in task.fields:
        names += field_metric_names(f)
    return names


def references_for(
    task: TaskConfig, records: list[dict[str, Any]], teacher: list[dict[str, Any]] | None
) -> dict[str, list[Any]]:
    """Reference per field: gold when the dataset has it, else the teacher's answer."""
    refs = {}
    for field in task.fields:
        if field.gold:
            refs[field.name] = [task.gold_value(field, r["gold"].get(field.name)) for r in records]
        elif teacher is not None:
            refs[field.name] = [field_value(p, field) for p in teacher]
    return refs


def deltas(
    cand: dict[str, tuple[float, np.ndarray]],
    base: dict[str, tuple[float, np.ndarray]],
    rs: Resamples,
) -> dict[str, dict[str, float]]:
    """Paired differences candidate - baseline (the same resamples for both)."""
    out = {}
    for key in sorted(set(cand) & set(base)):
        with np.errstate(invalid="ignore"):
            out[key] = estimate(cand[key][0] - base[key][0], cand[key][1] - base[key][1], rs)
    return out


def self_hosted_cost(
    preds: list[dict[str, Any]], seconds: float, n: int, cfg: EvaluateConfig
) -> dict[str, float]:
    tokens = sum(p["new_tokens"] for p in preds)
    return {
        "usd_per_1k": cfg.hardware_usd_per_hour * seconds / 3600 / n * 1000,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "examples_per_s": n / seconds if seconds else 0.0,
    }


def attach_scores(
    preds: list[dict[str, Any]], records: list[dict[str, Any]], ex: dict[str, Any]
) -> list[dict[str, Any]]:
    """Prediction rows for `reports/predictions/<name>.jsonl`: answer, gold and scores."""
    rows = []
    for i, (p, r) in enumerate(zip(preds, records, strict=True)):
        scores = {}
        for key, values in ex["scores"].items():
            mask = ex["masks"].get(key)
            if mask is None or mask[i]:
                scores[key] = float(values[i])
        rows.append(
            {
                **p,
                "gold": r["gold"],
                "gold_all": r.get("gold_all"),
                "correct": bool(next((v for k, v in scores.items() if k.endswith(".accuracy")), 0)),
                "scores": scores,
            }
        )
    return rows
