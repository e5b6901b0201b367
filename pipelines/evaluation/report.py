"""The evaluate stage's human-facing outputs: predictions, `reports/eval.md`, plots, DVC plot data.

Kept apart from `evaluate.py` so the scoring code reads on its own. Every file is written
atomically; plots use matplotlib's Agg backend (no display on CI machines).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from ..io import atomic_open, write_jsonl
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
) -> list[Path]:
    out = Path(cfg.reports_dir)
    files: list[Path] = []
    for name, rows in preds.items():
        path = out / "predictions" / f"{name}.jsonl"
        write_jsonl(path, rows)
        files.append(path)
    label = next((f.name for f in task.fields if f.kind == "label" and not f.multi), None)
    files += write_plot_data(out, evaluation, per_class, label)
    files += write_pngs(out, evaluation, per_class, label)
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
    conf = int(evaluation["confidence"] * 100)
    sysm = systems(evaluation)
    base = evaluation.get("baseline")
    lines = [
        "# Evaluation report",
        "",
        *task_line(evaluation),
        f"- test set: `{evaluation['test_file']}` ({evaluation['n_examples']} examples, "
        f"sha256 {evaluation['test_sha256'][:12]})",
        f"- baseline: {base['kind'] + (' (' + base.get('source', '') + ')' if base.get('source') else '') if base else 'none'}",
        f"- primary metric: `{evaluation['primary_metric']}`; intervals: {conf}% percentile "
        f"bootstrap, {evaluation['n_resamples']} resamples (paired for deltas)",
        f"- **winner: {evaluation['winner'] or no_winner(evaluation)}**",
        *selection_lines(evaluation),
        f"- evaluation took {evaluation['seconds']:.0f} s",
        "",
        "## Metrics",
        "",
    ]
    keys = []
    for entry in sysm.values():
        keys += [k for k in headline_keys(entry["metrics"]) if k not in keys]
    rows = [[k] + [fmt(e["metrics"].get(k)) for e in sysm.values()] for k in keys]
    lines += [md_table(["metric"] + list(sysm), rows), ""]
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
    if base:
        lines += ["## Candidate - baseline (paired)", ""]
        cands = evaluation["candidates"]
        dkeys = [
            k for k in keys if any(k in (c.get("delta_vs_baseline") or {}) for c in cands.values())
        ]
        rows = [
            [k] + [fmt((c.get("delta_vs_baseline") or {}).get(k)) for c in cands.values()]
            for k in dkeys
        ]
        lines += [md_table(["metric"] + list(cands), rows), "", "![deltas](deltas.png)", ""]
    lines += ["## Gates", "", gate_table(EvalResult.model_validate(evaluation)), ""]
    judged = {n: c["judge"] for n, c in evaluation["candidates"].items() if c.get("judge")}
    lines += ["## LLM judge", ""]
    if not judged:
        lines += [
            "Not run (`judge.enabled: false`, the offline default)."
            if not evaluation.get("judge", {}).get("enabled")
            else "Not run (no baseline).",
            "",
        ]
    else:
        rows = []
        for n, j in judged.items():
            rows.append(
                [
                    n,
                    str(j["n_judged"]),
                    fmt(j["win_rate"]),
                    fmt(j["win"]),
                    fmt(j["tie"]),
                    fmt(j["loss"]),
                    f"{j['flip_rate']:.3f}" if j["flip_rate"] is not None else "n/a",
                    f"{j['agreement']:.3f} on {j['n_decided']}"
                    if j["agreement"] is not None
                    else "n/a",
                    "yes" if j["calibrated"] else "**no** (not gated)",
                    str(j["errors"]),
                ]
            )
        lines += [
            md_table(
                [
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
                ],
                rows,
            ),
            "",
        ]
    if label:
        lines += [
            f"## Per category ({label}: recall = accuracy within the class)",
            "",
            "![per-class accuracy](per_class_accuracy.png)",
            "",
        ]
        names = [n for n in sysm if f"{label}.per_class" in per_class.get(n, {})]
        classes = sorted({c for n in names for c in per_class[n][f"{label}.per_class"]})
        rows = []
        for c in classes:
            support = next(
                per_class[n][f"{label}.per_class"][c]["support"]
                for n in names
                if c in per_class[n][f"{label}.per_class"]
            )
            rows.append(
                [c, str(support)]
                + [
                    f"{per_class[n][f'{label}.per_class'].get(c, {}).get('recall', 0):.2f} / "
                    f"{per_class[n][f'{label}.per_class'].get(c, {}).get('precision', 0):.2f}"
                    for n in names
                ]
            )
        lines += [md_table(["class", "n"] + [f"{n} R / P" for n in names], rows), ""]
    focus = evaluation["winner"] or next(iter(evaluation["candidates"]), None)
    if focus and cfg.worst_examples:
        wrong = [p for p in preds[focus] if not p["valid"] or not p["correct"]]
        # Invalid answers first (the worst), then wrong labels, in a stable order.
        wrong.sort(key=lambda p: (p["valid"], str(p["id"])))
        lines += [
            f"## Worst examples of `{focus}` ({len(wrong)} wrong or invalid of "
            f"{len(preds[focus])})",
            "",
        ]
        texts = {r["id"]: r["text"] for r in records}
        rows = []
        for p in wrong[: cfg.worst_examples]:
            clause = texts[p["id"]][:160].replace("|", "\\|") + (
                "…" if len(texts[p["id"]]) > 160 else ""
            )
            output = (p["output"] or "").replace("\n", " ").replace("|", "\\|")[:120]
            rows.append(
                [
                    p["id"],
                    clause,
                    str(p["gold"].get(label)) if label else "",
                    f"`{output}`",
                    "ok" if p["valid"] else "; ".join(p["problems"])[:60],
                ]
            )
        lines += [md_table(["id", "clause", "gold", "answer", "schema"], rows), ""]
    return "\n".join(lines) + "\n"


def write_plot_data(
    out: Path, evaluation: dict[str, Any], per_class: dict[str, Any], label: str | None
) -> list[Path]:
    """CSV files for `dvc plots` (per-class accuracy per system; deltas with intervals)."""
    files = []
    if label:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        # `row` joins class and system: DVC's bar templates take one category column.
        writer.writerow(["row", "class", "system", "accuracy"])
        for name, extra in per_class.items():
            for c, m in sorted(extra.get(f"{label}.per_class", {}).items()):
                writer.writerow([f"{c} ({name})", c, name, round(m["recall"], 4)])
        files.append(_write(out / "plots" / "per_class_accuracy.csv", buf.getvalue()))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["row", "metric", "candidate", "delta", "ci_low", "ci_high"])
    for name, entry in evaluation["candidates"].items():
        for key, d in sorted((entry.get("delta_vs_baseline") or {}).items()):
            if d["value"] is not None and not key.startswith("latency"):
                writer.writerow(
                    [f"{name}: {key}", key, name, round(d["value"], 4), d["ci_low"], d["ci_high"]]
                )
    files.append(_write(out / "plots" / "deltas.csv", buf.getvalue()))
    return files


def _write(path: Path, text: str) -> Path:
    with atomic_open(path) as handle:
        handle.write(text)
    return path


def write_pngs(
    out: Path, evaluation: dict[str, Any], per_class: dict[str, Any], label: str | None
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = []
    if label and per_class:
        names = [n for n in per_class if f"{label}.per_class" in per_class[n]]
        classes = sorted({c for n in names for c in per_class[n][f"{label}.per_class"]})
        fig, ax = plt.subplots(figsize=(8, max(4, 0.28 * len(classes))))
        height = 0.8 / max(len(names), 1)
        y = np.arange(len(classes))
        for k, n in enumerate(names):
            vals = [per_class[n][f"{label}.per_class"].get(c, {}).get("recall", 0) for c in classes]
            ax.barh(y + k * height, vals, height, label=n)
        ax.set_yticks(y + height * (len(names) - 1) / 2, classes, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("accuracy within class (recall)")
        ax.set_xlim(0, 1)
        ax.legend(fontsize=7)
        ax.set_title(f"{label}: per-class accuracy")
        fig.tight_layout()
        files.append(_save(fig, out / "per_class_accuracy.png"))
        plt.close(fig)
    rows = [
        (f"{name}: {key}", d)
        for name, entry in evaluation["candidates"].items()
        for key, d in sorted((entry.get("delta_vs_baseline") or {}).items())
        if d["value"] is not None and d["ci_low"] is not None and not key.startswith("latency")
    ]
    fig, ax = plt.subplots(figsize=(8, max(3, 0.3 * len(rows))))
    if rows:
        y = np.arange(len(rows))
        vals = np.array([d["value"] for _, d in rows])
        err = np.array(
            [
                [d["value"] - d["ci_low"] for _, d in rows],
                [d["ci_high"] - d["value"] for _, d in rows],
            ]
        )
        ax.errorbar(vals, y, xerr=np.clip(err, 0, None), fmt="o", capsize=3)
        ax.set_yticks(y, [r for r, _ in rows], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="grey", lw=0.8)
    else:
        ax.text(0.5, 0.5, "no baseline: no deltas", ha="center", va="center")
    ax.set_xlabel(f"candidate - baseline ({int(evaluation['confidence'] * 100)}% paired CI)")
    fig.tight_layout()
    files.append(_save(fig, out / "deltas.png"))
    plt.close(fig)
    return files


def _save(fig: Any, path: Path) -> Path:
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    return path
