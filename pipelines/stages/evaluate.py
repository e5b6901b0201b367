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
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..engines.vllm_server import VllmConfig
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
    cached_predictions,
    open_engine,
)
from ..evaluation.records import load_records
from ..evaluation.runs import BASELINE, CLASSICAL, log_runs
from ..evaluation.scoring import (
    attach_scores,
    deltas,
    metric_names,
    references_for,
    score_system,
    self_hosted_cost,
)
from ..io import adapter_hash, sha256_file, write_jsonl
from ..records.sampling import stratified_sample
from ..results import (
    EvalResult,
    finite,
)
from ..task import TaskConfig
from ..tracking import Tracking

log = logging.getLogger(__name__)


def find_candidates(cfg: EvaluateConfig) -> dict[str, str | Path]:
    """The adapters to score by name: `evaluate.adapter` (ad hoc), else the candidates'."""
    if cfg.adapter is not None:
        return {adapter_name(cfg.adapter): cfg.adapter}
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
    return dict(found)


def adapter_name(adapter: str) -> str:
    """models/candidates/<name>/adapter -> <name>; models:/temper-x@champion -> that name."""
    if ":/" in adapter:
        return re.sub(r"[^\w.@-]+", "_", adapter.split(":/", 1)[1]).strip("_") or "adapter"
    path = Path(adapter.rstrip("/"))
    return (path.parent.name if path.name == "adapter" else path.name) or "adapter"


@dataclass(frozen=True)
class Setup:
    """What evaluate reads beside its own section: the base model's folder (`model.dir`), how
    candidates are judged and gated (`judge:`, `gates:`), the vLLM engine (`vllm:`, with
    `evaluate.engine: vllm`), `prepare.fields` (to read a raw `--data` file) and where to
    log (None: nowhere)."""

    base_dir: str | Path
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)
    fields: Any = None
    tracking: Tracking | None = None


def run(cfg: EvaluateConfig, task: TaskConfig, setup: Setup) -> EvalResult:
    """Score the candidates (or `evaluate.adapter`) and the baseline; write the outputs.
    One engine generates for the whole run: a vLLM server (`evaluate.engine: vllm`), or the
    built-in loop, which keeps a candidate loaded from its test answers to its validation
    answers."""
    if cfg.primary_metric not in metric_names(task):  # fail before any generation
        raise ConfigError(
            f"evaluate.primary_metric {cfg.primary_metric!r} is not a metric of "
            f"task {task.name} ({', '.join(metric_names(task))})"
        )
    engine = open_engine(cfg, setup.vllm, setup.base_dir)
    try:
        return evaluate_all(cfg, task, setup, engine)
    finally:
        engine.close()


@dataclass
class Systems:
    """Every system scored so far: the eval.json under construction, the predictions with
    their per-example scores, per-class tables and reliability bins (for the reports)."""

    evaluation: dict[str, Any]
    preds: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    per_class: dict[str, Any] = field(default_factory=dict)
    bins: dict[str, Any] = field(default_factory=dict)

    def add(
        self, name: str, task: TaskConfig, records: list, preds: list, metrics: dict, ex: dict
    ) -> dict[str, Any]:
        """Keep a system's predictions and tables; its metrics with calibration added."""
        calibration, self.bins[name] = system_calibration(
            preds, ex["scores"], confident_fields(task)
        )
        self.preds[name] = attach_scores(preds, records, ex)
        self.per_class[name] = ex["extra"]
        return {**metrics, **calibration}


@dataclass
class Test:
    """The test records, their references, resamples and the validation records."""

    records: list[dict[str, Any]]
    rs: Resamples
    validation: list[dict[str, Any]] | None
    refs: Any = None


