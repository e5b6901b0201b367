"""The tables of `reports/eval.md`, and the one Markdown table formatter of the project.

Each function here turns the recorded evaluation (`metrics/eval.json`'s content) into Markdown
lines: the metrics, the paired deltas, the judge, per-class figures, the worst answers, the
yardstick, key terms and calibration; `md_table`, `fmt` and `gate_table` also serve the model
card, the cost page and the CLI. Pure text, no files: kept apart from `eval_report.py` (which
orders these sections into the page and writes the stage's files) so the many readers of
`md_table` (the cost and register stages, the CLI) do not import the plotting and file code.
"""

from __future__ import annotations

import math
from typing import Any

from ..results import EvalResult

# Metrics shown in the main table, in this order, when present.
HEADLINE = [
    "accuracy",
    "accuracy_any",
    "macro_f1",
    "rougeL",
    "null_match",
    "json_valid_rate",
    "schema_valid_rate",
    "latency_ms_p50",
    "latency_ms_p95",
    "latency_ms_amortised",
    "tokens_per_s",
    "usd_per_1k",
]


def fmt(m: dict[str, Any] | None, digits: int = 3) -> str:
    if (
        not m
        or m.get("value") is None
        or (isinstance(m["value"], float) and math.isnan(m["value"]))
    ):
        return "n/a"
    v = m["value"]
    text = f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.0f}"
    if m.get("ci_low") is not None and m.get("ci_high") is not None:
        text += f" [{m['ci_low']:.{digits}f}, {m['ci_high']:.{digits}f}]"
    return text


def headline_keys(metrics: dict[str, Any]) -> list[str]:
    keys = []
    for short in HEADLINE:
        keys += [k for k in sorted(metrics) if k == short or k.endswith("." + short)]
    return keys


def headline_metric_keys(sysm: dict[str, dict[str, Any]]) -> list[str]:
    """The headline metrics of every system, each once: the first system's in `HEADLINE`
    order, then those the next ones add."""
    keys: list[str] = []
    for entry in sysm.values():
        keys += [k for k in headline_keys(entry["metrics"]) if k not in keys]
    return keys


def gate_table(result: EvalResult) -> str:
    """Every candidate's gate checks as a Markdown table (`temper gate`, the report)."""
    rows = []
    for name, entry in result.candidates.items():
        checks = entry.gates.checks if entry.gates is not None else []
        for c in checks:
            shown = "n/a" if c.value is None else f"{c.value:.4g}"
            verdict = "skip" if c.skipped else ("PASS" if c.passed else "FAIL")
            note = f" ({c.note})" if c.note else ""
            rows.append([name, c.gate + note, shown, f"{c.op} {c.threshold:.4g}", verdict])
        if not checks:
            rows.append([name, "(no gates configured)", "", "", "PASS"])
    return md_table(["candidate", "gate", "value", "threshold", "result"], rows)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: the one table formatter of the project (reports, cards, CLI)."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def metric_lines(sysm: dict[str, dict[str, Any]], keys: list[str]) -> list[str]:
    """The headline table, then every other metric folded away so the table stays readable."""
    rows = [[k] + [fmt(e["metrics"].get(k)) for e in sysm.values()] for k in keys]
    lines = [md_table(["metric"] + list(sysm), rows), ""]
    other = sorted({k for e in sysm.values() for k in e["metrics"]} - set(keys))
    if other:
        rows = [[k] + [fmt(e["metrics"].get(k)) for e in sysm.values()] for k in other]
        lines += [
            "<details><summary>All metrics</summary>",
            "",
            md_table(["metric"] + list(sysm), rows),
            "",
            "</details>",
            "",
        ]
    return lines


def baseline_delta_lines(evaluation: dict[str, Any], keys: list[str]) -> list[str]:
    """The paired differences candidate - baseline of the headline metrics."""
    cands = evaluation["candidates"]
    dkeys = [
        k for k in keys if any(k in (c.get("delta_vs_baseline") or {}) for c in cands.values())
    ]
    rows = [
        [k] + [fmt((c.get("delta_vs_baseline") or {}).get(k)) for c in cands.values()]
        for k in dkeys
    ]
    return [
        "## Candidate - baseline (paired)",
        "",
        md_table(["metric"] + list(cands), rows),
        "",
        "![deltas](deltas.png)",
        "",
    ]


