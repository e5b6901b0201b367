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
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from ..config import ConfigError, Section, flatten
from ..errors import TemperError
from ..io import atomic_dir, read_jsonl, stable_hash, write_jsonl
from ..labels import (
    Labelled,
    Outputs,
    failure_share,
    metrics_of,
    outputs,
    reason_kind,
)
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
    Recall,
    gold_outcome,
    label_after_batch,
    label_one,
    logged_outcome,
    merge_logged,
    remember_failures,
)
from ..tracking import Tracking

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
    retry_failed: bool = Field(
        False,
        description="Send again the requests that failed for good (timeouts, 5xx after every "
        "retry, oversize replies) in an earlier run that wrote its outputs. false: they stay "
        "rejects with the same reason, so a re-run gives the same data; true: a re-run may "
        "label them and change the outputs.",
    )
    force: bool = Field(False, description="Start even if the cost estimate exceeds max_usd.")
    progress: bool = Field(True, description="Show progress bars.")
    log_mlflow: bool = Field(True, description="Log params and metrics to an MLflow child run.")


class DistilError(TemperError, RuntimeError):
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


@dataclass
class Jobs:
    """The requests of one run: each record to label with its messages, the baseline's."""

    labels: list[tuple[str, dict[str, Any], list[dict[str, str]]]]
    baseline: list[tuple[dict[str, Any], list[dict[str, str]]]]
    version: str  # the prompt's version: part of every cache key
    shots: list[str]

    def messages(self) -> list[list[dict[str, str]]]:
        return [m for _, _, m in self.labels] + [m for _, m in self.baseline]


def run(cfg: DistilConfig, task: TaskConfig, tracking: Tracking | None = None) -> dict[str, Any]:
    """Run the stage; returns the metrics. Raises DistilError (with an exit code) on a stop.
    `tracking`: log to an MLflow child run of the pipeline run (with `distil.log_mlflow`)."""
    t0 = time.perf_counter()
    prepared = Path(cfg.prepared_dir)
    every = {s: load_split(prepared / f"{s}.jsonl", gold_needed=True) for s in cfg.splits}
    # Logged replies (prepare.format: openai_log) are labels already paid for: only the
    # records without one are asked.
    logged = {s: [logged_outcome(task, r) for r in recs] for s, recs in every.items()}
    splits = {
        s: [r for r, o in zip(rs, logged[s], strict=True) if not o] for s, rs in every.items()
    }
    if cfg.provider.kind == "gold":
        labelled = Labelled({s: [gold_outcome(task, r) for r in rs] for s, rs in splits.items()})
    else:
        labelled = ask_teacher(cfg, task, splits, every.get("train"))
    labelled.by_split = merge_logged(logged, labelled.by_split)
    return finish(cfg, task, labelled, t0, tracking if cfg.log_mlflow else None)


def ask_teacher(
    cfg: DistilConfig,
    task: TaskConfig,
    splits: dict[str, list[dict[str, Any]]],
    train: list[dict[str, Any]] | None,
) -> Labelled:
    """Label `splits` (and answer the baseline split) with the API teacher, after the
    privacy and price checks: nothing is sent before they pass."""
    try:
        provider = open_provider(cfg.provider)
    except ConfigError as err:
        from ..providers import PrivacyError

        raise DistilError(str(err), EXIT_PRIVACY if isinstance(err, PrivacyError) else 1) from None
    try:
        prepared = Path(cfg.prepared_dir)
        train = train or load_split(prepared / "train.jsonl", gold_needed=True)
        jobs = make_jobs(cfg, task, splits, train)
        estimate = estimate_cost(provider, task, jobs.messages(), jobs.version)
        check_estimate(cfg, estimate, jobs)
        recall = Recall(provider, task.answer_schema(), jobs.version, cfg.retry_failed)
        try:
            labelled, baseline = asyncio.run(label_all(cfg, task, provider, jobs, recall))
        except BatchError as err:
            raise DistilError(str(err), EXIT_BATCH_PENDING if err.pending else 1) from None
        if provider.breaker.reason is not None:
            raise teacher_down(cfg, provider)
        by_split: dict[str, list[Outcome]] = {s: [] for s in splits}
        for (split, _, _), outcome in zip(jobs.labels, labelled, strict=True):
            by_split[split].append(outcome)
        done = Labelled(by_split, baseline, provider, estimate, jobs.shots)
        done.failed = recall.new_failures(
            list(zip(jobs.messages(), labelled + baseline, strict=True))
        )
        return done
    finally:
        provider.close()


