"""Release gates: thresholds a candidate must meet before it can be the winner (`gates:`).

Every gate may be null (off). The judge gate counts only when the judge is calibrated: an
uncalibrated judge's win rate is reported but decides nothing.
"""

from __future__ import annotations

from pydantic import Field

from ..config import Section
from ..results import CandidateEval, Estimate, EvalResult, GateCheck, GateResult


class GatesConfig(Section):
    """`gates:` in params.yaml."""

    min_primary: float | None = Field(0.5, description="Minimum value of evaluate.primary_metric.")
    min_delta_low: float | None = Field(
        0.0,
        description="Minimum lower bound of the paired 95% interval of the primary "
        "metric's difference candidate - baseline (0: must be significantly better).",
    )
    min_json_valid_rate: float | None = Field(
        0.95, ge=0, le=1, description="Minimum share of answers that hold a JSON object."
    )
    min_schema_valid_rate: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Minimum share of answers that fit the schema exactly "
        "(fields, types, allowed labels).",
    )
    max_p95_latency_ms: float | None = Field(
        None,
        gt=0,
        description="Maximum p95 of per-request latency in ms (each answer's own "
        "time from its batch's start; not the amortised figure).",
    )
    min_judge_win_rate: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Minimum judge win rate vs baseline (ties count half); "
        "applies only when the judge ran and is calibrated.",
    )


def check(cfg: GatesConfig, primary: str, entry: CandidateEval) -> GateResult:
    """Gate results of one candidate's evaluation."""
    delta = entry.delta_vs_baseline or {}
    judge = entry.judge
    checks: list[GateCheck] = []

    def value(metrics: dict[str, Estimate], key: str, part: str = "value") -> float | None:
        return getattr(metrics[key], part) if key in metrics else None

    def add(name: str, threshold: float | None, got: float | None, op: str, note: str = "") -> None:
        if threshold is None:
            return
        ok = got is not None and (got >= threshold if op == ">=" else got <= threshold)
        checks.append(
            GateCheck(gate=name, threshold=threshold, op=op, value=got, passed=bool(ok), note=note)
        )

    metrics = entry.metrics
    add("min_primary", cfg.min_primary, value(metrics, primary), ">=", primary)
    add(
        "min_delta_low",
        cfg.min_delta_low,
        value(delta, primary, "ci_low"),
        ">=",
        f"lower CI of {primary} delta" if delta else "no baseline: cannot pass",
    )
    add("min_json_valid_rate", cfg.min_json_valid_rate, value(metrics, "json_valid_rate"), ">=")
    add(
        "min_schema_valid_rate",
        cfg.min_schema_valid_rate,
        value(metrics, "schema_valid_rate"),
        ">=",
    )
    add(
        "max_p95_latency_ms",
        cfg.max_p95_latency_ms,
        value(metrics, "latency_ms_p95"),
        "<=",
        "per request",
    )
    if cfg.min_judge_win_rate is not None:
        if judge is not None and judge.calibrated:
            add(
                "min_judge_win_rate",
                cfg.min_judge_win_rate,
                judge.win_rate.value,
                ">=",
                "calibrated judge",
            )
        else:
            reason = "judge not run" if judge is None else "judge uncalibrated: not counted"
            checks.append(
                GateCheck(
                    gate="min_judge_win_rate",
                    threshold=cfg.min_judge_win_rate,
                    op=">=",
                    value=None,
                    passed=True,
                    skipped=True,
                    note=reason,
                )
            )
    return GateResult(passed=all(c.passed for c in checks), checks=checks)


def pick_winner(result: EvalResult) -> str | None:
    """The best candidate on the primary metric among those that pass their gates."""
    passing = [n for n, c in result.candidates.items() if c.gates is not None and c.gates.passed]
    return max(
        passing,
        key=lambda n: (result.candidates[n].metrics[result.primary_metric].value or 0.0, n),
        default=None,
    )
