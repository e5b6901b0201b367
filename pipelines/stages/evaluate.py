"""Stage evaluate: every candidate adapter and a baseline on the test split, measured and gated.

The winner is chosen on the validation split (each candidate's primary metric there; ties go
to the first name) and then gated and reported on the test split, so the figures the model
card shows were not used to pick it. `evaluate.validation: null` picks on test, with a warning.

Inputs: `data/prepared/test.jsonl`, `data/prepared/validation.jsonl`,
`models/candidates/<name>/adapter/`, and either the API
teacher's answers `data/distilled/baseline_test.jsonl` (API baseline) or the base model
prompted like the teacher (label list + few-shot turns from the train split).
Outputs: `metrics/eval.json`, `reports/predictions/<name>.jsonl` (and `validation/<name>.jsonl`),
`reports/eval.md`,
PNG plots and DVC plot data under `reports/`, MLflow child runs under the pipeline run.

Scoring: `temper.evaluation.scoring` (metrics with bootstrap intervals, paired deltas,
per-request latency). The result is `results.EvalResult`, the one shape register, `temper gate`
and `temper promote` read.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError, flatten
from ..evaluation.calibration import system_calibration
from ..evaluation.classical import classical_predictions, own_metrics, yardstick_fields
from ..evaluation.confidence import confident_fields
from ..evaluation.config import EvalError, EvaluateConfig
from ..evaluation.gates import GatesConfig, best, gate_all
from ..evaluation.judge import JudgeConfig
from ..evaluation.metrics import Resamples
from ..evaluation.predict import (
    api_predictions,
    baseline_prompts,
    cached_baseline,
    model_predictions,
    open_engine,
)
from ..evaluation.scoring import (
    attach_scores,
    deltas,
    metric_names,
    references_for,
    score_system,
    self_hosted_cost,
)
from ..io import adapter_hash, read_jsonl, sha256_file, write_jsonl
from ..records.sampling import stratified_sample
from ..results import (
    BaselineEval,
    CandidateEval,
    ClassicalEval,
    EvalResult,
    TrainResult,
    finite,
)
from ..task import TaskConfig
from ..tracking import MlflowConfig, child_run

log = logging.getLogger(__name__)

BASELINE = "baseline"
CLASSICAL = "classical"


def load_records(path: str | Path, task: TaskConfig, fields: Any = None) -> list[dict[str, Any]]:
    """Test records: prepared format, or raw format mapped through `prepare.fields`."""
    path = Path(path)
    if not path.exists():
        raise EvalError(f"{path}: file not found")
    rows = read_jsonl(path)
    if not rows:
        raise EvalError(f"{path}: no records")
    if "prompt" in rows[0] and "gold" in rows[0]:
        records = rows
    else:  # raw rows: the same mapping and cleaning as the prepare stage
        from ..records.sources import FieldMap, InputError, extract, iter_rows, normalise_text

        fmap = fields or FieldMap()
        records = []
        for where, row in iter_rows(path):
            if isinstance(row, InputError):
                raise EvalError(str(row))
            try:
                # Any split column value is fine here: the file is scored whole.
                rec = extract(row, where, fmap, task, keep_split=False)
            except InputError as err:
                raise EvalError(str(err)) from None
            rec["text"] = normalise_text(rec["text"])
            rec["prompt"] = task.messages(rec["text"])
            records.append(rec)
    for lineno, rec in enumerate(records, 1):
        for key in ("id", "text", "prompt", "gold"):
            if key not in rec:
                raise EvalError(f"{path}:{lineno}: missing field '{key}'")
        for field in task.fields:
            if field.gold and field.name not in rec["gold"]:
                raise EvalError(f"{path}:{lineno}: missing field 'gold.{field.name}'")
    return records


def find_candidates(cfg: EvaluateConfig) -> dict[str, Path]:
    root = Path(cfg.candidates_dir)
    found = (
        {
            p.parent.name: p
            for p in sorted(root.glob("*/adapter"))
            if (p / "adapter_config.json").exists()
        }
        if root.exists()
        else {}
    )
    if cfg.candidates is not None:
        missing = [c for c in cfg.candidates if c not in found]
        if missing:
            raise EvalError(
                f"{root}: no adapter for candidate(s) {missing} (found {sorted(found)})"
            )
        found = {c: found[c] for c in cfg.candidates}
    if not found:
        raise EvalError(f"{root}: no candidate adapters (<name>/adapter/adapter_config.json)")
    return found


def run(
    cfg: EvaluateConfig,
    task: TaskConfig,
    model_dir: str | Path,
    judge_cfg: JudgeConfig | None = None,
    gates_cfg: GatesConfig | None = None,
    mlflow_cfg: Any = None,
    params: dict[str, Any] | None = None,
    adapters: dict[str, str | Path] | None = None,
    fields: Any = None,
) -> EvalResult:
    """Score the candidates (or `adapters`, for ad-hoc use) and the baseline; write outputs.
    With `evaluate.engine: vllm`, one vLLM server (the `vllm:` section) generates for the
    whole run and is stopped at its end."""
    engine = open_engine(cfg, params, model_dir)
    try:
        return _run(
            cfg, task, model_dir, judge_cfg, gates_cfg, mlflow_cfg, params, adapters, fields, engine
        )
    finally:
        if engine is not None:
            engine.close()


def _run(
    cfg: EvaluateConfig,
    task: TaskConfig,
    model_dir: str | Path,
    judge_cfg: JudgeConfig | None,
    gates_cfg: GatesConfig | None,
    mlflow_cfg: Any,
    params: dict[str, Any] | None,
    adapters: dict[str, str | Path] | None,
    fields: Any,
    engine: Any,
) -> EvalResult:
    judge_cfg = judge_cfg or JudgeConfig()
    gates_cfg = gates_cfg or GatesConfig()
    if cfg.primary_metric not in metric_names(task):  # fail before any generation
        raise ConfigError(
            f"evaluate.primary_metric {cfg.primary_metric!r} is not a metric of "
            f"task {task.name} ({', '.join(metric_names(task))})"
        )
    t_start = time.perf_counter()
    records = load_records(cfg.test, task, fields)
    if cfg.max_examples and len(records) > cfg.max_examples:
        label = task.label_field()
        records = stratified_sample(records, cfg.max_examples, label, cfg.seed)
    if adapters is None:
        adapters = dict(find_candidates(cfg))
    if mlflow_cfg is not None and any(":/" in str(a) for a in adapters.values()):
        from ..tracking import setup

        setup(mlflow_cfg)  # models:/ and runs:/ URIs resolve against the project's store
    n = len(records)
    log.info("evaluate: %d examples, candidates %s", n, sorted(adapters))
    rs = Resamples.draw(n, cfg.n_resamples, cfg.seed, cfg.confidence)
    val_records = validation_records(cfg, task, len(adapters))

    # Baseline.
    mode = cfg.baseline
    if mode == "auto":
        mode = "api" if Path(cfg.baseline_file).exists() else "base_model"
    base_preds: list[dict[str, Any]] | None = None
    base_info: dict[str, Any] = {"name": BASELINE, "kind": mode}
    if mode == "api":
        path = Path(cfg.baseline_file)
        if not path.exists():
            raise EvalError(f"{path}: baseline file not found (evaluate.baseline=api)")
        base_preds, info = api_predictions(records, path, task)
        usd = sum(p["usd"] for p in base_preds)
        base_cost = {"usd_per_1k": usd / n * 1000}
        base_info.update(info, source=str(path), usd_total=usd)
        out_tokens = [p["new_tokens"] or 0 for p in base_preds]
        lat = [p["latency_ms"] or 0 for p in base_preds]
        if sum(lat):
            base_cost["tokens_per_s"] = sum(out_tokens) / (sum(lat) / 1000)
    elif mode == "base_model":
        prompts, shot_ids = baseline_prompts(records, task, cfg)
        base_preds, seconds, cached = cached_baseline(
            records, prompts, model_dir, task, cfg, engine
        )
        base_cost = self_hosted_cost(base_preds, seconds, n, cfg)
        base_info.update(few_shot_ids=shot_ids, seconds=round(seconds, 1), cached=cached)

    teacher = base_preds if mode == "api" else None
    refs = references_for(task, records, teacher)
    evaluation: dict[str, Any] = {
        "primary_metric": cfg.primary_metric,
        "n_examples": n,
        "test_file": cfg.test,
        "test_sha256": sha256_file(cfg.test),
        "confidence": cfg.confidence,
        "n_resamples": cfg.n_resamples,
        "task": {"name": task.name, "prompt_hash": task.prompt_hash},
        "candidates": {},
        "winner": None,
    }
    all_preds: dict[str, list[dict[str, Any]]] = {}
    per_class: dict[str, Any] = {}
    bins: dict[str, Any] = {}  # reliability bins per system and label field
    label_fields = confident_fields(task)  # single labels and booleans: calibration

    def calibrate(name: str, preds: list[dict[str, Any]], ex: dict[str, Any]) -> dict[str, Any]:
        metrics, bins[name] = system_calibration(preds, ex["scores"], label_fields)
        return metrics

    base_stats = None
    if base_preds is not None:
        metrics, base_stats, base_ex = score_system(task, records, base_preds, refs, rs, base_cost)
        base_info["metrics"] = {**metrics, **calibrate(BASELINE, base_preds, base_ex)}
        evaluation["baseline"] = base_info
        all_preds[BASELINE] = attach_scores(base_preds, records, base_ex)
        per_class[BASELINE] = base_ex["extra"]
    else:
        evaluation["baseline"] = None

    # The classical yardstick, trained on the records the candidates saw (seconds; cached).
    classical_stats = None
    classical = classical_predictions(records, task, cfg)
    if classical is not None:
        cl_preds, cl_info = classical
        metrics, classical_stats, cl_ex = score_system(task, records, cl_preds, refs, rs, {})
        evaluation["classical"] = {
            **cl_info,
            "metrics": own_metrics(
                {**metrics, **calibrate(CLASSICAL, cl_preds, cl_ex)}, yardstick_fields(task)
            ),
        }
        all_preds[CLASSICAL] = attach_scores(cl_preds, records, cl_ex)
        per_class[CLASSICAL] = cl_ex["extra"]

    cand_stats: dict[str, Any] = {}
    for name, adapter in adapters.items():
        prompts = [r["prompt"] for r in records]
        preds, seconds = model_predictions(
            records, prompts, model_dir, adapter, task, cfg, name, engine
        )
        metrics, stats, ex = score_system(
            task, records, preds, refs, rs, self_hosted_cost(preds, seconds, n, cfg)
        )
        entry: dict[str, Any] = {
            "metrics": {**metrics, **calibrate(name, preds, ex)},
            "adapter": str(adapter),
            "seconds": round(seconds, 1),
        }
        if Path(adapter).is_dir():
            entry["adapter_sha256"] = adapter_hash(adapter)
        if base_stats is not None:
            entry["delta_vs_baseline"] = deltas(stats, base_stats, rs)
        if classical_stats is not None:
            entry["delta_vs_classical"] = own_metrics(
                deltas(stats, classical_stats, rs), yardstick_fields(task)
            )
        if val_records is not None:
            entry["validation_metrics"] = validation_metrics(
                val_records, model_dir, adapter, task, cfg, name, engine
            )
        evaluation["candidates"][name] = entry
        all_preds[name] = attach_scores(preds, records, ex)
        per_class[name] = ex["extra"]
        cand_stats[name] = ex

    if judge_cfg.enabled and base_preds is not None:
        from ..evaluation.judge import right_or_wrong, run_judge

        key = right_or_wrong(cfg.primary_metric, base_ex["scores"])  # judge calibration
        correct = {c: cand_stats[c]["scores"][key] >= 0.5 for c in cand_stats}
        base_correct = base_ex["scores"][key] >= 0.5
        judged = run_judge(
            judge_cfg,
            task,
            records,
            {c: all_preds[c] for c in cand_stats},
            base_preds,
            correct,
            base_correct,
            cfg.n_resamples,
            cfg.confidence,
            cfg.progress,
        )
        for c, result in judged.items():
            evaluation["candidates"][c]["judge"] = result
    evaluation["judge"] = {
        "enabled": judge_cfg.enabled,
        "provider": judge_cfg.provider.kind,
        "model": judge_cfg.provider.model,
        "sample_frac": judge_cfg.sample_frac,
    }

    evaluation["gates_config"] = gates_cfg.model_dump()
    evaluation["seconds"] = round(time.perf_counter() - t_start, 1)
    evaluation["selection"] = selection(cfg, val_records, evaluation["candidates"], n)
    result = EvalResult.model_validate(finite(evaluation))
    result.winner = gate_all(gates_cfg, result)
    if result.selection.split == "test":
        result.selection.chosen = result.winner

    from ..evaluation.report import write_reports

    files = write_reports(
        cfg, task, result.model_dump(mode="json"), records, all_preds, per_class, bins
    )
    result.save(cfg.metrics)
    if cfg.log_mlflow and mlflow_cfg is not None:
        log_mlflow(mlflow_cfg, params or {}, result, cfg, files + [Path(cfg.metrics)])
    log.info("evaluate: winner %s (%.0f s)", result.winner, result.seconds)
    return result


def validation_records(
    cfg: EvaluateConfig, task: TaskConfig, n_candidates: int
) -> list[dict[str, Any]] | None:
    """The validation records that pick the winner (sampled like the test split), or None."""
    if cfg.validation is None:
        if n_candidates > 1:
            log.warning(
                "evaluate.validation is null: the winner is picked on the test split, the "
                "split its figures are reported on (optimistic); set evaluate.validation"
            )
        return None
    if not Path(cfg.validation).exists():
        raise EvalError(
            f"{cfg.validation}: file not found (evaluate.validation; null picks on test)"
        )
    records = load_records(cfg.validation, task)
    if cfg.max_examples and len(records) > cfg.max_examples:
        label = next((f.name for f in task.fields if f.kind == "label" and f.gold), None)
        records = stratified_sample(records, cfg.max_examples, label, cfg.seed)
    return records


def validation_metrics(
    records: list[dict[str, Any]],
    model_dir: str | Path,
    adapter: str | Path,
    task: TaskConfig,
    cfg: EvaluateConfig,
    name: str,
    engine: Any = None,
) -> dict[str, Any]:
    """One candidate's metrics on the validation split (gold references, no baseline); its
    predictions go to `reports/predictions/validation/<name>.jsonl` (the route stage fits
    its thresholds on them)."""
    prompts = [r["prompt"] for r in records]
    preds, seconds = model_predictions(
        records, prompts, model_dir, adapter, task, cfg, f"{name} (validation)", engine
    )
    rs = Resamples.draw(len(records), cfg.n_resamples, cfg.seed, cfg.confidence)
    cost = self_hosted_cost(preds, seconds, len(records), cfg)
    metrics, _, ex = score_system(
        task, records, preds, references_for(task, records, None), rs, cost
    )
    out = Path(cfg.reports_dir) / "predictions" / "validation" / f"{name}.jsonl"
    write_jsonl(out, attach_scores(preds, records, ex))
    return metrics


def selection(
    cfg: EvaluateConfig,
    val_records: list[dict[str, Any]] | None,
    candidates: dict[str, dict[str, Any]],
    n_test: int,
) -> dict[str, Any]:
    """The `selection` block of eval.json: split, metric, each candidate's value, the choice
    (on test the choice is made after the gates, by `gates.pick_winner`)."""
    primary = cfg.primary_metric
    split = "validation" if val_records is not None else "test"
    key = "validation_metrics" if val_records is not None else "metrics"
    values = {n: e[key][primary]["value"] for n, e in candidates.items()}
    file = cfg.validation if val_records is not None else cfg.test
    return {
        "split": split,
        "file": file,
        "sha256": sha256_file(file),
        "n_examples": len(val_records) if val_records is not None else n_test,
        "metric": primary,
        "values": values,
        "chosen": best(values) if val_records is not None else None,
    }


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


def log_mlflow(
    mlflow_cfg: MlflowConfig,
    params: dict[str, Any],
    result: EvalResult,
    cfg: EvaluateConfig,
    files: list[Path],
) -> None:
    """One child run per system under the pipeline run.

    A candidate's run carries its training params and metrics (`train.*`, from its
    train_metrics.json) beside the evaluation's, so the runs of one pipeline run compare
    side by side even when only evaluate re-ran; its metrics are linked to the candidate's
    logged model, and the test set is logged as the run's dataset input.
    """
    from ..tracking import known_model, log_dataset, log_model_input

    systems: dict[str, CandidateEval | BaselineEval | ClassicalEval] = dict(result.candidates)
    if result.baseline is not None:
        systems[BASELINE] = result.baseline
    if result.classical is not None:
        systems[CLASSICAL] = result.classical
    for name, entry in systems.items():
        train = None
        train_file = Path(cfg.candidates_dir) / name / "train_metrics.json"
        if name in result.candidates and train_file.exists():
            train = TrainResult.load(train_file)
        tags = {"temper.system": name, "temper.winner": str(result.winner == name).lower()}
        if train is not None:
            tags.update({"temper.candidate": name, "temper.train_run_id": str(train.mlflow_run_id)})
        if isinstance(entry, CandidateEval) and entry.gates is not None:
            tags["temper.gates_passed"] = str(entry.gates.passed).lower()
        with child_run(mlflow_cfg, params, "evaluate", f"eval-{name}", **tags) as run:
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
