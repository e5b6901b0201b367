"""distil stage: label the prepared training data with a teacher, and answer the test split.

Inputs: `data/prepared/{train,validation,test}.jsonl`. Outputs (one folder, swapped in
atomically): `data/distilled/{train,validation}.jsonl` (the prepared record plus `completion`,
`answer`, `label_source`, `teacher_model`, `prompt_hash`), `rejects.jsonl`, and with an API
teacher `baseline_test.jsonl` (the teacher's answers on the test split, for evaluate); plus
`metrics/distil.json`.

Teachers (`distil.provider.kind`): `gold` (offline default: the answer is built from the
record's gold fields), `openai`, `anthropic`, `replay` (see `temper.providers`). The API
teacher sees the task's system prompt WITH the label list, a few deterministic few-shot examples
from the train split, and the record; its JSON answer is validated against the task schema, an
invalid one gets one repair turn (the problems are sent back), then goes to `rejects.jsonl`.

Batch mode (`provider.mode: batch`): the uncached requests go through the vendor's batch API
first (`temper.providers.batch`: half price, resumable); their answers land in the same cache,
so the labelling below is unchanged (repairs run synchronously).

Money: a cost estimate runs first and refuses to start above `max_usd` (unless `force`); the
provider's hard caps stop the run cleanly, and everything finished is kept (the cache holds
every answer, and the outputs written so far say `complete: false` in the metrics).

Bad days: when more than `max_reject_rate` of the records sent were rejected or failed (an
outage, a teacher that ignores the schema), the stage exits with EXIT_TOO_MANY_REJECTS and
leaves the previous outputs as they were: an empty `train.jsonl` never replaces a good one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import Field

from ..config import ConfigError, Section, flatten
from ..io import atomic_dir, read_jsonl, stable_hash, write_jsonl
from ..providers import (
    BatchError,
    CacheMiss,
    Provider,
    ProviderConfig,
    batch_price,
    collect,
    gather_bounded,
    open_provider,
)
from ..providers.prices import warn_if_retiring
from ..records.sampling import pick_few_shot
from ..results import DistilResult
from ..task import TaskConfig
from ..teacher import (
    Outcome,
    agreement,
    gold_outcome,
    label_after_batch,
    label_one,
    logged_outcome,
    merge_logged,
)
from ..tracking import MlflowConfig, child_run

log = logging.getLogger(__name__)

# Distinct exit codes so a script (or DVC's log) tells a budget stop from a crash.
EXIT_BUDGET_STOP = 3
EXIT_ESTIMATE_REFUSED = 4
EXIT_PRIVACY = 5
EXIT_TOO_MANY_REJECTS = 6
EXIT_BATCH_PENDING = 7  # mode batch: batches still running (or cancelled); re-run to collect
REQUIRED = ("id", "text", "prompt", "gold")


class DistilConfig(Section):
    """`distil:` in params.yaml."""

    provider: ProviderConfig = Field(
        default_factory=ProviderConfig, description="The teacher (pipelines/providers.py)."
    )
    prepared_dir: str = Field("data/prepared", description="Input folder (prepare's output).")
    out_dir: str = Field("data/distilled", description="Output folder.")
    metrics: str = Field("metrics/distil.json", description="Metrics file.")
    splits: list[str] = Field(
        default_factory=lambda: ["train", "validation"],
        description="Splits to label (training data).",
    )
    baseline_split: str | None = Field(
        "test",
        description="Split the API teacher answers for evaluate's API baseline "
        "(null: none; never done with gold).",
    )
    few_shot: int = Field(3, ge=0, description="Few-shot examples (from the train split).")
    few_shot_seed: str = Field("temper-fewshot-v1", description="Salt of the few-shot choice.")
    baseline_few_shot: bool = Field(True, description="Give the baseline the few-shot examples.")
    repair: bool = Field(True, description="One repair turn for an invalid answer.")
    max_reject_rate: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Fail (exit 6, previous outputs kept) when more than this "
        "share of the records sent to the teacher were rejected or failed.",
    )
    force: bool = Field(False, description="Start even if the cost estimate exceeds max_usd.")
    progress: bool = Field(True, description="Show progress bars.")
    log_mlflow: bool = Field(True, description="Log params and metrics to an MLflow child run.")


class DistilError(RuntimeError):
    """The stage cannot run or finish; `exit_code` says why (see EXIT_*)."""

    def __init__(self, message: str, exit_code: int = 1, metrics: dict[str, Any] | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.metrics = metrics  # what the run did, when it got as far as sending requests


# ----------------------------------------------------------------------------- inputs, prompts


def load_split(path: Path, gold_needed: bool) -> list[dict[str, Any]]:
    """Read a prepared split, with errors naming the file, line and field."""
    if not path.exists():
        raise DistilError(f"{path}: file not found (run `temper prepare` first)")
    try:
        records = read_jsonl(path)
    except ValueError as err:
        raise DistilError(str(err)) from None
    for lineno, record in enumerate(records, 1):
        needed = REQUIRED if gold_needed else REQUIRED[:3]
        for key in needed:
            if key not in record:
                raise DistilError(
                    f"{path}:{lineno}: record {record.get('id')!r} has no field '{key}'"
                )
        if not isinstance(record["text"], str):
            raise DistilError(f"{path}:{lineno}: field 'text' is not a string")
        if gold_needed and not isinstance(record["gold"], dict):
            raise DistilError(f"{path}:{lineno}: field 'gold' is not an object")
    return records


# ----------------------------------------------------------------------------- labelling


async def run_all(provider: Provider, coros: list[Any], desc: str | None) -> list[Any]:
    results = await gather_bounded(coros, desc=desc, provider=provider)
    misses = [r for r in results if isinstance(r, CacheMiss)]
    if misses:
        raise DistilError(
            f"replay: {len(misses)} of {len(results)} requests are not in the cache ({misses[0]})"
        )
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results


# ----------------------------------------------------------------------------- the stage


def run(
    cfg: DistilConfig, task: TaskConfig, mlflow: Any = None, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run the stage; returns the metrics. Raises DistilError (with an exit code) on a stop."""
    t0 = time.perf_counter()
    pcfg = cfg.provider
    is_gold = pcfg.kind == "gold"
    prepared = Path(cfg.prepared_dir)
    every = {s: load_split(prepared / f"{s}.jsonl", gold_needed=True) for s in cfg.splits}
    # Logged replies (prepare.format: openai_log) are labels already paid for: only the
    # records without one are asked.
    logged = {s: [logged_outcome(task, r) for r in recs] for s, recs in every.items()}
    splits = {
        s: [r for r, o in zip(rs, logged[s], strict=True) if not o] for s, rs in every.items()
    }
    if is_gold:
        asked = {s: [gold_outcome(task, r) for r in rs] for s, rs in splits.items()}
        return finish(cfg, task, merge_logged(logged, asked), None, None, {}, t0, mlflow, params)

    # Privacy and price checks happen here, before a single byte is sent.
    try:
        provider = open_provider(pcfg)
    except ConfigError as err:
        from ..providers import PrivacyError

        raise DistilError(str(err), EXIT_PRIVACY if isinstance(err, PrivacyError) else 1) from None
    try:
        train = every.get("train") or load_split(prepared / "train.jsonl", gold_needed=True)
        shots = pick_few_shot(task, train, cfg.few_shot, cfg.few_shot_seed)
        version = stable_hash(
            {"task": task.prompt_hash, "shots": [s["id"] for s in shots], "repair": cfg.repair}
        )
        jobs = [
            (s, r, task.teacher_messages(shots, r["text"]))
            for s, recs in splits.items()
            for r in recs
        ]
        base_recs: list[dict[str, Any]] = []
        if cfg.baseline_split:
            base_recs = load_split(prepared / f"{cfg.baseline_split}.jsonl", gold_needed=False)
        base_shots = shots if cfg.baseline_few_shot else []
        base_msgs = [task.teacher_messages(base_shots, r["text"]) for r in base_recs]

        estimate = estimate_cost(provider, task, [m for _, _, m in jobs] + base_msgs, version)
        log.info(
            "teacher %s:%s, %d records + %d baseline; estimate %d uncached requests, $%.4f "
            "(worst case $%.4f; cap $%.2f)",
            pcfg.kind,
            pcfg.model,
            len(jobs),
            len(base_msgs),
            estimate["requests"],
            estimate["usd"],
            estimate["usd_worst_case"],
            pcfg.max_usd,
        )
        warn_if_retiring(pcfg.model)  # a teacher that is about to go away: say so now
        if estimate["usd_worst_case"] > pcfg.max_usd:
            log.warning(
                "if answers run to max_tokens (%d) the spend cap stops this run before "
                "it ends (worst case $%.4f > max_usd $%.2f)",
                pcfg.max_tokens,
                estimate["usd_worst_case"],
                pcfg.max_usd,
            )
        if not cfg.force and (
            estimate["usd"] > pcfg.max_usd or estimate["requests"] > pcfg.max_requests
        ):
            raise DistilError(
                f"estimated cost ${estimate['usd']:.4f} for {estimate['requests']} uncached "
                f"requests exceeds the cap (max_usd ${pcfg.max_usd:.2f}, max_requests "
                f"{pcfg.max_requests}); nothing was sent. Raise the cap or pass --force.",
                EXIT_ESTIMATE_REFUSED,
            )

        async def main() -> tuple[list[Outcome], list[Outcome]]:
            try:
                label: Any = label_one
                if pcfg.mode == "batch":  # answers into the cache first (docs/distil.md)
                    every = [m for _, _, m in jobs] + base_msgs
                    schema = task.answer_schema()
                    done = await collect(
                        provider, [(m, schema, version) for m in every], cfg.progress
                    )
                    label = functools.partial(label_after_batch, done)
                labelled = await run_all(
                    provider,
                    [label(provider, task, r, m, cfg.repair, version) for _, r, m in jobs],
                    "distil" if cfg.progress else None,
                )
                baseline = await run_all(
                    provider,
                    [
                        label(provider, task, r, m, False, version)
                        for r, m in zip(base_recs, base_msgs, strict=True)
                    ],
                    f"baseline {cfg.baseline_split}" if cfg.progress and base_recs else None,
                )
                return labelled, baseline
            finally:
                await provider.aclose()

        try:
            labelled, baseline = asyncio.run(main())
        except BatchError as err:
            raise DistilError(str(err), EXIT_BATCH_PENDING if err.pending else 1) from None
        by_split: dict[str, list[Outcome]] = {s: [] for s in splits}
        for (split, _, _), outcome in zip(jobs, labelled, strict=True):
            by_split[split].append(outcome)
        return finish(
            cfg,
            task,
            merge_logged(logged, by_split),
            baseline,
            provider,
            estimate,
            t0,
            mlflow,
            params,
            shots=[s["id"] for s in shots],
        )
    finally:
        provider.close()


