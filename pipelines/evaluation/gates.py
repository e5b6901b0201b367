"""Release gates: thresholds a candidate must meet before it can be the winner (`gates:`).

Every gate may be null (off). The judge gate counts only when the judge is calibrated: an
uncalibrated judge's win rate is reported but decides nothing.

Against the baseline the test depends on what the baseline is (`vs_baseline`): the base model
prompted like the teacher must be beaten (superiority: the lower bound of the paired interval
of candidate - baseline >= `min_delta_low`); the API teacher need only not be beaten by more
than a margin (non-inferiority: lower bound > -`non_inferiority_margin`), since matching the
API at a fraction of its cost is the point. `auto` picks by the baseline's kind.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..config import Section
from ..results import CandidateEval, Estimate, EvalResult, GateCheck, GateResult, JudgeResult


class GatesConfig(Section):
    """`gates:` in params.yaml."""

    min_primary: float | None = Field(0.5, description="Minimum value of evaluate.primary_metric.")
    min_delta_low: float | None = Field(
        0.0,
        description="Minimum lower bound of the paired 95% interval of the primary "
        "metric's difference candidate - baseline (0: must be significantly better).",
    )
    vs_baseline: Literal["auto", "superiority", "non_inferiority"] = Field(
        "auto",
        description="The test against the baseline. auto: non_inferiority when the baseline "
        "is the API teacher (evaluate.baseline_file), superiority when it is the base model.",
    )
    non_inferiority_margin: float | None = Field(
        0.05,
        ge=0,
        description="Non-inferiority passes when the lower bound of the paired interval of "
        "the primary metric's candidate - baseline is > -margin (null: no such gate).",
    )
    min_delta_vs_classical_low: float | None = Field(
        None,
        description="Minimum lower bound of the paired interval of the primary metric's "
        "difference candidate - classical yardstick (TF-IDF + logistic regression trained on "
        "the same records; e.g. -0.05: no more than 5 points worse). null: off (the report "
        "shows the difference either way).",
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


def baseline_test(cfg: GatesConfig, baseline_kind: str | None) -> str:
    """The test against the baseline in force: `superiority` or `non_inferiority`."""
    if cfg.vs_baseline != "auto":
        return cfg.vs_baseline
    return "non_inferiority" if baseline_kind == "api" else "superiority"


def check(
    cfg: GatesConfig, primary: str, entry: CandidateEval, baseline_kind: str | None = None
) -> GateResult:
    """Gate results of one candidate's evaluation (`baseline_kind`: api, base_model, None)."""
    checks: list[GateCheck] = []
    metrics = entry.metrics
    _add(checks, "min_primary", cfg.min_primary, _value(metrics, primary), ">=", primary)
    _add_baseline_gate(checks, cfg, primary, entry.delta_vs_baseline or {}, baseline_kind)
    classical = entry.delta_vs_classical or {}
    _add(
        checks,
        "min_delta_vs_classical_low",
        cfg.min_delta_vs_classical_low,
        _value(classical, primary, "ci_low"),
        ">=",
        f"lower CI of {primary} delta vs the classical yardstick"
        if primary in classical
        else "no yardstick for this metric: cannot pass",
    )
    _add(
        checks,
        "min_json_valid_rate",
        cfg.min_json_valid_rate,
        _value(metrics, "json_valid_rate"),
        ">=",
    )
    _add(
        checks,
        "min_schema_valid_rate",
        cfg.min_schema_valid_rate,
        _value(metrics, "schema_valid_rate"),
        ">=",
    )
    _add(
        checks,
        "max_p95_latency_ms",
        cfg.max_p95_latency_ms,
        _value(metrics, "latency_ms_p95"),
        "<=",
        "per request",
    )
    _add_judge_gate(checks, cfg, entry.judge)
    return GateResult(passed=all(c.passed for c in checks), checks=checks)


def _value(metrics: dict[str, Estimate], key: str, part: str = "value") -> float | None:
    """A metric's value or interval bound; None when it was not measured (the gate fails)."""
    return getattr(metrics[key], part) if key in metrics else None


def _add(
    checks: list[GateCheck],
    name: str,
    threshold: float | None,
    got: float | None,
    op: str,
    note: str = "",
) -> None:
    """Append one gate's check; a gate set to null is off and adds nothing, a missing value
    fails."""
    if threshold is None:
        return
    ok = (
        got is not None
        and {
            ">=": got >= threshold,
            "<=": got <= threshold,
            ">": got > threshold,
        }[op]
    )
    checks.append(
        GateCheck(gate=name, threshold=threshold, op=op, value=got, passed=bool(ok), note=note)
    )


def _add_baseline_gate(
    checks: list[GateCheck],
    cfg: GatesConfig,
    primary: str,
    delta: dict[str, Estimate],
    baseline_kind: str | None,
) -> None:
    """The gate against the baseline: superiority over the base model, non-inferiority to the
    API teacher (`baseline_test`); without a baseline it cannot pass."""
    who = {"api": "API teacher", "base_model": "base model"}.get(baseline_kind or "", "baseline")
    if baseline_test(cfg, baseline_kind) == "superiority":
        _add(
            checks,
            "min_delta_low",
            cfg.min_delta_low,
            _value(delta, primary, "ci_low"),
            ">=",
            f"superiority vs {who}: lower CI of {primary} delta"
            if delta
            else "no baseline: cannot pass",
        )
    elif cfg.non_inferiority_margin is not None:
        _add(
            checks,
            "non_inferiority",
            -cfg.non_inferiority_margin,
            _value(delta, primary, "ci_low"),
            ">",
            f"non-inferiority vs {who}: lower CI of {primary} delta > -margin"
            if delta
            else "no baseline: cannot pass",
        )


def _add_judge_gate(checks: list[GateCheck], cfg: GatesConfig, judge: JudgeResult | None) -> None:
    """The judge's win rate gates only when the judge is calibrated; otherwise the check is
    recorded as skipped (passed), so an unreliable judge decides nothing."""
    if cfg.min_judge_win_rate is None:
        return
    if judge is not None and judge.calibrated:
        _add(
            checks,
            "min_judge_win_rate",
            cfg.min_judge_win_rate,
            judge.win_rate.value,
            ">=",
            "calibrated judge",
        )
        return
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


def best(values: dict[str, float | None]) -> str | None:
    """The name with the highest value; ties go to the first name in alphabetical order (a
    missing value counts as the lowest)."""
    ranked = sorted(values, key=lambda n: (-(values[n] if values[n] is not None else -1e300), n))
    return ranked[0] if ranked else None


def passes(result: EvalResult, name: str) -> bool:
    gates = result.candidates[name].gates
    return gates is not None and gates.passed


def pick_winner(result: EvalResult) -> str | None:
    """The winner under `result.selection`: on validation, the candidate chosen there if it
    passes its gates on test (else none: picking the next one by its test figures would
    select on test after all); without a validation split, the best passing candidate on
    test (ties as in `best`)."""
    sel = result.selection
    if sel is not None and sel.split == "validation":
        return sel.chosen if sel.chosen is not None and passes(result, sel.chosen) else None
    primary = result.primary_metric
    return best(
        {n: c.metrics[primary].value for n, c in result.candidates.items() if passes(result, n)}
    )


def gate_all(cfg: GatesConfig, result: EvalResult) -> str | None:
    """Gate every candidate of `result` (in place) and return the winner."""
    kind = result.baseline.kind if result.baseline is not None else None
    for entry in result.candidates.values():
        entry.gates = check(cfg, result.primary_metric, entry, kind)
    return pick_winner(result)