def judge_lines(evaluation: dict[str, Any]) -> list[str]:
    """The LLM judge's verdicts per candidate, or why it did not run."""
    judged = {n: c["judge"] for n, c in evaluation["candidates"].items() if c.get("judge")}
    if not judged:
        why = (
            "Not run (`judge.enabled: false`, the offline default)."
            if not evaluation.get("judge", {}).get("enabled")
            else "Not run (no baseline)."
        )
        return ["## LLM judge", "", why, ""]
    header = [
        "candidate",
        "judged",
        "win rate (ties 1/2)",
        "win",
        "tie",
        "loss",
        "position flips",
        "agreement with gold",
        "calibrated",
        "errors",
    ]
    rows = [_judge_row(n, j) for n, j in judged.items()]
    return ["## LLM judge", "", md_table(header, rows), ""]


def _judge_row(name: str, j: dict[str, Any]) -> list[str]:
    """One candidate's judge figures; an uncalibrated judge is flagged (it gates nothing)."""
    return [
        name,
        str(j["n_judged"]),
        fmt(j["win_rate"]),
        fmt(j["win"]),
        fmt(j["tie"]),
        fmt(j["loss"]),
        f"{j['flip_rate']:.3f}" if j["flip_rate"] is not None else "n/a",
        f"{j['agreement']:.3f} on {j['n_decided']}" if j["agreement"] is not None else "n/a",
        "yes" if j["calibrated"] else "**no** (not gated)",
        str(j["errors"]),
    ]


def per_class_lines(
    sysm: dict[str, dict[str, Any]], per_class: dict[str, dict[str, Any]], label: str
) -> list[str]:
    """Recall / precision of every class of `label` per system: where a model is weak."""
    table = f"{label}.per_class"
    names = [n for n in sysm if table in per_class.get(n, {})]
    classes = sorted({c for n in names for c in per_class[n][table]})
    rows = []
    for c in classes:
        support = next(per_class[n][table][c]["support"] for n in names if c in per_class[n][table])
        rows.append(
            [c, str(support)]
            + [
                f"{per_class[n][table].get(c, {}).get('recall', 0):.2f} / "
                f"{per_class[n][table].get(c, {}).get('precision', 0):.2f}"
                for n in names
            ]
        )
    return [
        f"## Per category ({label}: recall = accuracy within the class)",
        "",
        "![per-class accuracy](per_class_accuracy.png)",
        "",
        md_table(["class", "n"] + [f"{n} R / P" for n in names], rows),
        "",
    ]


def worst_example_lines(
    n_shown: int,
    records: list[dict[str, Any]],
    focus_preds: list[dict[str, Any]],
    focus: str,
    label: str | None,
) -> list[str]:
    """The focus system's wrong or invalid answers, most confidently wrong first (what a
    router would have kept), then the rest."""
    wrong = [p for p in focus_preds if not p["valid"] or not p["correct"]]
    wrong.sort(key=lambda p: (-_or(answer_confidence(p, label), -1.0), str(p["id"])))
    texts = {r["id"]: r["text"] for r in records}
    first_gold = next(iter((records[0].get("gold") or {}) if records else {}), None)
    shown = label or first_gold  # the gold column: the label field, else the first field
    rows = [_worst_example_row(p, texts[p["id"]], shown, label) for p in wrong[:n_shown]]
    return [
        f"## Worst examples of `{focus}` ({len(wrong)} wrong or invalid of "
        f"{len(focus_preds)}; most confident first)",
        "",
        md_table(["id", "input", "gold", "answer", "confidence", "schema"], rows),
        "",
    ]


def _worst_example_row(
    p: dict[str, Any], text: str, shown: str | None, label: str | None
) -> list[str]:
    """One wrong answer, its input and output cut short and escaped for a table cell."""
    clause = text[:160].replace("|", "\\|") + ("…" if len(text) > 160 else "")
    output = (p["output"] or "").replace("\n", " ").replace("|", "\\|")[:120]
    conf = answer_confidence(p, label)
    return [
        p["id"],
        clause,
        str((p.get("gold") or {}).get(shown)) if shown else "",
        f"`{output}`",
        "" if conf is None else f"{conf:.2f}",
        "ok" if p["valid"] else "; ".join(p["problems"])[:60],
    ]


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def answer_confidence(pred: dict[str, Any], field: str | None) -> float | None:
    """The answer's confidence in `field` (a single label or boolean), else the lowest of its
    fields' confidences; None without any."""
    conf = pred.get("confidence") or {}
    if field is not None and conf.get(field) is not None:
        return float(conf[field])
    known = [float(v) for v in conf.values() if v is not None]
    return min(known) if known else None


