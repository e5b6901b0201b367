"""The typed results stages hand each other: what evaluate writes, what train writes.

One model per file a stage writes and another reads (`metrics/eval.json`,
`models/candidates/<name>/train_metrics.json`). The writer builds the model and saves it
with `save`; every reader loads it with `load`, so nobody guesses shapes: a field that is
renamed in one place fails in the other at once, with the file's name in the error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import TemperError
from .io import read_json, write_json

R = TypeVar("R", bound="Result")


class ResultError(TemperError, ValueError):
    """A result file is missing or does not match its model (the message names the file)."""


class Result(BaseModel):
    """Base: strict (unknown fields are errors), with load/save that name the file."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @classmethod
    def load(cls: type[R], path: str | Path) -> R:
        path = Path(path)
        if not path.exists():
            raise ResultError(f"{path}: not found (run the stage that writes it first)")
        try:
            return cls.model_validate(read_json(path))
        except ValueError as err:  # JSON decode errors and pydantic's ValidationError
            if isinstance(err, ValidationError):
                lines = [
                    f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()[:10]
                ]
                raise ResultError(f"{path}: not a {cls.__name__}:\n" + "\n".join(lines)) from None
            raise ResultError(f"{path}: {err}") from None

    def save(self, path: str | Path) -> None:
        """Strict JSON (NaN/inf become null), sorted keys, written atomically."""
        write_json(path, finite(self.model_dump(mode="json")))


def finite(obj: Any) -> Any:
    """NaN/inf -> None, recursively: result files stay strict JSON."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --------------------------------------------------------------------------- evaluate


class Estimate(Result):
    """A metric: its value and, where it has one, its bootstrap interval."""

    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None

    def triple(self) -> tuple[float | None, float | None, float | None]:
        return self.value, self.ci_low, self.ci_high


class GateCheck(Result):
    gate: str
    op: Literal[">=", "<=", ">"]
    threshold: float
    value: float | None
    passed: bool
    note: str = ""
    skipped: bool = False


class GateResult(Result):
    passed: bool
    checks: list[GateCheck] = Field(default_factory=list)


class JudgeResult(Result):
    """The pairwise judge's verdicts of one candidate against the baseline."""

    n_sampled: int
    n_judged: int
    n_asked: int
    n_identical: int
    errors: int
    error_examples: list[str]
    win_rate: Estimate
    win: Estimate
    tie: Estimate
    loss: Estimate
    flip_rate: float | None
    first_position_rate: float | None
    n_decided: int
    agreement: float | None
    min_agreement: float
    calibrated: bool
    usd_new: float


class CandidateEval(Result):
    """One candidate adapter's evaluation."""

    adapter: str
    adapter_sha256: str | None = None
    seconds: float
    # Answers reused from evaluate.cache_dir (`seconds` is then the run that made them).
    cached: bool = False
    metrics: dict[str, Estimate]
    delta_vs_baseline: dict[str, Estimate] | None = None
    # Paired differences candidate - classical yardstick on its fields (see ClassicalEval).
    delta_vs_classical: dict[str, Estimate] | None = None
    # The same metrics on the validation split: what picks the winner (see Selection).
    validation_metrics: dict[str, Estimate] | None = None
    judge: JudgeResult | None = None
    gates: GateResult | None = None


class BaselineEval(Result):
    """The system the candidates must beat: the API teacher's answers or the base model."""

    name: str = "baseline"
    kind: Literal["api", "base_model"]
    metrics: dict[str, Estimate]
    source: str | None = None  # api: the answers file
    usd_total: float | None = None  # api: what the answers cost
    missing: int | None = None  # api: test ids with no answer (scored wrong)
    few_shot_ids: list[str] | None = None  # base_model: the few-shot turns
    seconds: float | None = None
    cached: bool | None = None  # base_model: answers reused from evaluate.cache_dir


class ClassicalEval(Result):
    """The classical yardstick: TF-IDF (word 1-2 grams) + logistic regression, one per label
    field, trained on the distilled training records the candidates saw and scored on the
    same test records. Its metrics cover those label fields only."""

    name: str = "classical"
    kind: Literal["tfidf_logreg"] = "tfidf_logreg"
    metrics: dict[str, Estimate]
    fields: list[str]
    train_file: str
    train_sha256: str
    n_train: int
    settings: dict[str, Any]  # the vectoriser's and the classifier's parameters
    seconds: float
    cached: bool


