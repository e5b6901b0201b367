"""The evaluation's MLflow runs: one child run per system under the pipeline's parent run.

A candidate's run carries its training params and metrics (`train.*`, from its
train_metrics.json) beside the evaluation's, so the runs of one pipeline run compare side by
side even when only evaluate re-ran; its metrics are linked to the candidate's logged model,
and the test set is logged as the run's dataset input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import flatten
from ..results import BaselineEval, CandidateEval, ClassicalEval, EvalResult, TrainResult
from ..tracking import Tracking

BASELINE = "baseline"
CLASSICAL = "classical"


def flat_metrics(entry: CandidateEval | BaselineEval | ClassicalEval) -> dict[str, float]:
    """A system's metrics as MLflow metrics: `<m>`, `<m>.ci_low`, `<m>.ci_high`, deltas.

    Rounded to 6 decimals: bootstrap quantiles come out as 0.54999999999 and the MLflow UI
    shows every digit; eval.json keeps the exact values."""
    flat: dict[str, Any] = {}
    for key, m in entry.metrics.items():
        flat.update({key: m.value, f"{key}.ci_low": m.ci_low, f"{key}.ci_high": m.ci_high})
    for key, m in (getattr(entry, "validation_metrics", None) or {}).items():
        flat[f"validation.{key}"] = m.value
    for key, d in (getattr(entry, "delta_vs_baseline", None) or {}).items():
        flat.update({f"delta.{key}": d.value, f"delta.{key}.ci_low": d.ci_low})
    for key, d in (getattr(entry, "delta_vs_classical", None) or {}).items():
        flat.update({f"delta_classical.{key}": d.value, f"delta_classical.{key}.ci_low": d.ci_low})
    judge = getattr(entry, "judge", None)
    if judge is not None:
        flat.update({"judge.win_rate": judge.win_rate.value, "judge.flip_rate": judge.flip_rate})
    return {k: round(float(v), 6) for k, v in flat.items() if v is not None}


def log_runs(
    tracking: Tracking, result: EvalResult, candidates_dir: str | Path, files: list[Path]
) -> None:
    """One child run per system (candidates, baseline, yardstick) with its metrics, the
    reports as artifacts, and the evaluation's duration on the parent run."""
    from ..tracking import known_model, log_dataset, log_model_input

    systems: dict[str, CandidateEval | BaselineEval | ClassicalEval] = dict(result.candidates)
    if result.baseline is not None:
        systems[BASELINE] = result.baseline
    if result.classical is not None:
        systems[CLASSICAL] = result.classical
    for name, entry in systems.items():
        train = None
        train_file = Path(candidates_dir) / name / "train_metrics.json"
        if name in result.candidates and train_file.exists():
            train = TrainResult.load(train_file)
        tags = {"temper.system": name, "temper.winner": str(result.winner == name).lower()}
        if train is not None:
            tags.update({"temper.candidate": name, "temper.train_run_id": str(train.mlflow_run_id)})
        if isinstance(entry, CandidateEval) and entry.gates is not None:
            tags["temper.gates_passed"] = str(entry.gates.passed).lower()
        with tracking.child("evaluate", f"eval-{name}", **tags) as run:
            model_id = known_model(run.client, train.mlflow_model_id if train else None)
            dataset = log_dataset(run, result.test_file, "test", "evaluation")
            if model_id is not None:
                log_model_input(run, model_id)  # this run evaluates that model
            run.log_metrics(flat_metrics(entry), model_id=model_id, dataset=dataset)
            if train is not None:
                run.log_params(flatten({"train": train.config}))
                run.log_metrics(
                    {
                        f"train.{k}": getattr(train, k)
                        for k in TRAIN_METRICS
                        if getattr(train, k) is not None
                    }
                )
            for path in files:
                if path.exists() and (
                    path.suffix in (".md", ".json", ".png") or path.name == f"{name}.jsonl"
                ):
                    run.client.log_artifact(run.run_id, str(path), "evaluate")
            parent = run.parent_id
    run.client.log_metric(parent, "eval.seconds", result.seconds)
    for key, value in headline_metrics(result).items():
        run.client.log_metric(parent, key, value)


def headline_metrics(result: EvalResult) -> dict[str, float]:
    """The pipeline run's own figures: the candidate picked on validation (else the winner,
    else the first) on the primary metric, on validation and on test with its interval, and
    its paired difference with the classical yardstick. One row per pipeline run, so runs
    (the arms of a sweep) compare in the runs table and on parallel coordinates."""
    primary = result.primary_metric
    chosen = (result.selection.chosen if result.selection else None) or result.winner
    chosen = chosen or next(iter(result.candidates), None)
    if chosen is None:
        return {}
    entry = result.candidates[chosen]
    out: dict[str, float | None] = {}
    if (test := entry.metrics.get(primary)) is not None:
        out |= {f"test.{primary}": test.value, f"test.{primary}.ci_low": test.ci_low}
        out[f"test.{primary}.ci_high"] = test.ci_high
    if (val := (entry.validation_metrics or {}).get(primary)) is not None:
        out[f"validation.{primary}"] = val.value
    if (diff := (entry.delta_vs_classical or {}).get(primary)) is not None:
        out |= {f"delta_classical.{primary}": diff.value}
        out[f"delta_classical.{primary}.ci_low"] = diff.ci_low
    return {k: round(float(v), 6) for k, v in out.items() if v is not None}


# Training figures copied onto each candidate's evaluation run (as `train.<name>`).
TRAIN_METRICS = (
    "val_loss",
    "base_val_loss",
    "steps",
    "train_seconds",
    "tokens_per_s",
    "train_tokens",
    "trainable_params",
)
