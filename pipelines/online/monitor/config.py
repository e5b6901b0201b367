"""`monitor:` in params.yaml: the request log, the judge on sampled traffic, review, drift, probes."""

from __future__ import annotations

from pydantic import Field

from ...config import Section
from ...providers import ProviderConfig


def _judge_provider() -> ProviderConfig:
    # Nothing leaves the machine unless configured: a loopback-only endpoint by default.
    return ProviderConfig(
        kind="openai",
        model="gpt-6-luna",
        max_tokens=64,
        max_usd=5.0,
        cache=".cache/monitor-judge.sqlite",
    )


class JudgeSampleConfig(Section):
    """`monitor.judge`: which logged answers the LLM judge checks, and with what."""

    share: float = Field(
        0.15,
        ge=0,
        le=1,
        description="Share of logged task answers sent to the judge (picked by a hash of the "
        "request id: the same rows on every run, no row judged twice).",
    )
    provider: ProviderConfig = Field(
        default_factory=_judge_provider,
        description="The judge's endpoint, cache, budget and privacy guard (as distil.provider).",
    )
    salt: str = Field("temper-monitor-v1", description="Salt of the sampling hash.")
    max_per_run: int | None = Field(
        500, gt=0, description="Most rows judged by one `temper monitor judge` (null: all)."
    )
    window_hours: float = Field(
        24.0, gt=0, description="Width of the windows quality is estimated over."
    )


class ReviewConfig(Section):
    """`monitor.review`: what goes to human reviewers."""

    share: float = Field(
        0.05, ge=0, le=1, description="Random share of logged answers sent for review."
    )
    low_confidence: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Answers less confident than this are always sent (and every answer the "
        "judge disputed).",
    )
    salt: str = Field("temper-review-v1", description="Salt of the sampling hash.")
    out_dir: str = Field("reports/monitor/review", description="Where review files are written.")


class DriftConfig(Section):
    """`monitor.drift`: production windows against the data the model was built and tested on."""

    reference: list[str] = Field(
        default_factory=lambda: ["data/prepared/train.jsonl", "data/prepared/validation.jsonl"],
        description="Prepared JSONL files whose `text` is the input reference.",
    )
    reference_predictions: str = Field(
        "reports/predictions",
        description="The evaluated answers the output mix is compared with: a predictions "
        "JSONL, or the folder evaluate wrote (the file of metrics/eval.json's winner is used).",
    )
    eval_file: str = Field("metrics/eval.json", description="Names the winner (see above).")
    window: int = Field(200, gt=10, description="The most recent logged requests compared.")
    max_reference: int = Field(1000, gt=10, description="Reference rows used (seeded sample).")
    alpha: float = Field(
        0.01, gt=0, lt=1, description="False-alarm rate per check of each kind of drift."
    )
    permutations: int = Field(500, gt=10, description="MMD permutation-test permutations.")
    seed: int = Field(0, description="Seed of the samples and permutations.")


class QualityConfig(Section):
    """`monitor.quality`: the alarm on judged (or reviewed) errors."""

    rule: str = Field(
        "cusum",
        pattern=r"^(cusum|weekly|both)$",
        description="cusum: a Bernoulli CUSUM designed for false_alarms_per_year; weekly: the "
        "common '100 samples a week, alarm at a 5-point drop' rule; both.",
    )
    baseline_accuracy: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Accuracy in control (null: the evaluated winner's primary metric in "
        "drift.eval_file).",
    )
    detect_drop: float = Field(
        0.05, gt=0, lt=1, description="The accuracy drop the CUSUM is tuned to catch fastest."
    )
    false_alarms_per_year: float = Field(
        1.0, gt=0, description="Target false-alarm rate of the CUSUM at the judged volume."
    )
    judged_per_day: float | None = Field(
        None,
        gt=0,
        description="Judged answers a day the CUSUM is designed for (null: measured from "
        "the log's verdicts).",
    )


class ProbeConfig(Section):
    """`monitor.probe`: a fixed set of real clauses sent to each API tier to catch vendor updates."""

    source: str = Field(
        "data/prepared/validation.jsonl", description="Prepared JSONL the probe set is drawn from."
    )
    size: int = Field(40, gt=0, description="Probe clauses (a seeded sample).")
    seed: int = Field(0, description="Seed of the sample.")
    alpha: float = Field(
        0.01, gt=0, lt=1, description="Alarm when answers change more than chance allows."
    )
    expected_agreement: float = Field(
        0.95,
        gt=0,
        le=1,
        description="Share of answers a tier repeats run to run with no model change "
        "(temperature 0 is not fully deterministic at the vendors).",
    )


class MonitorConfig(Section):
    """`monitor:` in params.yaml (docs/monitor.md)."""

    log: bool = Field(True, description="`temper serve` logs every request to `path`.")
    path: str = Field(
        ".cache/monitor.sqlite",
        description="The request log and the verdicts, reviews and probes (sqlite, WAL).",
    )
    log_inputs: bool = Field(
        False,
        description="Keep each input's text (redacted: emails, cards, IPs, phones); false: "
        "only its hash and embedding.",
    )
    embed: bool = Field(
        True,
        description="Store each input's embedding (for input drift), computed off the "
        "request path by the log's writer thread.",
    )
    embedder: str | None = Field(
        None, description="A sentence-transformers folder (null: all-MiniLM-L6-v2, offline)."
    )
    queue_size: int = Field(
        10_000,
        gt=0,
        description="Rows waiting to be written; beyond it rows are dropped and counted "
        "(temper_monitor_log_dropped_total), never the request.",
    )
    retention_days: float = Field(30.0, gt=0, description="Older rows are deleted.")
    max_rows: int = Field(1_000_000, gt=0, description="Most rows kept (the oldest go first).")
    trace_share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of served requests traced to MLflow (MLflow Tracing; 0: none).",
    )
    trace_experiment: str = Field("temper-serve", description="MLflow experiment of the traces.")
    state_file: str = Field(
        "reports/monitor/state.json",
        description="`temper monitor report` writes the gauges here; `temper serve` exports "
        "them at /metrics.",
    )
    report_dir: str = Field("reports/monitor", description="The report, its plots and data.")
    judge: JudgeSampleConfig = Field(default_factory=JudgeSampleConfig)
    review: ReviewConfig = Field(default_factory=ReviewConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