def estimate_cost(
    provider: Provider, task: TaskConfig, batch: list[list[dict[str, str]]], version: str
) -> dict[str, Any]:
    """Uncached requests, their expected USD (answers of the task's usual length) and the
    worst case (every answer as long as max_tokens allows); repairs not included."""
    n, usd, worst = provider.estimate_usd(
        batch,
        price=batch_price(provider) if provider.cfg.mode == "batch" else None,
        json_schema=task.answer_schema(),
        expected_output_tokens=task.max_new_tokens,
        prompt_version=version,
    )
    return {"requests": n, "usd": round(usd, 6), "usd_worst_case": round(worst, 6)}


def finish(
    cfg: DistilConfig,
    task: TaskConfig,
    by_split: dict[str, list[Outcome]],
    baseline: list[Outcome] | None,
    provider: Provider | None,
    estimate: dict[str, Any],
    t0: float,
    mlflow: Any,
    params: dict[str, Any] | None,
    shots: list[str] | None = None,
) -> dict[str, Any]:
    """Write the outputs (atomically, one folder) and the metrics; raise on a budget stop."""
    pcfg = cfg.provider
    source = "gold" if pcfg.kind == "gold" else "teacher"
    counts: dict[str, dict[str, int]] = {}
    rejects: list[dict[str, Any]] = []
    pairs = []
    files: dict[str, list[dict[str, Any]]] = {}
    for split, outcomes in by_split.items():
        rows = []
        for o in outcomes:
            if o.answer is not None:
                rows.append(
                    {
                        **o.record,
                        "completion": [
                            {"role": "assistant", "content": task.format_answer(o.answer)}
                        ],
                        "answer": o.answer,
                        "label_source": o.source or source,
                        "teacher_model": pcfg.model,
                        "prompt_hash": task.prompt_hash,
                    }
                )
                pairs.append((o.answer, o.record))
            elif o.reason is not None:
                rejects.append(
                    {"id": o.record["id"], "split": split, "reason": o.reason, "output": o.output}
                )
        files[f"{split}.jsonl"] = rows
        counts[split] = {
            "input": len(outcomes),
            "labelled": len(rows),
            "rejected": sum(o.reason is not None for o in outcomes),
            "not_labelled_budget": sum(o.budget_stop for o in outcomes),
            # where the labels came from: the log (valid or not) or the teacher (asked)
            "logged": sum(o.source == "logged" and o.answer is not None for o in outcomes),
            "logged_rejected": sum(o.source == "logged" and o.answer is None for o in outcomes),
            "asked": sum(o.source is None for o in outcomes),
        }
        # Never drop a record silently: every input is labelled, rejected or budget-stopped.
        c = counts[split]
        assert c["labelled"] + c["rejected"] + c["not_labelled_budget"] == c["input"], c
    baseline_report = None
    if baseline is not None and cfg.baseline_split:
        files[f"baseline_{cfg.baseline_split}.jsonl"] = [baseline_row(o, task) for o in baseline]
        answered = [o for o in baseline if o.answer is not None]
        baseline_report = {
            "split": cfg.baseline_split,
            "records": len(baseline),
            "valid_answers": len(answered),
            "failed": sum(o.reason is not None and not o.replies for o in baseline),
            "not_answered_budget": sum(o.budget_stop for o in baseline),
            "agreement_with_gold": agreement(
                task, [(o.answer, o.record) for o in answered if "gold" in o.record]
            ),
        }
    files["rejects.jsonl"] = rejects

    stopped = any(o.budget_stop for outs in by_split.values() for o in outs) or any(
        o.budget_stop for o in baseline or []
    )
    failure = failure_share(counts, baseline_report)
    stats = provider.stats.summary() if provider else {}
    metrics: dict[str, Any] = {
        "teacher": {"kind": pcfg.kind, "model": pcfg.model},
        "complete": not stopped,
        "stopped_reason": "budget cap" if stopped else None,
        "records": counts,
        "rejects": len(rejects),
        "requests": stats.get("requests", 0),
        "calls": stats.get("calls", 0),
        "cache_hits": stats.get("cache_hits", 0),
        "retries": stats.get("retries", 0),
        "failures": stats.get("failures", 0),
        "errors": stats.get("errors", {}),
        "tokens_in": stats.get("input_tokens", 0),
        "tokens_out": stats.get("output_tokens", 0),
        "usd": stats.get("usd", 0.0),
        "usd_estimate": estimate.get("usd"),
        "usd_estimate_worst_case": estimate.get("usd_worst_case"),
        # Replies past the requested limits (rejected) and requests abandoned after they may
        # have been billed (timeouts): both charged their worst case, included in `usd`.
        "over_limit_replies": stats.get("over_limit", 0),
        "abandoned_requests": stats.get("abandoned", 0),
        "usd_charged_worst_case": stats.get("usd_charged_worst_case", 0.0),
        "usd_claimed_over_limit": stats.get("usd_claimed_over_limit", 0.0),
        "reject_rate": failure["rate"],
        "max_usd": pcfg.max_usd if provider else None,
        "latency_ms_p50": stats.get("latency_ms_p50"),
        "latency_ms_p95": stats.get("latency_ms_p95"),
        "redactions": stats.get("redactions", {}),
        # With gold the "teacher" IS gold: an agreement of 1.0 would say nothing.
        "teacher_agreement": agreement(task, pairs) if provider else None,
        "baseline": baseline_report,
        "few_shot_ids": shots or [],
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    if provider is not None and provider.batch_report is not None:  # mode: batch
        metrics["batch"] = provider.batch_report
    if failure["rate"] is not None and failure["rate"] > cfg.max_reject_rate:
        # The previous outputs stay: a run that lost most of its records must not replace them.
        reasons = Counter(_reason_kind(r["reason"]) for r in rejects)
        top = "; ".join(f"{n} x {why}" for why, n in reasons.most_common(3))
        message = (
            f"{failure['failed']} of {failure['sent']} records sent to the teacher were rejected "
            f"or failed ({failure['rate']:.1%} > max_reject_rate {cfg.max_reject_rate:.1%}): "
            f"{top or 'baseline requests failed'}. {cfg.out_dir} and {cfg.metrics} were left as "
            f"they were; spent ${metrics['usd']:.4f}. Every good answer is cached: fix the "
            "teacher (or raise distil.max_reject_rate) and re-run."
        )
        if stopped:
            raise DistilError(f"budget cap reached, and {message}", EXIT_BUDGET_STOP, metrics)
        raise DistilError(message, EXIT_TOO_MANY_REJECTS, metrics)
    with atomic_dir(cfg.out_dir) as tmp:
        for name, rows in files.items():
            write_jsonl(tmp / name, rows)
    DistilResult.model_validate(metrics).save(cfg.metrics)
    if mlflow is not None:
        log_mlflow(mlflow, cfg, metrics, params or {})
    if stopped:
        budget = provider.budget if provider else None
        raise DistilError(
            f"budget cap reached (spent ${budget.spent_usd:.4f} of max_usd ${budget.max_usd:.2f}, "
            f"{budget.requests} of max_requests {budget.max_requests} requests): stopped "
            f"cleanly; {sum(c['labelled'] for c in counts.values())} records labelled and "
            f"kept, {sum(c['not_labelled_budget'] for c in counts.values())} not labelled. "
            "Every answer is cached: raise the cap and re-run to finish.",
            EXIT_BUDGET_STOP,
            metrics,
        )
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


def _reason_kind(reason: str) -> str:
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


def log_mlflow(
    mlflow_cfg: MlflowConfig, cfg: DistilConfig, metrics: dict[str, Any], params: dict[str, Any]
) -> None:
    """A child run of the pipeline run with the distil params and flat numeric metrics."""
    with child_run(mlflow_cfg, params, "distil", "distil") as run:
        run.log_params({k: str(v)[:500] for k, v in flatten({"distil": cfg.model_dump()}).items()})
        run.log_metrics(flatten(metrics))
