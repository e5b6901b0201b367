"""The evaluate stage's human-facing outputs: predictions, `reports/eval.md`, plots, DVC plot data.

Kept apart from `evaluate.py` so the scoring code reads on its own, and apart from `report.py`
(the page's tables) because this is the page's frame and the stage's files: the setup header,
how the winner was chosen, the order of the sections, and the writing of every file. Every file
is written atomically; plots use matplotlib's Agg backend (no display on CI machines).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import atomic_open, write_jsonl
from ..results import EvalResult
from . import confusion
from .report import (
    baseline_delta_lines,
    calibration_lines,
    classical_lines,
    gate_table,
    headline_metric_keys,
    judge_lines,
    key_term_lines,
    metric_lines,
    per_class_lines,
    worst_example_lines,
)


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
        # The rule of gates.baseline_test, restated from the recorded config (not imported
        # from gates.py: the page states the settings this evaluation recorded).
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
    keys = headline_metric_keys(sysm)
    lines += metric_lines(sysm, keys)
    if evaluation.get("baseline"):
        lines += baseline_delta_lines(evaluation, keys)
    lines += classical_lines(evaluation)
    lines += key_term_lines(sysm, preds)
    lines += calibration_lines(sysm)
    lines += ["## Gates", "", gate_table(EvalResult.model_validate(evaluation)), ""]
    lines += judge_lines(evaluation)
    if label:
        lines += per_class_lines(sysm, per_class, label)
    focus = evaluation["winner"] or next(iter(evaluation["candidates"]), None)
    if focus and label:
        lines += confusion.markdown(confusion.pairs(per_class, focus, label), focus, label)
    if focus and cfg.worst_examples:
        lines += worst_example_lines(cfg.worst_examples, records, preds[focus], focus, label)
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
