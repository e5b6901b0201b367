"""The model card of a registered version (`adapter/README.md`), from `configs/model_card.md`.

The template is generic: what the model does comes from the task config (`${task_description}`,
`${fields_table}`, `${labels_count}`), the numbers from the evaluation.

The template is plain `string.Template` text (`${name}` fields): a card is Markdown that a
person edits, and anything richer than substitution would hide it behind code.
"""

from __future__ import annotations

import logging
import string
from pathlib import Path
from typing import Any

from ..evaluation.report import md_table
from ..results import Estimate, GateResult
from ..task import TaskConfig

log = logging.getLogger(__name__)


def fmt_num(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def fmt_estimate(m: Estimate) -> str:
    """`0.512 [0.459, 0.566]`, or the value alone when there is no interval."""
    if m.value is None:
        return "n/a"
    ci = (
        f" [{fmt_num(m.ci_low)}, {fmt_num(m.ci_high)}]"
        if m.ci_low is not None and (m.ci_high is not None)
        else ""
    )
    return fmt_num(m.value) + ci


def gates_markdown(gates: GateResult) -> str:
    if not gates.checks:
        return "(no gates configured)"
    rows = [
        [
            c.gate,
            "n/a" if c.value is None else fmt_num(c.value),
            f"{c.op} {c.threshold}",
            "skip" if c.skipped else ("pass" if c.passed else "FAIL"),
        ]
        for c in gates.checks
    ]
    return md_table(["gate", "value", "rule", "result"], rows)


def estimates_markdown(estimates: dict[str, Estimate], header: str) -> str:
    if not estimates:
        return "(none reported)"
    return md_table(["metric", header], [[k, fmt_estimate(m)] for k, m in estimates.items()])


def fields_markdown(task: TaskConfig) -> str:
    """The answer's fields: name, kind, number of allowed labels, description."""
    rows = [
        [
            f"`{f.name}`",
            f.kind + (" (nullable)" if f.nullable else ""),
            str(len(f.labels)) if f.kind == "label" else "-",
            " ".join(f.description.split()) or "-",
        ]
        for f in task.fields
    ]
    return md_table(["field", "kind", "labels", "description"], rows)


def task_values(task: TaskConfig) -> dict[str, Any]:
    """The card's fields that describe what the model does, from the task config."""
    return {
        "task_name": task.name,
        "task_description": task.description.strip() or "(no description in the task config)",
        "fields_table": fields_markdown(task),
        "labels_count": sum(len(f.labels) for f in task.fields if f.kind == "label"),
    }


NO_README = "No data README given (`register.data_readme`): no licence or attribution recorded."


def attribution(readme: str | Path | None) -> str:
    """The dataset README's 'License and required attribution' section, verbatim; optional:
    with no README (null or a missing file) a note saying so, and a warning."""
    if not readme or not Path(readme).exists():
        log.warning("register.data_readme %s: not found: the model card says so", readme)
        return NO_README
    text = Path(readme).read_text(encoding="utf-8")
    start = text.find("## License and required attribution")
    if start < 0:
        raise ValueError(f"{readme}: no '## License and required attribution' section")
    body = text[start:].split("\n", 1)[1]
    end = body.find("\n## ")
    return (body if end < 0 else body[:end]).strip()


def render_card(template: str | Path, values: dict[str, Any]) -> str:
    """The template with every `${field}` filled (a missing one is a KeyError naming it)."""
    return string.Template(Path(template).read_text(encoding="utf-8")).substitute(values)