def classical_lines(evaluation: dict[str, Any]) -> list[str]:
    """The paired differences candidate - classical yardstick, and its gate."""
    cl = evaluation.get("classical")
    if not cl:
        return []
    cands = evaluation["candidates"]
    keys = sorted({k for c in cands.values() for k in (c.get("delta_vs_classical") or {})})
    keys = [k for k in keys if not k.endswith((".ece", ".mean_confidence")) and "coverage" not in k]
    rows = [
        [k] + [fmt((c.get("delta_vs_classical") or {}).get(k)) for c in cands.values()]
        for k in keys
    ]
    limit = (evaluation.get("gates_config") or {}).get("min_delta_vs_classical_low")
    gate = (
        "gate off (`gates.min_delta_vs_classical_low: null`)"
        if limit is None
        else f"gate: lower CI bound of candidate - yardstick >= {limit}"
    )
    return [
        "## Candidate - classical yardstick (paired)",
        "",
        f"TF-IDF (word 1-2 grams) + logistic regression per label field, trained on the "
        f"{cl['n_train']} records of `{cl['train_file']}` (the candidates' training records, "
        f"sha256 {cl['train_sha256'][:12]}) in {cl['seconds']:.1f} s"
        + (" (cached)" if cl.get("cached") else "")
        + f"; {gate}.",
        "",
        md_table(["metric"] + list(cands), rows),
        "",
    ]


def key_term_lines(
    sysm: dict[str, dict[str, Any]], preds: dict[str, list[dict[str, Any]]]
) -> list[str]:
    """Nullable text fields: quality where gold has a value, null agreement where it has none."""
    fields = sorted(
        {
            k.rsplit(".", 1)[0]
            for e in sysm.values()
            for k in e["metrics"]
            if k.endswith(".null_agreement")
        }
    )
    lines: list[str] = []
    for field in fields:
        rows_of = next((r for r in preds.values() if r), [])
        n_gold = sum(f"{field}.rougeL" in r["scores"] for r in rows_of)
        n_null = sum(f"{field}.null_agreement" in r["scores"] for r in rows_of)
        names = [n for n, e in sysm.items() if f"{field}.null_agreement" in e["metrics"]]
        metrics = [
            (f"ROUGE-L (n={n_gold} with a gold {field})", "rougeL"),
            (f"exact match after normalisation (n={n_gold})", "exact_match"),
            (f"answers null where gold is null (n={n_null})", "null_agreement"),
        ]
        rows = [
            [text] + [fmt(sysm[n]["metrics"].get(f"{field}.{key}")) for n in names]
            for text, key in metrics
        ]
        lines += [f"## Key terms (`{field}`)", "", md_table(["metric"] + names, rows), ""]
    return lines


def calibration_lines(sysm: dict[str, dict[str, Any]]) -> list[str]:
    """ECE and accuracy at coverage of every system that records label confidences."""
    fields = sorted(
        {k.rsplit(".", 1)[0] for e in sysm.values() for k in e["metrics"] if k.endswith(".ece")}
    )
    if not fields:
        return []
    from .calibration import BINS, COVERAGES

    lines = [
        "## Calibration",
        "",
        f"Confidence: the probability the system gave the label it answered (the model: its "
        f"tokens' probability; the yardstick: the classifier's). ECE over {BINS} equal-width "
        "bins; accuracy at coverage p: the accuracy of the p% most confident answers (what a "
        "router that defers the rest would serve).",
        "",
    ]
    for field in fields:
        names = [n for n, e in sysm.items() if f"{field}.ece" in e["metrics"]]
        keys = [
            ("ECE", "ece"),
            ("mean confidence", "mean_confidence"),
            ("accuracy (all)", "accuracy"),
        ]
        keys += [(f"accuracy at coverage {p}%", f"accuracy_at_coverage_{p}") for p in COVERAGES]
        rows = [
            [text] + [fmt(sysm[n]["metrics"].get(f"{field}.{k}")) for n in names]
            for text, k in keys
        ]
        lines += [f"`{field}`:", "", md_table(["metric"] + names, rows), ""]
    return lines + ["![reliability](reliability.png)", ""]
