"""What distil writes: the labelled rows, each split's counts, the rejects, the teacher's
baseline answers and the metrics (`results.DistilResult`), from the labelling's outcomes.

Apart from the stage so that each reads at once: `stages/distil.py` decides what to ask and
when to stop; this shapes what came back. Every input record is counted: labelled, rejected
or stopped by the budget, never dropped silently.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from .providers import Provider, ProviderConfig
from .task import TaskConfig
from .teacher import Outcome, agreement


@dataclass
class Labelled:
    """What the labelling produced: outcomes per split, the teacher's baseline answers, and
    what the metrics report of the teacher (none with gold)."""

    by_split: dict[str, list[Outcome]]
    baseline: list[Outcome] | None = None
    provider: Provider | None = None
    estimate: dict[str, Any] = field(default_factory=dict)
    shots: list[str] = field(default_factory=list)
    failed: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # teacher.Recall


@dataclass
class Outputs:
    """The files of the output folder, and the counts the metrics report of them."""

    files: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    pairs: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)  # (answer, record)
    baseline: dict[str, Any] | None = None


def outputs(
    teacher: ProviderConfig, task: TaskConfig, done: Labelled, baseline_split: str | None
) -> Outputs:
    """Each split's labelled rows and counts, the rejects, and the baseline's file."""
    out = Outputs()
    for split, outcomes in done.by_split.items():
        rows = [labelled_row(teacher, task, o) for o in outcomes if o.answer is not None]
        out.pairs += [(o.answer, o.record) for o in outcomes if o.answer is not None]
        out.rejects += [
            {"id": o.record["id"], "split": split, "reason": o.reason, "output": o.output}
            for o in outcomes
            if o.answer is None and o.reason is not None
        ]
        out.files[f"{split}.jsonl"] = rows
        out.counts[split] = split_counts(outcomes, len(rows))
    if done.baseline is not None and baseline_split:
        out.files[f"baseline_{baseline_split}.jsonl"] = [
            baseline_row(o, task) for o in done.baseline
        ]
        out.baseline = baseline_report(baseline_split, task, done.baseline)
    out.files["rejects.jsonl"] = out.rejects
    return out


def labelled_row(teacher: ProviderConfig, task: TaskConfig, o: Outcome) -> dict[str, Any]:
    """The prepared record with its label: the training example train reads."""
    return {
        **o.record,
        "completion": [{"role": "assistant", "content": task.format_answer(o.answer)}],
        "answer": o.answer,
        "label_source": o.source or ("gold" if teacher.kind == "gold" else "teacher"),
        "teacher_model": teacher.model,
        "prompt_hash": task.prompt_hash,
    }


def split_counts(outcomes: list[Outcome], labelled: int) -> dict[str, int]:
    """Where each record of a split went; never dropped silently: every input is labelled,
    rejected or budget-stopped."""
    counts = {
        "input": len(outcomes),
        "labelled": labelled,
        "rejected": sum(o.reason is not None for o in outcomes),
        "not_labelled_budget": sum(o.budget_stop for o in outcomes),
        # where the labels came from: the log (valid or not) or the teacher (asked)
        "logged": sum(o.source == "logged" and o.answer is not None for o in outcomes),
        "logged_rejected": sum(o.source == "logged" and o.answer is None for o in outcomes),
        "asked": sum(o.source is None for o in outcomes),
    }
    assert labelled + counts["rejected"] + counts["not_labelled_budget"] == len(outcomes), counts
    return counts


def baseline_report(split: str, task: TaskConfig, baseline: list[Outcome]) -> dict[str, Any]:
    answered = [o for o in baseline if o.answer is not None]
    return {
        "split": split,
        "records": len(baseline),
        "valid_answers": len(answered),
        "failed": sum(o.reason is not None and not o.replies for o in baseline),
        "not_answered_budget": sum(o.budget_stop for o in baseline),
        "agreement_with_gold": agreement(
            task, [(o.answer, o.record) for o in answered if "gold" in o.record]
        ),
    }


def metrics_of(
    teacher: ProviderConfig,
    task: TaskConfig,
    done: Labelled,
    out: Outputs,
    stopped: bool,
    reject_rate: float | None,
    t0: float,
) -> dict[str, Any]:
    """metrics/distil.json (`results.DistilResult`)."""
    provider = done.provider
    stats = provider.stats.summary() if provider else {}
    metrics: dict[str, Any] = {
        "teacher": {"kind": teacher.kind, "model": teacher.model},
        "complete": not stopped,
        "stopped_reason": "budget cap" if stopped else None,
        "records": out.counts,
        "rejects": len(out.rejects),
        "requests": stats.get("requests", 0),
        "calls": stats.get("calls", 0),
        "cache_hits": stats.get("cache_hits", 0),
        "retries": stats.get("retries", 0),
        "failures": stats.get("failures", 0),
        "errors": stats.get("errors", {}),
        "tokens_in": stats.get("input_tokens", 0),
        "tokens_out": stats.get("output_tokens", 0),
        "usd": stats.get("usd", 0.0),
        "usd_estimate": done.estimate.get("usd"),
        "usd_estimate_worst_case": done.estimate.get("usd_worst_case"),
        # Replies past the requested limits (rejected) and requests abandoned after they may
        # have been billed (timeouts): both charged their worst case, included in `usd`.
        "over_limit_replies": stats.get("over_limit", 0),
        "abandoned_requests": stats.get("abandoned", 0),
        "usd_charged_worst_case": stats.get("usd_charged_worst_case", 0.0),
        "usd_claimed_over_limit": stats.get("usd_claimed_over_limit", 0.0),
        "failures_recalled": sum(
            o.recalled for outs in [*done.by_split.values(), done.baseline or []] for o in outs
        ),
        "reject_rate": reject_rate,
        "max_usd": teacher.max_usd if provider else None,
        "latency_ms_p50": stats.get("latency_ms_p50"),
        "latency_ms_p95": stats.get("latency_ms_p95"),
        "redactions": stats.get("redactions", {}),
        # With gold the "teacher" IS gold: an agreement of 1.0 would say nothing.
        "teacher_agreement": agreement(task, out.pairs) if provider else None,
        "baseline": out.baseline,
        "few_shot_ids": done.shots,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    if provider is not None and provider.batch_report is not None:  # mode: batch
        metrics["batch"] = provider.batch_report
    return metrics


def failure_share(
    counts: dict[str, dict[str, int]], baseline: dict[str, Any] | None
) -> dict[str, Any]:
    """Records sent to the teacher (budget-stopped ones were not) and how many failed:
    rejected in the labelled splits, plus baseline requests that got no reply at all."""
    sent = sum(c["input"] - c["not_labelled_budget"] for c in counts.values())
    failed = sum(c["rejected"] for c in counts.values())
    if baseline is not None:
        sent += baseline["records"] - baseline["not_answered_budget"]
        failed += baseline["failed"]
    return {"sent": sent, "failed": failed, "rate": round(failed / sent, 4) if sent else None}


def reason_kind(reason: str) -> str:
    """A reject reason without its record-specific details, for counting."""
    return re.sub(r"'[^']*'|\d+", "…", reason)[:120]


def baseline_row(o: Outcome, task: TaskConfig) -> dict[str, Any]:
    done = o.replies[0] if o.replies else None
    row: dict[str, Any] = {
        "id": o.record["id"],
        "output": done.text if done else None,
        "answer": task.parse(done.text) if done else None,
        "latency_ms": round(done.latency_ms, 1) if done else None,
        "input_tokens": done.input_tokens if done else 0,
        "output_tokens": done.output_tokens if done else 0,
        "usd": round(done.usd, 8) if done else 0.0,
    }
    if done is None:
        row["error"] = "budget cap reached" if o.budget_stop else o.reason
    return row