def evaluate_all(cfg: EvaluateConfig, task: TaskConfig, setup: Setup, engine: Any) -> EvalResult:
    """The run: baseline, yardstick, candidates, judge, gates; then reports and runs."""
    t_start = time.perf_counter()
    records = test_records(cfg, task, setup.fields)
    adapters = find_candidates(cfg)
    if setup.tracking is not None and any(":/" in str(a) for a in adapters.values()):
        from ..tracking import setup as setup_store

        setup_store(setup.tracking.cfg)  # models:/ and runs:/ URIs resolve against the store
    n = len(records)
    log.info("evaluate: %d examples, candidates %s", n, sorted(adapters))
    test = Test(
        records,
        Resamples.draw(n, cfg.n_resamples, cfg.seed, cfg.confidence),
        validation_records(cfg, task, len(adapters)),
    )
    systems = Systems(header(cfg, task, n))
    base = score_baseline(cfg, task, setup.base_dir, engine, test, systems)
    classical_stats = score_classical(cfg, task, test, systems)
    cand_stats = {
        name: score_candidate(cfg, task, setup.base_dir, engine, test, systems, name, adapter)
        for name, adapter in adapters.items()
    }
    for name, stats in cand_stats.items():
        entry = systems.evaluation["candidates"][name]
        if base is not None:
            entry["delta_vs_baseline"] = deltas(stats["stats"], base[1], test.rs)
        if classical_stats is not None:
            entry["delta_vs_classical"] = own_metrics(
                deltas(stats["stats"], classical_stats, test.rs), yardstick_fields(task)
            )
    judge_candidates(cfg, setup.judge, task, test, systems, base, cand_stats)
    result = decide(cfg, setup.gates, systems, test, t_start)
    return write_outputs(cfg, task, setup, result, test, systems)


def test_records(cfg: EvaluateConfig, task: TaskConfig, fields: Any) -> list[dict[str, Any]]:
    """The test split (or `--data`), sampled down to `max_examples` by label."""
    records = load_records(cfg.test, task, fields)
    if cfg.max_examples and len(records) > cfg.max_examples:
        label = task.label_field()
        records = stratified_sample(records, cfg.max_examples, label, cfg.seed)
    return records


