"""The evaluate stage's human-facing outputs: predictions, `reports/eval.md`, plots, DVC plot data.

Kept apart from `evaluate.py` so the scoring code reads on its own. Every file is written
atomically; plots use matplotlib's Agg backend (no display on CI machines).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..io import atomic_open, write_jsonl
from ..results import EvalResult
from . import confusion

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


def write_reports(
    cfg: Any,
    task: Any,
    evaluation: dict[str, Any],
    records: list[dict[str, Any]],
    preds: dict[str, list[dict[str, Any]]],
    per_class: dict[str, dict[str, Any]],
    bins: dict[str, Any] | None = None,
) -> list[Path]:
    from .plots import write_plot_data, write_pngs, write_reliability

    out = Path(cfg.reports_dir)
    files: list[Path] = []
    for name, rows in preds.items():
        path = out / "predictions" / f"{name}.jsonl"
        write_jsonl(path, rows)
        files.append(path)
    from .confidence import confident_fields

    label = next(iter(confident_fields(task)), None)  # a single label or a boolean
    files += write_plot_data(out, evaluation, per_class, label)
    focus = evaluation["winner"] or next(iter(evaluation["candidates"]), None)
    files.append(
        confusion.write_csv(
            out / "plots" / "confusion.csv", confusion.pairs(per_class, focus, label)
        )
    )
    files += write_pngs(out, evaluation, per_class, label)
    files += write_reliability(out, bins or {})
    report = render(cfg, evaluation, records, preds, per_class, label)
    path = out / "eval.md"
    with atomic_open(path) as handle:
        handle.write(report)
    files.append(path)
    return files


def systems(evaluation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    if evaluation.get("baseline"):
        out["baseline"] = evaluation["baseline"]
    if evaluation.get("classical"):
        out["classical"] = evaluation["classical"]
    out.update(evaluation["candidates"])
    return out


def no_winner(evaluation: dict[str, Any]) -> str:
    sel = evaluation.get("selection") or {}
    if sel.get("split") == "validation" and sel.get("chosen"):
        return f"none ({sel['chosen']}, chosen on validation, fails its gates on test)"
    return "none (no candidate passed the gates)"


def task_line(evaluation: dict[str, Any]) -> list[str]:
    task = evaluation.get("task") or {}
    if not task.get("name"):
        return []
    return [f"- task: `{task['name']}` (prompt hash {task.get('prompt_hash', '?')})"]


def selection_lines(evaluation: dict[str, Any]) -> list[str]:
    """How the winner was chosen and which test against the baseline gated it."""
    lines = []
    sel = evaluation.get("selection")
    n_test = evaluation["n_examples"]
    if sel and sel["split"] == "validation":
        values = ", ".join(
            f"{n} {'n/a' if v is None else f'{v:.3f}'}" for n, v in sel["values"].items()
        )
        lines.append(
            f"- winner chosen on validation (n={sel['n_examples']}, `{sel['file']}`), "
            f"reported on test (n={n_test}); `{sel['metric']}` on validation: {values} "
            f"(ties: {sel['tie_break']})"
        )
    elif sel and len(sel["values"]) > 1:
        lines.append(
            f"- **warning: winner chosen on the test split (n={n_test}) it is reported on "
            "(`evaluate.validation: null`): its test figures are optimistic (selection bias)**"
        )
    gates = evaluation["gates_config"]
    base = evaluation.get("baseline")
    if base:
        # The rule of gates.baseline_test, read from the recorded config (not imported: the
        # register stage reads this module through tracking.card, with its own DVC deps).
        vs = gates.get("vs_baseline") or "auto"
        test = (
            vs if vs != "auto" else ("non_inferiority" if base["kind"] == "api" else "superiority")
        )
        limit = gates.get("min_delta_low" if test == "superiority" else "non_inferiority_margin")
        rule = (
            "gate off (null)"
            if limit is None
            else (
                f"lower CI bound of candidate - baseline >= {limit}"
                if test == "superiority"
                else f"lower CI bound of candidate - baseline > -{limit}"
            )
        )
        lines.append(
            f"- test against the {base['kind']} baseline: {test.replace('_', '-')} "
            f"(`gates.vs_baseline: {vs}`; {rule})"
        )
    return lines


def render(
    cfg: Any,
    evaluation: dict[str, Any],
    records: list[dict[str, Any]],
    preds: dict[str, list[dict[str, Any]]],
    per_class: dict[str, dict[str, Any]],
    label: str | None,
) -> str:
    """`reports/eval.md`: the setup, every system's metrics, the paired comparisons, gates,
    judge, per-class figures and the winner's worst answers (`label`: the field per-class
    figures and the confusion matrix are about; None: no such sections)."""
    sysm = systems(evaluation)
    lines = _header_lines(evaluation)
    keys = _headline_metric_keys(sysm)
    lines += _metric_lines(sysm, keys)
    if evaluation.get("baseline"):
        lines += _baseline_delta_lines(evaluation, keys)
    lines += classical_lines(evaluation)
    lines += key_term_lines(sysm, preds)
    lines += calibration_lines(sysm)
    lines += ["## Gates", "", gate_table(EvalResult.model_validate(evaluation)), ""]
    lines += _judge_lines(evaluation)
    if label:
        lines += _per_class_lines(sysm, per_class, label)
    focus = evaluation["winner"] or next(iter(evaluation["candidates"]), None)
    if focus and label:
        lines += confusion.markdown(confusion.pairs(per_class, focus, label), focus, label)
    if focus and cfg.worst_examples:
        lines += _worst_example_lines(cfg.worst_examples, records, preds[focus], focus, label)
    return "\n".join(lines) + "\n"


def _baseline_text(base: dict[str, Any] | None) -> str:
    """The baseline's kind and, when recorded, its source (the API answers file)."""
    if not base:
        return "none"
    return base["kind"] + (" (" + base.get("source", "") + ")" if base.get("source") else "")


def _header_lines(evaluation: dict[str, Any]) -> list[str]:
    """What was evaluated and how: the test set, baseline, intervals and the winner."""
    conf = int(evaluation["confidence"] * 100)
    return [
        "# Evaluation report",
        "",
        *task_line(evaluation),
        f"- test set: `{evaluation['test_file']}` ({evaluation['n_examples']} examples, "
        f"sha256 {evaluation['test_sha256'][:12]})",
        f"- baseline: {_baseline_text(evaluation.get('baseline'))}",
        f"- primary metric: `{evaluation['primary_metric']}`; intervals: {conf}% percentile "
        f"bootstrap, {evaluation['n_resamples']} resamples (paired for deltas)",
        f"- **winner: {evaluation['winner'] or no_winner(evaluation)}**",
        *selection_lines(evaluation),
        f"- evaluation took {evaluation['seconds']:.0f} s",
        "",
        "## Metrics",
        "",
    ]


def _headline_metric_keys(sysm: dict[str, dict[str, Any]]) -> list[str]:
    """The headline metrics of every system, each once: the first system's in `HEADLINE`
    order, then those the next ones add."""
    keys: list[str] = []
    for entry in sysm.values():
        keys += [k for k in headline_keys(entry["metrics"]) if k not in keys]
    return keys


def _metric_lines(sysm: dict[str, dict[str, Any]], keys: list[str]) -> list[str]:
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


def _baseline_delta_lines(evaluation: dict[str, Any], keys: list[str]) -> list[str]:
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


def _judge_lines(evaluation: dict[str, Any]) -> list[str]:
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


def _per_class_lines(
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


def _worst_example_lines(
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
