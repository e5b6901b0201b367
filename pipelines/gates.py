"""Release gates: thresholds a candidate must meet before it can be the winner (`gates:`).

Every gate may be null (off). The judge gate counts only when the judge is calibrated: an
uncalibrated judge's win rate is reported but decides nothing.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from .config import Section


class GatesConfig(Section):
    """`gates:` in params.yaml."""

    min_primary: float | None = Field(
        0.5, description="Minimum value of evaluate.primary_metric.")
    min_delta_low: float | None = Field(
        0.0, description="Minimum lower bound of the paired 95% interval of the primary "
        "metric's difference candidate - baseline (0: must be significantly better).")
    min_json_valid_rate: float | None = Field(
        0.95, ge=0, le=1, description="Minimum share of answers that hold a JSON object.")
    min_schema_valid_rate: float | None = Field(
        None, ge=0, le=1, description="Minimum share of answers that fit the schema exactly "
        "(fields, types, allowed labels).")
    max_p95_latency_ms: float | None = Field(
        None, gt=0, description="Maximum p95 latency per example in ms (batched, amortised).")
    min_judge_win_rate: float | None = Field(
        None, ge=0, le=1, description="Minimum judge win rate vs baseline (ties count half); "
        "applies only when the judge ran and is calibrated.")


def check(cfg: GatesConfig, primary: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Gate results of one candidate's eval entry: {"passed": bool, "checks": [...]}."""
    metrics = entry["metrics"]
    delta = entry.get("delta_vs_baseline") or {}
    judge = entry.get("judge") or {}
    checks: list[dict[str, Any]] = []

    def add(name: str, threshold: float | None, value: float | None, op: str,
            note: str = "") -> None:
        if threshold is None:
            return
        if value is None:
            checks.append({"gate": name, "threshold": threshold, "op": op, "value": None,
                           "passed": op == "skip", "note": note})
            return
        ok = value >= threshold if op == ">=" else value <= threshold
        checks.append({"gate": name, "threshold": threshold, "op": op, "value": value,
                       "passed": bool(ok), "note": note})

    add("min_primary", cfg.min_primary, metrics.get(primary, {}).get("value"), ">=", primary)
    if cfg.min_delta_low is not None:
        low = delta.get(primary, {}).get("ci_low")
        add("min_delta_low", cfg.min_delta_low, low, ">=",
            f"lower CI of {primary} delta" if delta else "no baseline: cannot pass")
    add("min_json_valid_rate", cfg.min_json_valid_rate,
        metrics.get("json_valid_rate", {}).get("value"), ">=")
    add("min_schema_valid_rate", cfg.min_schema_valid_rate,
        metrics.get("schema_valid_rate", {}).get("value"), ">=")
    add("max_p95_latency_ms", cfg.max_p95_latency_ms,
        metrics.get("latency_ms_p95", {}).get("value"), "<=")
    if cfg.min_judge_win_rate is not None:
        if judge.get("calibrated"):
            add("min_judge_win_rate", cfg.min_judge_win_rate, judge["win_rate"]["value"], ">=",
                "calibrated judge")
        else:
            reason = "judge not run" if not judge else "judge uncalibrated: not counted"
            checks.append({"gate": "min_judge_win_rate", "threshold": cfg.min_judge_win_rate,
                           "op": ">=", "value": None, "passed": True, "skipped": True,
                           "note": reason})
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def table(evaluation: dict[str, Any]) -> str:
    """A plain-text table of every candidate's gate checks (for `temper gate` and the report)."""
    rows = [("candidate", "gate", "value", "threshold", "result")]
    for name, entry in (evaluation.get("candidates") or {}).items():
        for c in entry.get("gates", {}).get("checks", []):
            value = "n/a" if c["value"] is None else f"{c['value']:.4g}"
            result = "skip" if c.get("skipped") else ("PASS" if c["passed"] else "FAIL")
            note = f" ({c['note']})" if c.get("note") else ""
            rows.append((name, c["gate"] + note, value, f"{c['op']} {c['threshold']:.4g}", result))
        if not entry.get("gates", {}).get("checks"):
            rows.append((name, "(no gates configured)", "", "", "PASS"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
