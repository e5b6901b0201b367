"""Learning curve: the adapter and the classical yardstick against training examples.

    python scripts/learning_curve.py docs/results/quick-160.json docs/results/quick-640.json \\
        metrics/eval.json docs/results/full-profile-2ep.json --candidate r16

Each argument is an `eval.json` of a measured run (the evaluate stage's output): its
yardstick was trained on the very records its candidates saw (`classical.n_train`), so each
file gives one x with both curves. The adapter is `--candidate` where the file has it, else the
run's winner, else its best candidate on test. Writes `<out>.png` and `<out>.json` (the points, with 95% intervals and each run's
test-set size: the quick runs score a 320-clause sample, the full run all 816 test clauses).

Prints where the adapter reaches the yardstick (interpolated) and `RESULT learning_curve_points <n>`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def point(path: Path, metric: str, candidate: str | None = None) -> dict:
    ev = json.loads(path.read_text())
    cl = ev.get("classical")
    if not cl:
        raise SystemExit(f"{path}: no classical yardstick (evaluated before it existed?)")
    cands = ev["candidates"]
    name = candidate if candidate in cands else ev.get("winner")
    name = name or max(cands, key=lambda n: cands[n]["metrics"][metric]["value"])
    adapter, yard = cands[name]["metrics"][metric], cl["metrics"][metric]
    delta = (cands[name].get("delta_vs_classical") or {}).get(metric, {})
    return {
        "file": str(path),
        "n_train": cl["n_train"],
        "n_test": ev["n_examples"],
        "candidate": name,
        "adapter": adapter,
        "yardstick": yard,
        "delta": delta,
    }


def crossing(points: list[dict]) -> float | None:
    """Where adapter - yardstick first turns from below zero to at or above it, interpolated
    linearly in log(examples) between the two measured points around it (an estimate: the
    runs on either side may differ in more than their data)."""
    import math

    for a, b in zip(points, points[1:], strict=False):
        da, db = a["delta"].get("value"), b["delta"].get("value")
        if da is not None and db is not None and da < 0 <= db:
            t = -da / (db - da)
            return math.exp(math.log(a["n_train"]) + t * math.log(b["n_train"] / a["n_train"]))
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evals", nargs="+", type=Path)
    parser.add_argument("--metric", default="clause_type.accuracy")
    parser.add_argument("--out", type=Path, default=Path("docs/learning_curve"))
    parser.add_argument(
        "--candidate", default=None, help="the adapter to plot where a file has it (else winner)"
    )
    args = parser.parse_args()
    points = sorted(
        (point(p, args.metric, args.candidate) for p in args.evals), key=lambda p: p["n_train"]
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    x = [p["n_train"] for p in points]
    for key, label, marker in (
        ("adapter", "LoRA adapter (SmolLM2-135M)", "o"),
        ("yardstick", "TF-IDF + logistic regression", "s"),
    ):
        ys = [p[key]["value"] for p in points]
        lo = [p[key]["value"] - p[key]["ci_low"] for p in points]
        hi = [p[key]["ci_high"] - p[key]["value"] for p in points]
        ax.errorbar(x, ys, yerr=[lo, hi], marker=marker, capsize=3, label=label)
    for p in points:
        ax.annotate(
            f"test n={p['n_test']}",
            (p["n_train"], p["adapter"]["value"]),
            textcoords="offset points",
            xytext=(4, -12),
            fontsize=7,
        )
    ax.set_xscale("log")
    ax.minorticks_off()  # log-scale minor labels (2x10^2, ...) would crowd the measured x
    ax.set_xticks(x, [str(v) for v in x])
    ax.set_xlabel("training examples (the same records for both)")
    ax.set_ylabel(f"{args.metric} on test (95% CI)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Learning curve: adapter vs classical yardstick")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    args.out.with_suffix(".json").write_text(json.dumps(points, indent=2) + "\n")
    for p in points:
        print(
            f"n_train {p['n_train']:>5} (test n={p['n_test']}): adapter {p['candidate']} "
            f"{p['adapter']['value']:.3f}, yardstick {p['yardstick']['value']:.3f}, "
            f"delta {p['delta'].get('value', float('nan')):+.3f} "
            f"[{p['delta'].get('ci_low', float('nan')):+.3f}, {p['delta'].get('ci_high', float('nan')):+.3f}]"
        )
    cross = crossing(points)
    if cross is not None:
        print(
            f"the adapter reaches the yardstick near {cross:,.0f} training examples (interpolated)"
        )
    print(f"RESULT learning_curve_points {len(points)}")


if __name__ == "__main__":
    main()