def make_jobs(
    cfg: DistilConfig,
    task: TaskConfig,
    splits: dict[str, list[dict[str, Any]]],
    train: list[dict[str, Any]],
) -> Jobs:
    """The teacher's messages for every record, few-shot examples drawn from `train`."""
    shots = pick_few_shot(task, train, cfg.few_shot, cfg.few_shot_seed)
    version = stable_hash(
        {"task": task.prompt_hash, "shots": [s["id"] for s in shots], "repair": cfg.repair}
    )
    labels = [
        (s, r, task.teacher_messages(shots, r["text"])) for s, recs in splits.items() for r in recs
    ]
    base_recs: list[dict[str, Any]] = []
    if cfg.baseline_split:
        path = Path(cfg.prepared_dir) / f"{cfg.baseline_split}.jsonl"
        base_recs = load_split(path, gold_needed=False)
    base_shots = shots if cfg.baseline_few_shot else []
    baseline = [(r, task.teacher_messages(base_shots, r["text"])) for r in base_recs]
    return Jobs(labels, baseline, version, [s["id"] for s in shots])


def check_estimate(cfg: DistilConfig, estimate: dict[str, Any], jobs: Jobs) -> None:
    """Log the estimate; refuse (exit 4, nothing sent) when it is above the caps."""
    pcfg = cfg.provider
    log.info(
        "teacher %s:%s, %d records + %d baseline; estimate %d uncached requests, $%.4f "
        "(worst case $%.4f; cap $%.2f)",
        pcfg.kind,
        pcfg.model,
        len(jobs.labels),
        len(jobs.baseline),
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


async def label_all(
    cfg: DistilConfig, task: TaskConfig, provider: Provider, jobs: Jobs, recall: Recall
) -> tuple[list[Outcome], list[Outcome]]:
    """Every label, then every baseline answer (with `mode: batch`, the batch API fills the
    cache first and the same labelling reads it); a request that failed for good in an
    earlier run is not sent again unless `retry_failed` (`teacher.Recall`)."""
    try:
        label: Any = label_one
        if cfg.provider.mode == "batch":  # answers into the cache first (docs/distil.md)
            schema = task.answer_schema()
            requests = [(m, schema, jobs.version) for m in jobs.messages()]
            label = functools.partial(
                label_after_batch, await collect(provider, requests, cfg.progress)
            )

        async def one(record: dict[str, Any], messages: Any, repair: bool) -> Outcome:
            return recall.outcome(record, messages) or await label(
                provider, task, record, messages, repair, jobs.version
            )

        labelled = await run_all(
            provider,
            [one(r, m, cfg.repair) for _, r, m in jobs.labels],
            "distil" if cfg.progress else None,
        )
        baseline = await run_all(
            provider,
            [one(r, m, False) for r, m in jobs.baseline],
            f"baseline {cfg.baseline_split}" if cfg.progress and jobs.baseline else None,
        )
        return labelled, baseline
    finally:
        await provider.aclose()


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
    cfg: DistilConfig, task: TaskConfig, done: Labelled, t0: float, tracking: Tracking | None
) -> dict[str, Any]:
    """Write the outputs (atomically, one folder) and the metrics; raise on a budget stop."""
    out = outputs(cfg.provider, task, done, cfg.baseline_split)
    stopped = any(o.budget_stop for outs in done.by_split.values() for o in outs) or any(
        o.budget_stop for o in done.baseline or []
    )
    failure = failure_share(out.counts, out.baseline)
    metrics = metrics_of(cfg.provider, task, done, out, stopped, failure["rate"], t0)
    if failure["rate"] is not None and failure["rate"] > cfg.max_reject_rate:
        raise too_many_rejects(cfg, out, failure, metrics, stopped)
    with atomic_dir(cfg.out_dir) as tmp:
        for name, rows in out.files.items():
            write_jsonl(tmp / name, rows)
    remember_failures(cfg.provider.cache, done.failed)  # written: a re-run reproduces it
    if n := metrics["failures_recalled"]:
        log.warning(
            "%d requests failed for good in an earlier run and stay rejected, not sent again "
            "(distil.retry_failed: false; set it true to retry them)",
            n,
        )
    DistilResult.model_validate(metrics).save(cfg.metrics)
    if tracking is not None:
        log_mlflow(tracking, cfg, metrics)
    if stopped:
        raise budget_stop(done.provider, out.counts, metrics)
    return metrics


