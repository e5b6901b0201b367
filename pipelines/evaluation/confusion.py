"""The confusion matrix of a single-label or boolean field: which gold class got which answer.

Two forms: `reports/plots/confusion.csv` (one `actual,predicted` row per test example, DVC's
`confusion` plot template reads it: `dvc plots show`) and a Markdown table in `eval.md` (the
whole matrix up to `MAX_CLASSES` classes, else the most frequent confusions).
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path
from typing import Any

from ..io import atomic_open

MAX_CLASSES = 12  # more columns than this do not read as a table
NO_ANSWER = "(no answer)"


def pairs(
    per_class: dict[str, Any], system: str | None, label: str | None
) -> list[tuple[str, str]]:
    """(gold, answered) per example of `system` for field `label` ([] when there is none)."""
    labels = (per_class.get(system or "") or {}).get(f"{label}.labels")
    if not labels:
        return []
    answered, gold = labels
    return [
        (str(g), str(a) if a not in (None, "") else NO_ANSWER)
        for a, g in zip(answered, gold, strict=True)
    ]


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    """`actual,predicted` rows for DVC's confusion template (header only without rows)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows(rows)
    with atomic_open(path) as handle:
        handle.write(buf.getvalue())
    return path


def markdown(rows: list[tuple[str, str]], system: str, label: str) -> list[str]:
    """The matrix (gold rows, answer columns) or, with many classes, the top confusions."""
    if not rows:
        return []
    counts = Counter(rows)
    classes = sorted({g for g, _ in rows} | {a for _, a in rows})
    head = [f"## Confusion of `{system}` on {label} (rows: gold, columns: answer)", ""]
    if len(classes) <= MAX_CLASSES:
        table = [
            "| gold \\ answer | " + " | ".join(classes) + " |",
            "|" + " --- |" * (len(classes) + 1),
        ]
        for g in classes:
            if any(gold == g for gold, _ in rows):
                table.append(f"| {g} | " + " | ".join(str(counts[(g, a)]) for a in classes) + " |")
        return head + table + [""]
    wrong = [(n, g, a) for (g, a), n in counts.items() if g != a]
    wrong.sort(key=lambda x: (-x[0], x[1], x[2]))
    table = ["| gold | answered | n |", "| --- | --- | --- |"]
    table += [f"| {g} | {a} | {n} |" for n, g, a in wrong[:10]]
    return (
        [head[0].replace("(rows: gold, columns: answer)", "(the 10 most frequent confusions)"), ""]
        + table
        + [""]
    )