class TaskRef(Result):
    name: str
    prompt_hash: str


class JudgeInfo(Result):
    enabled: bool
    provider: str
    model: str
    sample_frac: float


class Selection(Result):
    """How the winner was chosen: the split, the metric and each candidate's value on it.

    On `validation` the winner is the candidate with the highest value (ties: the first name
    in alphabetical order), and it wins only if it passes its gates on the test split; the
    test split then reports it without having chosen it. On `test` (no validation file) the
    best candidate that passes its gates wins, and the figures on test are optimistic."""

    split: Literal["validation", "test"]
    file: str
    sha256: str
    n_examples: int
    metric: str
    values: dict[str, float | None]
    chosen: str | None
    tie_break: str = "highest value, then first name in alphabetical order"


class EvalResult(Result):
    """`metrics/eval.json`: written by the evaluate stage; read by register, gate, promote."""

    primary_metric: str
    n_examples: int
    test_file: str
    test_sha256: str
    confidence: float
    n_resamples: int
    task: TaskRef
    baseline: BaselineEval | None
    candidates: dict[str, CandidateEval]
    classical: ClassicalEval | None = None  # None: no label field, or evaluate.classical off
    winner: str | None
    selection: Selection | None = None  # None: written before selection on validation
    judge: JudgeInfo
    gates_config: dict[str, float | str | None]
    seconds: float

    def candidate(self, name: str, path: str | Path = "eval.json") -> CandidateEval:
        if name not in self.candidates:
            raise ResultError(f"{path}: no candidate {name!r} (have {sorted(self.candidates)})")
        return self.candidates[name]


# --------------------------------------------------------------------------- distil


class TeacherRef(Result):
    kind: str
    model: str


class DistilResult(Result):
    """`metrics/distil.json`: written by distil; read by register (teacher, labelling cost)."""

    teacher: TeacherRef
    complete: bool
    stopped_reason: str | None
    records: dict[str, dict[str, int]]
    rejects: int
    requests: int
    calls: int
    cache_hits: int
    retries: int
    failures: int
    errors: dict[str, int]
    tokens_in: int
    tokens_out: int
    usd: float
    usd_estimate: float | None
    usd_estimate_worst_case: float | None
    over_limit_replies: int
    abandoned_requests: int
    usd_charged_worst_case: float
    usd_claimed_over_limit: float
    failures_recalled: int = 0  # failed in an earlier run, rejected again unsent (retry_failed)
    reject_rate: float | None
    max_usd: float | None
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    redactions: dict[str, int]
    teacher_agreement: dict[str, Any] | None
    baseline: dict[str, Any] | None
    few_shot_ids: list[str]
    wall_s: float
    batch: dict[str, Any] | None = None  # mode: batch (providers.batch): batches, answers, errors

    @property
    def teacher_text(self) -> str:
        if self.teacher.kind == "gold":
            return "gold labels of the dataset (no teacher)"
        return f"{self.teacher.kind}:{self.teacher.model}"


# --------------------------------------------------------------------------- train


class TrainResult(Result):
    """`models/candidates/<name>/train_metrics.json`: written by train; read by evaluate
    (for the candidate's MLflow run), register (lineage, card) and `temper merge`."""

    candidate: str
    steps: int
    train_loss: float | None
    train_loss_mean: float | None
    val_loss: float
    base_val_loss: float
    train_seconds: float
    train_tokens: int
    tokens_per_s: float | None
    peak_rss_mb: float
    peak_cuda_mb: float | None
    train_records: int
    clauses_cut: int
    val_records: int
    trainable_params: int
    precision: str
    gradient_checkpointing: bool
    num_processes: int
    rank_weight_hashes: list[str]
    rank_tokens: list[int]
    resumed: bool
    mlflow_run_id: str | None
    mlflow_model_id: str | None = None  # the adapter as an MLflow logged model
    base_model_hash: str
    data_hash: str
    config: dict[str, Any]

    @property
    def method(self) -> str:
        return str(self.config.get("method", "lora"))


# --------------------------------------------------------------------------- route