def too_many_rejects(
    cfg: DistilConfig,
    out: Outputs,
    failure: dict[str, Any],
    metrics: dict[str, Any],
    stopped: bool,
) -> DistilError:
    """Exit 6 (3 after a budget stop): the previous outputs stay, since a run that lost most
    of its records must not replace them."""
    reasons = Counter(reason_kind(r["reason"]) for r in out.rejects)
    top = "; ".join(f"{n} x {why}" for why, n in reasons.most_common(3))
    message = (
        f"{failure['failed']} of {failure['sent']} records sent to the teacher were rejected "
        f"or failed ({failure['rate']:.1%} > max_reject_rate {cfg.max_reject_rate:.1%}): "
        f"{top or 'baseline requests failed'}. {cfg.out_dir} and {cfg.metrics} were left as "
        f"they were; spent ${metrics['usd']:.4f}. Every good answer is cached: fix the "
        "teacher (or raise distil.max_reject_rate) and re-run."
    )
    if stopped:
        return DistilError(f"budget cap reached, and {message}", EXIT_BUDGET_STOP, metrics)
    return DistilError(message, EXIT_TOO_MANY_REJECTS, metrics)


def teacher_down(cfg: DistilConfig, provider: Provider) -> DistilError:
    """Exit 6 as soon as the breaker opened: an outage is not a run's worth of rejects."""
    s = provider.stats
    return DistilError(
        f"the teacher at {cfg.provider.base_url or cfg.provider.kind} looks down: "
        f"{provider.breaker.reason}; the {s.refused_down} requests left were not sent. "
        f"{cfg.out_dir} and {cfg.metrics} were left as they were; spent ${s.usd:.4f}. Every "
        "good answer is cached: re-run when the teacher is back.",
        EXIT_TOO_MANY_REJECTS,
    )


def budget_stop(
    provider: Provider | None, counts: dict[str, dict[str, int]], metrics: dict[str, Any]
) -> DistilError:
    """Exit 3 after the outputs were written: what was labelled is kept."""
    budget = provider.budget if provider else None
    return DistilError(
        f"budget cap reached (spent ${budget.spent_usd:.4f} of max_usd ${budget.max_usd:.2f}, "
        f"{budget.requests} of max_requests {budget.max_requests} requests): stopped "
        f"cleanly; {sum(c['labelled'] for c in counts.values())} records labelled and "
        f"kept, {sum(c['not_labelled_budget'] for c in counts.values())} not labelled. "
        "Every answer is cached: raise the cap and re-run to finish.",
        EXIT_BUDGET_STOP,
        metrics,
    )


def log_mlflow(tracking: Tracking, cfg: DistilConfig, metrics: dict[str, Any]) -> None:
    """A child run of the pipeline run with the distil params and flat numeric metrics."""
    with tracking.child("distil", "distil") as run:
        run.log_params({k: str(v)[:500] for k, v in flatten({"distil": cfg.model_dump()}).items()})
        run.log_metrics(flatten(metrics))
