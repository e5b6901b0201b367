"""Determinism: re-train every candidate and re-evaluate, then compare with the committed run.

    python scripts/check_determinism.py            # against metrics/eval.json of HEAD
    python scripts/check_determinism.py --runs 2   # two fresh runs against each other too

Each run happens in a fresh clone of HEAD (the DVC cache shared, nothing else: no eval cache,
no MLflow store), which checks out the committed data outputs and then forces the train stages
and evaluate (`dvc repro -f -s`). The quality metrics (every metric but latency, throughput and
cost) and every prediction's answer and confidence must be identical to the reference; the
script prints the differences and exits 1 if there is one. Same machine type, same thread
count: floating-point sums depend on how many threads share them.

Prints `RESULT determinism_identical 1` (or 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("latency_ms", "tokens_per_s", "examples_per_s", "usd_per_1k")


def quality(eval_json: dict) -> dict[str, float | None]:
    """Every quality figure of eval.json, flattened: `<system>.<metric>` and deltas."""
    out: dict[str, float | None] = {}
    systems = dict(eval_json["candidates"])
    for extra in ("baseline", "classical"):
        if eval_json.get(extra):
            systems[extra] = eval_json[extra]
    for name, entry in systems.items():
        for part in ("metrics", "validation_metrics", "delta_vs_baseline", "delta_vs_classical"):
            for key, m in (entry.get(part) or {}).items():
                if not key.startswith(TIMING):
                    for bound in ("value", "ci_low", "ci_high"):
                        out[f"{name}.{part}.{key}.{bound}"] = m.get(bound)
    out["winner"] = eval_json.get("winner")
    return out


def answers(reports: Path) -> dict[str, list]:
    return {
        p.stem: [
            [r["id"], r["output"], r.get("confidence")]
            for r in map(json.loads, p.read_text().splitlines())
        ]
        for p in sorted((reports / "predictions").glob("*.jsonl"))
    }


def fresh_run(workdir: Path) -> tuple[dict, dict]:
    """Clone HEAD, check out its data, force train + evaluate; (eval.json, answers)."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(workdir)], check=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    # The clone's own code, even where the venv's editable install points at another checkout.
    shim = workdir / ".shim"
    shim.mkdir()
    (shim / "temper").symlink_to(workdir / "pipelines")
    env["PYTHONPATH"] = str(shim)

    def dvc(*args: str) -> None:
        subprocess.run(["dvc", *args], cwd=workdir, env=env, check=True)

    cache = subprocess.run(
        ["dvc", "cache", "dir"], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    dvc("config", "--local", "cache.dir", cache)
    dvc("checkout", "-q")
    stages = subprocess.run(
        ["dvc", "stage", "list", "--name-only"],
        cwd=workdir,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for stage in [s for s in stages if s.startswith("train@")] + ["evaluate"]:
        dvc("repro", "-f", "-s", stage)
    return json.loads((workdir / "metrics" / "eval.json").read_text()), answers(workdir / "reports")


def compare(a: dict, b: dict, what: str) -> list[str]:
    return [
        f"{what} {k}: {a.get(k)!r} != {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="fresh runs (1: vs the committed)")
    args = parser.parse_args()
    reference = json.loads((ROOT / "metrics" / "eval.json").read_text())
    ref_answers = answers(ROOT / "reports") if (ROOT / "reports" / "predictions").exists() else None
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="temper-determinism-") as tmp:
        runs = [fresh_run(Path(tmp) / f"run{i}") for i in range(args.runs)]
    for i, (ev, ans) in enumerate(runs):
        problems += compare(quality(reference), quality(ev), f"run{i} vs committed:")
        if ref_answers is not None:
            for name in sorted(set(ref_answers) | set(ans)):
                if ref_answers.get(name) != ans.get(name):
                    problems.append(f"run{i} vs committed: predictions of {name} differ")
    if len(runs) > 1:
        problems += compare(quality(runs[0][0]), quality(runs[1][0]), "run0 vs run1:")
    n = len(quality(reference))
    for line in problems[:50]:
        print(line)
    print(
        f"{n} quality figures compared over {args.runs} fresh run(s): {len(problems)} differences"
    )
    print(f"RESULT determinism_identical {int(not problems)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