class RouteResult(Result):
    """`reports/route.json`: written by the route stage; read by register and `temper cost`."""

    winner: str  # the routed candidate: evaluate's winner, else its validation choice
    passed_gates: bool = True  # false: evaluate chose no winner (shown, not released)
    oracle: bool  # every API tier is the gold labels: an upper bound, not a measurement
    fitted_on: Literal["validation", "test"]
    target: str
    target_value: float
    target_reached: bool
    threshold: float  # the self tier keeps answers at least this confident
    n_fit: int
    n_test: int
    tiers: list[str]  # "self", then the API tiers in escalation order
    shares: dict[str, float]  # fraction of test requests each tier answered
    share_estimates: dict[str, Estimate]
    accuracy: Estimate  # of the routed answers (API tiers: the oracle when `oracle`)
    self_only_accuracy: Estimate  # the self tier answering everything
    kept_accuracy: Estimate  # of the answers the self tier kept
    usd_per_1k: Estimate  # routed cost per 1,000 requests
    all_api_usd_per_1k: dict[str, float]  # every request to one API tier
    self_usd_per_1k: float
    self_latency_ms_p50: Estimate | None  # per request, batched CPU evaluation
    self_latency_ms_p95: Estimate | None
    api_failures: dict[str, int] = Field(default_factory=dict)  # real tiers: no answer
    prices: dict[str, str]  # tier -> the price-table model it was charged as
    prices_verified: bool
    prices_as_of: str
    curve_fit: list[dict[str, float | None]]
    curve_test: list[dict[str, float | None]]


# --------------------------------------------------------------------------- cost


class CostOption(Result):
    """One way to serve the traffic profile, per month."""

    monthly_usd: float
    api_usd: float  # API calls
    machine_usd: float  # self-hosted machine hours
    machine_hours: float
    machines: float  # machines running on average (machine_hours / hours in the month)


class CostInputs(Result):
    """The measured inputs `temper cost` used, each with where it came from."""

    throughput_rps: float  # requests/s of one self-hosted machine, batched
    throughput_source: str
    shares: dict[str, float]  # fraction of requests each tier answers ("self", API tiers)
    shares_source: str
    oracle: bool  # the shares come from the route stage's offline oracle tiers
    cache_hit_rate: float  # fraction of requests the semantic cache answers
    cache_source: str


class CostResult(Result):
    """`reports/cost.json`: written by `temper cost`; read by the README and people."""

    config: dict[str, Any]  # the `cost:` section as run (traffic profile, models, machine)
    monthly_requests: float
    hours_per_month: float
    inputs: CostInputs
    prices: dict[str, Any]  # the price-table rows used, with source and date
    per_request_usd: dict[str, float]  # each API model (cached prefix priced), self marginal
    options: dict[str, CostOption]  # all_api, self_hosted, hybrid
    cheapest: str
    break_even_requests_per_month: float | None  # self-hosted = all-API (None: never)
    hybrid_break_even_requests_per_month: float | None  # hybrid = all-API (None: never)
    triggers: dict[str, bool]
    notes: list[str]


# --------------------------------------------------------------------------- cache_eval


class Rate(Result):
    """k of n, with its Wilson 95% interval (all None when n is 0)."""

    k: int
    n: int
    value: float | None
    ci_low: float | None
    ci_high: float | None


class CacheRow(Result):
    """One cache setting replayed: the exact layer alone (`threshold` None) or exact +
    similarity at `threshold`."""

    threshold: float | None
    requests: int
    hits: int
    exact_hits: int
    similar_hits: int
    wrong_hits: int
    hit_rate: Rate  # hits / requests
    wrong_among_hits: Rate  # wrong hits / hits: the rule's rate
    wrong_any_label: Rate  # hits wrong even when any gold label of the clause counts / hits
    added_error: Rate  # wrong hits / requests (the oracle's added error)
    wrong_by_origin: dict[str, int]  # wrong hits by the request's origin


class CacheDefault(Result):
    """The setting the rule picks: the highest hit rate whose wrong-among-hits upper bound
    is within the bound; the exact layer alone (`threshold` None) when none is."""

    threshold: float | None
    hit_rate: float
    hit_rate_ci: list[float | None]
    wrong_among_hits: Rate
    added_error: Rate
    bound_met: bool
    rule: str


class CacheEvalResult(Result):
    """`reports/cache.json`: written by the cache_eval stage; read by `temper cost` (the
    default's hit rate and threshold) and docs/cache.md."""

    default: CacheDefault
    exact: CacheRow
    thresholds: list[CacheRow]
    replay: dict[str, int]  # requests by origin
    answer_source: str
    embedder: str
    max_tokens: int
    long_inputs: int  # requests past max_tokens: never looked up on similarity
    match_numbers: bool  # similarity hits needed the same numbers in both texts
    seed: int