def header(cfg: EvaluateConfig, task: TaskConfig, n: int) -> dict[str, Any]:
    """eval.json's fields that say what was measured."""
    return {
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


def score_baseline(
    cfg: EvaluateConfig,
    task: TaskConfig,
    base_dir: str | Path,
    engine: Any,
    test: Test,
    systems: Systems,
) -> tuple[list[dict[str, Any]], Any, dict[str, Any]] | None:
    """The API teacher's answers or the few-shot base model (`evaluate.baseline`), scored;
    also fixes the references (the teacher's answers stand in where gold lacks). Returns
    (predictions, stats, per-example scores), or None without a baseline."""
    records, n = test.records, len(test.records)
    mode = cfg.baseline
    if mode == "auto":
        mode = "api" if Path(cfg.baseline_file).exists() else "base_model"
    info: dict[str, Any] = {"name": BASELINE, "kind": mode}
    preds: list[dict[str, Any]] | None = None
    if mode == "api":
        path = Path(cfg.baseline_file)
        if not path.exists():
            raise EvalError(f"{path}: baseline file not found (evaluate.baseline=api)")
        preds, api_info = api_predictions(records, path, task)
        info.update(api_info, source=str(path), usd_total=sum(p["usd"] for p in preds))
        cost = api_cost(preds, n)
    elif mode == "base_model":
        prompts, shot_ids = baseline_prompts(records, task, cfg)
        preds, seconds, cached = cached_predictions(records, prompts, base_dir, task, cfg, engine)
        cost = self_hosted_cost(preds, seconds, n, cfg)
        info.update(few_shot_ids=shot_ids, seconds=round(seconds, 1), cached=cached)
    test.refs = references_for(task, records, preds if mode == "api" else None)
    if preds is None:
        systems.evaluation["baseline"] = None
        return None
    metrics, stats, ex = score_system(task, records, preds, test.refs, test.rs, cost)
    info["metrics"] = systems.add(BASELINE, task, records, preds, metrics, ex)
    systems.evaluation["baseline"] = info
    return preds, stats, ex


def api_cost(preds: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """The API baseline's price per 1k requests and its output speed."""
    cost = {"usd_per_1k": sum(p["usd"] for p in preds) / n * 1000}
    out_tokens = [p["new_tokens"] or 0 for p in preds]
    lat = [p["latency_ms"] or 0 for p in preds]
    if sum(lat):
        cost["tokens_per_s"] = sum(out_tokens) / (sum(lat) / 1000)
    return cost


def score_classical(cfg: EvaluateConfig, task: TaskConfig, test: Test, systems: Systems) -> Any:
    """The TF-IDF yardstick, trained on the records the candidates saw (seconds; cached);
    its stats for the deltas, or None when the task has no field it answers."""
    classical = classical_predictions(test.records, task, cfg)
    if classical is None:
        return None
    preds, info = classical
    metrics, stats, ex = score_system(task, test.records, preds, test.refs, test.rs, {})
    metrics = systems.add(CLASSICAL, task, test.records, preds, metrics, ex)
    systems.evaluation["classical"] = {
        **info,
        "metrics": own_metrics(metrics, yardstick_fields(task)),
    }
    return stats


def score_candidate(
    cfg: EvaluateConfig,
    task: TaskConfig,
    base_dir: str | Path,
    engine: Any,
    test: Test,
    systems: Systems,
    name: str,
    adapter: str | Path,
) -> dict[str, Any]:
    """One adapter on the test split (and validation); its entry in eval.json. Returns its
    per-example scores and stats."""
    records, n = test.records, len(test.records)
    prompts = [r["prompt"] for r in records]
    preds, seconds, cached = cached_predictions(
        records, prompts, base_dir, task, cfg, engine, adapter, name
    )
    cost = self_hosted_cost(preds, seconds, n, cfg)
    metrics, stats, ex = score_system(task, records, preds, test.refs, test.rs, cost)
    entry: dict[str, Any] = {
        "metrics": systems.add(name, task, records, preds, metrics, ex),
        "adapter": str(adapter),
        "seconds": round(seconds, 1),
        "cached": cached,
    }
    if Path(adapter).is_dir():
        entry["adapter_sha256"] = adapter_hash(adapter)
    if test.validation is not None:
        entry["validation_metrics"] = validation_metrics(
            test.validation, base_dir, adapter, task, cfg, name, engine
        )
    systems.evaluation["candidates"][name] = entry
    return {**ex, "stats": stats}


def judge_candidates(
    cfg: EvaluateConfig,
    judge_cfg: JudgeConfig,
    task: TaskConfig,
    test: Test,
    systems: Systems,
    base: tuple[list[dict[str, Any]], Any, dict[str, Any]] | None,
    cand_stats: dict[str, dict[str, Any]],
) -> None:
    """The LLM judge's verdicts of each candidate against the baseline (when enabled)."""
    evaluation = systems.evaluation
    if judge_cfg.enabled and base is not None:
        from ..evaluation.judge import right_or_wrong, run_judge

        base_preds, _, base_ex = base
        key = right_or_wrong(cfg.primary_metric, base_ex["scores"])  # judge calibration
        correct = {c: cand_stats[c]["scores"][key] >= 0.5 for c in cand_stats}
        judged = run_judge(
            judge_cfg,
            task,
            test.records,
            {c: systems.preds[c] for c in cand_stats},
            base_preds,
            correct,
            base_ex["scores"][key] >= 0.5,
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


def decide(
    cfg: EvaluateConfig, gates_cfg: GatesConfig, systems: Systems, test: Test, t_start: float
) -> EvalResult:
    """The typed result: selection, gates and the winner."""
    evaluation = systems.evaluation
    evaluation["gates_config"] = gates_cfg.model_dump()
    evaluation["seconds"] = round(time.perf_counter() - t_start, 1)
    evaluation["selection"] = selection(
        cfg, test.validation, evaluation["candidates"], len(test.records)
    )
    result = EvalResult.model_validate(finite(evaluation))
    result.winner = gate_all(gates_cfg, result)
    if result.selection.split == "test":
        result.selection.chosen = result.winner
    return result


def write_outputs(
    cfg: EvaluateConfig,
    task: TaskConfig,
    setup: Setup,
    result: EvalResult,
    test: Test,
    systems: Systems,
) -> EvalResult:
    """eval.json, the reports and plots, and the MLflow runs."""
    from ..evaluation.eval_report import write_reports

    files = write_reports(
        cfg,
        task,
        result.model_dump(mode="json"),
        test.records,
        systems.preds,
        systems.per_class,
        systems.bins,
    )
    result.save(cfg.metrics)
    if cfg.log_mlflow and setup.tracking is not None:
        log_runs(setup.tracking, result, cfg.candidates_dir, files + [Path(cfg.metrics)])
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
    preds, seconds, _ = cached_predictions(
        records, prompts, model_dir, task, cfg, engine, adapter, f"{name} (validation)"
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
