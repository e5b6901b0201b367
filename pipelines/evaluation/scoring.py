"""Scoring answers: per-example scores, metrics with intervals, paired deltas, costs.

Per task field (from the task config): label fields get exact and any-of-gold accuracy,
macro-F1 and per-class precision/recall (`metrics/label_metrics`); text fields ROUGE-1/2/L/Lsum
(`metrics/text_rouge`) on the examples with a reference. An answer with no JSON object lowers
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

from ..task import TaskConfig, parse_answer
from .config import EvaluateConfig
from .metrics import Resamples, estimate, macro_f1_stats, mean_stats, percentile_stats


def answer_fields(task: TaskConfig, text: str | None) -> dict[str, Any]:
    """Parse a reply: the parsed answer (or None), whether it is JSON at all (`json_ok`),
    whether it fits the schema (`valid`: fields, types, allowed labels) and the problems."""
    answer = parse_answer(text) if text is not None else None
    problems = task.validate_answer(answer) if answer is not None else ["no JSON object found"]
    return {
        "answer": answer,
        "json_ok": answer is not None,
        "valid": not problems,
        "problems": problems,
    }


def field_value(pred: dict[str, Any], name: str) -> Any:
    answer = pred.get("answer")
    value = answer.get(name) if isinstance(answer, dict) else None
    return value if isinstance(value, str) else None


def per_example(
    task: TaskConfig,
    records: list[dict[str, Any]],
    preds: list[dict[str, Any]],
    references: dict[str, list[Any]],
) -> dict[str, Any]:
    """Per-example score arrays (what the bootstrap resamples) and per-class point metrics."""
    from .metrics import load

    out: dict[str, Any] = {
        # json_valid_rate: the reply holds a JSON object (what "valid JSON" gates look at);
        # schema_valid_rate: it also has exactly the schema's fields, types and labels.
        "json_valid_rate": np.array([p["json_ok"] for p in preds], float),
        "schema_valid_rate": np.array([p["valid"] for p in preds], float),
    }
    masks: dict[str, np.ndarray] = {}
    extra: dict[str, Any] = {}
    for field in task.fields:
        if field.name not in references:
            continue
        refs = references[field.name]
        values = [field_value(p, field.name) for p in preds]
        if field.kind == "label":
            gold_all = [
                (r.get("gold_all") or {}).get(field.name) or [g]
                for r, g in zip(records, refs, strict=True)
            ]
            res = load("label_metrics").compute(
                # None -> "" (no answer): arrow cannot type a column that is all None.
                predictions=[v or "" for v in values],
                references=[str(g) for g in refs],
                references_all=gold_all,
                return_per_example=True,
            )
            out[f"{field.name}.accuracy"] = np.array(res["correct"], float)
            out[f"{field.name}.accuracy_any"] = np.array(res["correct_any"], float)
            extra[f"{field.name}.per_class"] = res["per_class"]
            extra[f"{field.name}.labels"] = (values, [str(g) for g in refs])
        else:
            has_ref = np.array([g is not None for g in refs])
            res = load("text_rouge").compute(
                predictions=[v or "" for v in values],
                references=[g or "" for g in refs],
                return_per_example=True,
            )
            for rouge in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
                key = f"{field.name}.{rouge}"
                out[key] = np.array(res[f"{rouge}_scores"], float)
                masks[key] = has_ref
            if field.nullable:
                out[f"{field.name}.null_match"] = np.array(
                    [(v is None) == (g is None) for v, g in zip(values, refs, strict=True)], float
                )
    latency = [p.get("latency_ms") for p in preds]
    if all(v is not None for v in latency):
        out["latency_ms_mean"] = np.array(latency, float)
        extra["latency_ms"] = np.array(latency, float)  # for the percentiles
    amortised = [p.get("amortised_ms") for p in preds]
    if all(v is not None for v in amortised):
        out["latency_ms_amortised"] = np.array(amortised, float)
    return {"scores": out, "masks": masks, "extra": extra}


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
    if "latency_ms" in ex["extra"]:
        # Per-request percentiles: each answer's own time, as its caller would see it.
        latency = ex["extra"]["latency_ms"]
        for q in (50, 95):
            stats[f"latency_ms_p{q}"] = (
                float(np.percentile(latency, q)),
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
        if f.kind == "label":
            names += [f"{f.name}.{m}" for m in ("accuracy", "accuracy_any", "macro_f1")]
        else:
            names += [f"{f.name}.{m}" for m in ("rouge1", "rouge2", "rougeL", "rougeLsum")]
            names += [f"{f.name}.null_match"] if f.nullable else []
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
            refs[field.name] = [field_value(p, field.name) for p in teacher]
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
