"""The evaluate stage's plots: PNGs for the report and MLflow, CSV data for `dvc plots`.

matplotlib's Agg backend (no display on CI machines); every file is written atomically.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..io import atomic_open


def write_plot_data(
    out: Path, evaluation: dict[str, Any], per_class: dict[str, Any], label: str | None
) -> list[Path]:
    """CSV files for `dvc plots` (per-class accuracy per system; deltas with intervals)."""
    files = []
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    # `row` joins class and system: DVC's bar templates take one category column.
    writer.writerow(["row", "class", "system", "accuracy"])
    if label:
        for name, extra in per_class.items():
            for c, m in sorted(extra.get(f"{label}.per_class", {}).items()):
                writer.writerow([f"{c} ({name})", c, name, round(m["recall"], 4)])
    # Written for every task (header only without a label-like field): dvc.yaml declares it.
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
    else:  # still written: dvc.yaml declares it, and a blank says why rather than nothing
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no single-label or boolean field: no per-class accuracy", ha="center")
        ax.set_axis_off()
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


def write_reliability(out: Path, bins: dict[str, dict[str, list[dict[str, float]]]]) -> list[Path]:
    """`reliability.png`: accuracy against confidence per system (one panel per label
    field); the diagonal is perfect calibration, markers are sized by the bin's count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = sorted({f for per in bins.values() for f in per})
    if not fields:
        return []
    fig, axes = plt.subplots(1, len(fields), figsize=(5 * len(fields), 4.5), squeeze=False)
    for ax, field in zip(axes[0], fields, strict=True):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfectly calibrated")
        for name, per in bins.items():
            rows = per.get(field) or []
            if rows:
                total = sum(r["n"] for r in rows)
                ax.plot(
                    [r["confidence"] for r in rows],
                    [r["accuracy"] for r in rows],
                    marker="o",
                    label=name,
                )
                ax.scatter(
                    [r["confidence"] for r in rows],
                    [r["accuracy"] for r in rows],
                    s=[300 * r["n"] / total for r in rows],
                    alpha=0.25,
                )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"confidence in the {field} answered (bin mean)")
        ax.set_ylabel("accuracy in the bin")
        ax.set_title(f"{field}: reliability")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = _save(fig, out / "reliability.png")
    plt.close(fig)
    return [path]


def _save(fig: Any, path: Path) -> Path:
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    return path
