"""Stage evaluate: every candidate adapter and a baseline on the test split, measured and gated.

Inputs: `data/prepared/test.jsonl`, `models/candidates/<name>/adapter/`, and either the API
teacher's answers `data/distilled/baseline_test.jsonl` (API baseline) or the base model
prompted like the teacher (label list + few-shot turns from the train split).
Outputs: `metrics/eval.json`, `reports/predictions/<name>.jsonl`, `reports/eval.md`,
PNG plots and DVC plot data under `reports/`, MLflow child runs under the pipeline run.

Scoring (per task field, from the task config): label fields get exact and any-of-gold
accuracy, macro-F1 and per-class precision/recall (`pipelines/metrics/label_metrics`); text
fields ROUGE-1/2/L/Lsum (`pipelines/metrics/text_rouge`) on the examples with a reference.
An answer with no JSON object lowers `json_valid_rate` and is wrong on every field; one
that parses but breaks the schema (an unknown label, a missing field) lowers
`schema_valid_rate`, and its fields are still read (an unknown label is never right).
Every metric gets a 95% percentile-bootstrap interval; every candidate-minus-baseline
difference a paired one (same resamples for both systems, see `pipelines/metrics`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from .config import ConfigError, Section
from .gates import GatesConfig, check
from .io import atomic_open, read_jsonl, sha256_file, sha256_tree, write_json, write_jsonl
from .judge import JudgeConfig
from .metrics import (
    Resamples,
    estimate,
    macro_f1_stats,
    mean_stats,
    percentile_stats,
)
from .task import TaskConfig, parse_answer

log = logging.getLogger(__name__)

BASELINE = "baseline"


class EvaluateConfig(Section):
    """`evaluate:` in params.yaml."""

    test: str = Field("data/prepared/test.jsonl", description="Prepared test split.")
    candidates_dir: str = Field("models/candidates", description="Folder of <name>/adapter/.")
    candidates: list[str] | None = Field(None, description="Candidates to score (null: all).")
    baseline: Literal["auto", "api", "base_model", "none"] = Field(
        "auto", description="auto: the API teacher's answers when baseline_file exists, else "
        "the base model prompted like the teacher; api; base_model; none.")
    baseline_file: str = Field("data/distilled/baseline_test.jsonl",
                               description="The API teacher's answers on the test split.")
    baseline_few_shot: int = Field(3, ge=0, description="Few-shot turns of the base-model "
                                   "baseline (train examples, chosen as distil does).")
    few_shot_from: str = Field("data/prepared/train.jsonl", description="Source of few-shots.")
    few_shot_seed: str = Field("temper-fewshot-v1", description="Salt of the few-shot choice.")
    max_examples: int | None = Field(None, gt=0, description="Score a stratified sample of "
                                     "this many test examples (null: all).")
    batch_size: int = Field(16, gt=0, description="Generation batch size.")
    threads: int | None = Field(None, gt=0, description="torch threads (null: torch default).")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Inference dtype.")
    stop_at_json: bool = Field(True, description="Stop a row once its JSON answer is complete.")
    primary_metric: str = Field("clause_type.accuracy", description="Picks the winner.")
    n_resamples: int = Field(2000, gt=99, description="Bootstrap resamples.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Interval level.")
    seed: int = Field(0, description="Bootstrap seed.")
    hardware_usd_per_hour: float = Field(
        0.10, ge=0, description="Price of the serving machine per hour (cost per 1k examples).")
    cache_dir: str | None = Field(
        ".cache/eval", description="Reuse the base-model baseline's answers across runs when "
        "model, prompts and generation settings are unchanged (null: always regenerate).")
    metrics: str = Field("metrics/eval.json", description="The metrics file (DVC metrics).")
    reports_dir: str = Field("reports", description="Report, predictions and plots.")
    worst_examples: int = Field(10, ge=0, description="Wrong answers listed in the report.")
    log_mlflow: bool = Field(True, description="Log to MLflow child runs.")
    progress: bool = Field(True, description="Progress bars.")


class EvalError(ValueError):
    """Bad evaluation input; the message names the file, line and field."""


# --------------------------------------------------------------------------- inputs


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
        from .sources import FieldMap, InputError, extract, iter_rows, normalise_text

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
    found = {p.parent.name: p for p in sorted(root.glob("*/adapter"))
             if (p / "adapter_config.json").exists()} if root.exists() else {}
    if cfg.candidates is not None:
        missing = [c for c in cfg.candidates if c not in found]
        if missing:
            raise EvalError(f"{root}: no adapter for candidate(s) {missing} "
                            f"(found {sorted(found)})")
        found = {c: found[c] for c in cfg.candidates}
    if not found:
        raise EvalError(f"{root}: no candidate adapters (<name>/adapter/adapter_config.json)")
    return found


def answer_fields(task: TaskConfig, text: str | None) -> dict[str, Any]:
    """Parse a reply: the parsed answer (or None), whether it is JSON at all (`json_ok`),
    whether it fits the schema (`valid`: fields, types, allowed labels) and the problems."""
    answer = parse_answer(text) if text is not None else None
    problems = task.validate_answer(answer) if answer is not None else ["no JSON object found"]
    return {"answer": answer, "json_ok": answer is not None, "valid": not problems,
            "problems": problems}


# --------------------------------------------------------------------------- generation


def model_predictions(records: list[dict[str, Any]], prompts: list[list[dict[str, str]]],
                      model_dir: str | Path, adapter: str | Path | None, task: TaskConfig,
                      cfg: EvaluateConfig, desc: str) -> tuple[list[dict[str, Any]], float]:
    """Generate with the (adapted) model; returns per-example predictions and total seconds."""
    from .generation import generate, load_model

    model, tokenizer = load_model(model_dir, adapter, cfg.dtype, cfg.threads)
    t0 = time.perf_counter()
    gens = generate(model, tokenizer, prompts, task.max_new_tokens, cfg.batch_size,
                    stop_at_json=cfg.stop_at_json, progress=cfg.progress, desc=desc)
    seconds = time.perf_counter() - t0
    del model
    preds = [{"id": r["id"], "output": g.text, "latency_ms": round(g.latency_ms, 2),
              "batch_ms": round(g.batch_ms, 2), "new_tokens": g.new_tokens, **answer_fields(task, g.text)}
             for r, g in zip(records, gens, strict=True)]
    return preds, seconds


def cached_baseline(records: list[dict[str, Any]], prompts: list[list[dict[str, str]]],
                    model_dir: str | Path, task: TaskConfig, cfg: EvaluateConfig
                    ) -> tuple[list[dict[str, Any]], float, bool]:
    """The base-model baseline, reused from `cache_dir` when nothing that shapes it changed.

    The baseline does not depend on the candidates, so a `dvc exp run -S train.x=y` need not
    regenerate it. The key covers the model's file hashes, every prompt and the generation
    settings; the cached run's own timing is reported (marked `cached` in eval.json).
    """
    from .base_model import model_hash
    from .io import read_json, stable_hash

    path = None
    if cfg.cache_dir and (Path(model_dir) / "temper_source.json").exists():
        key = stable_hash({"model": model_hash(model_dir), "prompts": prompts, "ids":
                           [r["id"] for r in records], "max_new_tokens": task.max_new_tokens,
                           "dtype": cfg.dtype, "batch_size": cfg.batch_size,
                           "stop_at_json": cfg.stop_at_json, "prompt_hash": task.prompt_hash})
        path = Path(cfg.cache_dir) / f"baseline-{key}.json"
        if path.exists():
            hit = read_json(path)
            log.info("baseline: reusing %s (same model, prompts and settings)", path)
            return hit["preds"], hit["seconds"], True
    preds, seconds = model_predictions(records, prompts, model_dir, None, task, cfg, "baseline")
    if path is not None:
        write_json(path, {"preds": preds, "seconds": seconds})
    return preds, seconds, False


def api_predictions(records: list[dict[str, Any]], path: Path, task: TaskConfig
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The API teacher's answers, aligned to the test records; a missing one is wrong."""
    rows = {}
    for lineno, row in enumerate(read_jsonl(path), 1):
        if "id" not in row:
            raise EvalError(f"{path}:{lineno}: missing field 'id'")
        rows[str(row["id"])] = row
    preds, missing = [], 0
    for r in records:
        row = rows.get(str(r["id"]))
        if row is None:
            missing += 1
            row = {"output": None, "error": "no teacher answer in baseline file"}
        preds.append({"id": r["id"], "output": row.get("output"),
                      "latency_ms": row.get("latency_ms"), "batch_ms": row.get("latency_ms"),
                      "new_tokens": row.get("output_tokens"),
                      "usd": row.get("usd") or 0.0, "input_tokens": row.get("input_tokens") or 0,
                      **answer_fields(task, row.get("output"))})
    if missing:
        log.warning("%s: %d of %d test ids have no teacher answer (scored as wrong)", path,
                    missing, len(records))
    return preds, {"missing": missing}


def baseline_prompts(records: list[dict[str, Any]], task: TaskConfig, cfg: EvaluateConfig
                     ) -> tuple[list[list[dict[str, str]]], list[str]]:
    """The teacher's prompt (label list + few-shot turns) for the base-model baseline."""
    from .distil import pick_few_shot, teacher_messages

    shots: list[dict[str, Any]] = []
    if cfg.baseline_few_shot:
        path = Path(cfg.few_shot_from)
        if not path.exists():
            raise EvalError(f"{path}: few-shot source not found (evaluate.few_shot_from)")
        shots = pick_few_shot(task, read_jsonl(path), cfg.baseline_few_shot, cfg.few_shot_seed)
    return [teacher_messages(task, shots, r["text"]) for r in records], [s["id"] for s in shots]


# --------------------------------------------------------------------------- scoring


def field_value(pred: dict[str, Any], name: str) -> Any:
    answer = pred.get("answer")
    value = answer.get(name) if isinstance(answer, dict) else None
    return value if isinstance(value, str) else None


def per_example(task: TaskConfig, records: list[dict[str, Any]], preds: list[dict[str, Any]],
                references: dict[str, list[Any]]) -> dict[str, Any]:
    """Per-example score arrays (what the bootstrap resamples) and per-class point metrics."""
    from .metrics import load

    out: dict[str, Any] = {
        # json_valid_rate: the reply holds a JSON object (what "valid JSON" gates look at);
        # schema_valid_rate: it also has exactly the schema's fields, types and labels.
        "json_valid_rate": np.array([p["json_ok"] for p in preds], float),
        "schema_valid_rate": np.array([p["valid"] for p in preds], float),
    }
    masks: dict[str, np.ndarray] = {}
    extra: dict[str, Any] = {}
    for field in task.fields:
        if field.name not in references:
            continue
        refs = references[field.name]
        values = [field_value(p, field.name) for p in preds]
        if field.kind == "label":
            gold_all = [(r.get("gold_all") or {}).get(field.name) or [g]
                        for r, g in zip(records, refs, strict=True)]
            res = load("label_metrics").compute(
                # None -> "" (no answer): arrow cannot type a column that is all None.
                predictions=[v or "" for v in values], references=[str(g) for g in refs],
                references_all=gold_all,
                return_per_example=True)
            out[f"{field.name}.accuracy"] = np.array(res["correct"], float)
            out[f"{field.name}.accuracy_any"] = np.array(res["correct_any"], float)
            extra[f"{field.name}.per_class"] = res["per_class"]
            extra[f"{field.name}.labels"] = (values, [str(g) for g in refs])
        else:
            has_ref = np.array([g is not None for g in refs])
            res = load("text_rouge").compute(
                predictions=[v or "" for v in values], references=[g or "" for g in refs],
                return_per_example=True)
            for rouge in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
                key = f"{field.name}.{rouge}"
                out[key] = np.array(res[f"{rouge}_scores"], float)
                masks[key] = has_ref
            if field.nullable:
                out[f"{field.name}.null_match"] = np.array(
                    [(v is None) == (g is None) for v, g in zip(values, refs, strict=True)], float)
    latency = [p.get("latency_ms") for p in preds]
    waits = [p.get("batch_ms") for p in preds]
    if all(v is not None for v in latency + waits):
        out["latency_ms_mean"] = np.array(latency, float)
        extra["wait_ms"] = np.array(waits, float)
    return {"scores": out, "masks": masks, "extra": extra}


def system_stats(ex: dict[str, Any], rs: Resamples) -> dict[str, tuple[float, np.ndarray]]:
    """(point, resampled values) of every metric of one system."""
    stats = {}
    for key, values in ex["scores"].items():
        mask = ex["masks"].get(key)
        point = float(values[mask].mean()) if mask is not None and mask.any() else (
            float(values.mean()) if mask is None else float("nan"))
        stats[key] = (point, mean_stats(values, rs, mask))
    for key, (pred, gold) in ((k[: -len(".labels")], v) for k, v in ex["extra"].items()
                              if k.endswith(".labels")):
        stats[f"{key}.macro_f1"] = macro_f1_stats(pred, gold, rs)
    if "wait_ms" in ex["extra"]:
        # p95 of the time each answer took to arrive (its batch's wall time): the latency a
        # caller sees. The mean above is the amortised cost per example (throughput).
        wait = ex["extra"]["wait_ms"]
        stats["latency_ms_p95"] = (float(np.percentile(wait, 95)), percentile_stats(wait, 95, rs))
    return stats


def score_system(task: TaskConfig, records: list[dict[str, Any]], preds: list[dict[str, Any]],
                 references: dict[str, list[Any]], rs: Resamples, cost: dict[str, float]
                 ) -> tuple[dict[str, Any], dict[str, tuple[float, np.ndarray]], dict[str, Any]]:
    ex = per_example(task, records, preds, references)
    stats = system_stats(ex, rs)
    metrics = {k: estimate(p, s, rs) for k, (p, s) in sorted(stats.items())}
    for key, value in cost.items():
        metrics[key] = {"value": value}
    return metrics, stats, ex


def metric_names(task: TaskConfig) -> list[str]:
    """The metrics with intervals this task gets (what primary_metric and gates may name)."""
    names = ["json_valid_rate", "schema_valid_rate", "latency_ms_mean", "latency_ms_p95"]
    for f in task.fields:
        if f.kind == "label":
            names += [f"{f.name}.{m}" for m in ("accuracy", "accuracy_any", "macro_f1")]
        else:
            names += [f"{f.name}.{m}" for m in ("rouge1", "rouge2", "rougeL", "rougeLsum")]
            names += [f"{f.name}.null_match"] if f.nullable else []
    return names


def references_for(task: TaskConfig, records: list[dict[str, Any]],
                   teacher: list[dict[str, Any]] | None) -> dict[str, list[Any]]:
    """Reference per field: gold when the dataset has it, else the teacher's answer."""
    refs = {}
    for field in task.fields:
        if field.gold:
            refs[field.name] = [task.gold_value(field, r["gold"].get(field.name)) for r in records]
        elif teacher is not None:
            refs[field.name] = [field_value(p, field.name) for p in teacher]
    return refs


def deltas(cand: dict[str, tuple[float, np.ndarray]], base: dict[str, tuple[float, np.ndarray]],
           rs: Resamples) -> dict[str, dict[str, float]]:
    """Paired differences candidate - baseline (the same resamples for both)."""
    out = {}
    for key in sorted(set(cand) & set(base)):
        with np.errstate(invalid="ignore"):
            out[key] = estimate(cand[key][0] - base[key][0], cand[key][1] - base[key][1], rs)
    return out


# --------------------------------------------------------------------------- the stage


def run(cfg: EvaluateConfig, task: TaskConfig, model_dir: str | Path,
        judge_cfg: JudgeConfig | None = None, gates_cfg: GatesConfig | None = None,
        mlflow_cfg: Any = None, params: dict[str, Any] | None = None,
        adapters: dict[str, str | Path] | None = None, fields: Any = None) -> dict[str, Any]:
    """Score the candidates (or `adapters`, for ad-hoc use) and the baseline; write outputs."""
    judge_cfg = judge_cfg or JudgeConfig()
    gates_cfg = gates_cfg or GatesConfig()
    if cfg.primary_metric not in metric_names(task):  # fail before any generation
        raise ConfigError(f"evaluate.primary_metric {cfg.primary_metric!r} is not a metric of "
                          f"task {task.name} ({', '.join(metric_names(task))})")
    t_start = time.perf_counter()
    records = load_records(cfg.test, task, fields)
    if cfg.max_examples and len(records) > cfg.max_examples:
        from .prepare import stratified_sample

        label = next((f.name for f in task.fields if f.kind == "label" and f.gold), None)
        records = stratified_sample(records, cfg.max_examples, label, cfg.seed)
    if adapters is None:
        adapters = dict(find_candidates(cfg))
    if mlflow_cfg is not None and any(":/" in str(a) for a in adapters.values()):
        from .tracking import setup

        setup(mlflow_cfg)  # models:/ and runs:/ URIs resolve against the project's store
    n = len(records)
    log.info("evaluate: %d examples, candidates %s", n, sorted(adapters))
    rs = Resamples.draw(n, cfg.n_resamples, cfg.seed, cfg.confidence)

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
        base_preds, seconds, cached = cached_baseline(records, prompts, model_dir, task, cfg)
        base_cost = self_hosted_cost(base_preds, seconds, n, cfg)
        base_info.update(few_shot_ids=shot_ids, seconds=round(seconds, 1), cached=cached)

    teacher = base_preds if mode == "api" else None
    refs = references_for(task, records, teacher)
    evaluation: dict[str, Any] = {
        "primary_metric": cfg.primary_metric, "n_examples": n, "test_file": cfg.test,
        "test_sha256": sha256_file(cfg.test), "confidence": cfg.confidence,
        "n_resamples": cfg.n_resamples, "task": {"name": task.name,
                                                 "prompt_hash": task.prompt_hash},
        "candidates": {}, "winner": None,
    }
    all_preds: dict[str, list[dict[str, Any]]] = {}
    per_class: dict[str, Any] = {}
    base_stats = None
    if base_preds is not None:
        metrics, base_stats, base_ex = score_system(task, records, base_preds, refs, rs,
                                                    base_cost)
        base_info["metrics"] = metrics
        evaluation["baseline"] = base_info
        all_preds[BASELINE] = attach_scores(base_preds, records, base_ex)
        per_class[BASELINE] = base_ex["extra"]
    else:
        evaluation["baseline"] = None

    cand_stats: dict[str, Any] = {}
    for name, adapter in adapters.items():
        prompts = [r["prompt"] for r in records]
        preds, seconds = model_predictions(records, prompts, model_dir, adapter, task, cfg, name)
        metrics, stats, ex = score_system(task, records, preds, refs, rs,
                                          self_hosted_cost(preds, seconds, n, cfg))
        entry: dict[str, Any] = {"metrics": metrics, "adapter": str(adapter),
                                 "seconds": round(seconds, 1)}
        if Path(adapter).is_dir():
            entry["adapter_sha256"] = sha256_tree(adapter)
        if base_stats is not None:
            entry["delta_vs_baseline"] = deltas(stats, base_stats, rs)
        evaluation["candidates"][name] = entry
        all_preds[name] = attach_scores(preds, records, ex)
        per_class[name] = ex["extra"]
        cand_stats[name] = ex

    if judge_cfg.enabled and base_preds is not None:
        from .judge import run_judge

        # Calibration needs a per-example right/wrong: the first gold label field's accuracy.
        label = next(f"{f.name}.accuracy" for f in task.fields if f.kind == "label" and f.gold)
        correct = {c: cand_stats[c]["scores"][label] for c in cand_stats}
        base_correct = base_ex["scores"][label]
        judged = run_judge(judge_cfg, task, records,
                           {c: all_preds[c] for c in cand_stats}, base_preds, correct,
                           base_correct, cfg.n_resamples, cfg.confidence, cfg.progress)
        for c, result in judged.items():
            evaluation["candidates"][c]["judge"] = result
    evaluation["judge"] = {"enabled": judge_cfg.enabled, "provider": judge_cfg.provider.kind,
                           "model": judge_cfg.provider.model,
                           "sample_frac": judge_cfg.sample_frac}

    passing = []
    for name, entry in evaluation["candidates"].items():
        entry["gates"] = check(gates_cfg, cfg.primary_metric, entry)
        if entry["gates"]["passed"]:
            passing.append(name)
    if passing:
        evaluation["winner"] = max(
            passing, key=lambda c: (evaluation["candidates"][c]["metrics"][cfg.primary_metric]
                                    ["value"], c))
    evaluation["gates_config"] = gates_cfg.model_dump()
    evaluation["seconds"] = round(time.perf_counter() - t_start, 1)

    from .eval_report import write_reports

    evaluation = finite(evaluation)
    files = write_reports(cfg, task, evaluation, records, all_preds, per_class)
    write_json(cfg.metrics, evaluation)
    if cfg.log_mlflow and mlflow_cfg is not None:
        log_mlflow(mlflow_cfg, params or {}, evaluation, files + [Path(cfg.metrics)])
    log.info("evaluate: winner %s (%.0f s)", evaluation["winner"], evaluation["seconds"])
    return evaluation


def finite(obj: Any) -> Any:
    """NaN/inf (e.g. ROUGE with no reference in a sample) -> null: eval.json stays strict JSON."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer | np.bool_):
        return obj.item()
    return obj


def self_hosted_cost(preds: list[dict[str, Any]], seconds: float, n: int,
                     cfg: EvaluateConfig) -> dict[str, float]:
    tokens = sum(p["new_tokens"] for p in preds)
    return {"usd_per_1k": cfg.hardware_usd_per_hour * seconds / 3600 / n * 1000,
            "tokens_per_s": tokens / seconds if seconds else 0.0,
            "examples_per_s": n / seconds if seconds else 0.0}


def attach_scores(preds: list[dict[str, Any]], records: list[dict[str, Any]],
                  ex: dict[str, Any]) -> list[dict[str, Any]]:
    """Prediction rows for `reports/predictions/<name>.jsonl`: answer, gold and scores."""
    rows = []
    for i, (p, r) in enumerate(zip(preds, records, strict=True)):
        scores = {}
        for key, values in ex["scores"].items():
            mask = ex["masks"].get(key)
            if mask is None or mask[i]:
                scores[key] = float(values[i])
        rows.append({**p, "gold": r["gold"], "gold_all": r.get("gold_all"),
                     "correct": bool(next((v for k, v in scores.items()
                                           if k.endswith(".accuracy")), 0)),
                     "scores": scores})
    return rows


def log_mlflow(mlflow_cfg: Any, params: dict[str, Any], evaluation: dict[str, Any],
               files: list[Path]) -> None:
    """One child run per system under the pipeline run: metrics, gate results, the report."""
    import mlflow

    from .tracking import child_run_tags, pipeline_run

    parent = pipeline_run(mlflow_cfg, params)
    client = mlflow.MlflowClient()
    experiment = client.get_run(parent).info.experiment_id
    systems = dict(evaluation["candidates"])
    if evaluation.get("baseline"):
        systems[BASELINE] = evaluation["baseline"]
    for name, entry in systems.items():
        run = client.create_run(experiment, run_name=f"eval-{name}", tags=child_run_tags(
            parent, **{"temper.stage": "evaluate", "temper.system": name,
                       "temper.winner": str(evaluation["winner"] == name).lower()}))
        rid = run.info.run_id
        flat = {}
        for key, m in entry["metrics"].items():
            for part in ("value", "ci_low", "ci_high"):
                if isinstance(m.get(part), float | int) and np.isfinite(m[part]):
                    flat[key if part == "value" else f"{key}.{part}"] = float(m[part])
        for key, d in (entry.get("delta_vs_baseline") or {}).items():
            if d["value"] is not None:
                flat[f"delta.{key}"] = d["value"]
            if d["ci_low"] is not None:
                flat[f"delta.{key}.ci_low"] = d["ci_low"]
        judge = entry.get("judge") or {}
        if judge.get("win_rate", {}).get("value") is not None:
            flat["judge.win_rate"] = judge["win_rate"]["value"]
        if judge.get("flip_rate") is not None:
            flat["judge.flip_rate"] = judge["flip_rate"]
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client.log_batch(rid, metrics=[Metric(k, v, now, 0) for k, v in flat.items()])
        if "gates" in entry:
            client.set_tag(rid, "temper.gates_passed", str(entry["gates"]["passed"]).lower())
        for path in files:
            if path.exists() and (path.suffix in (".md", ".json", ".png")
                                  or path.name == f"{name}.jsonl"):
                client.log_artifact(rid, str(path), "evaluate")
        client.set_terminated(rid)
    client.log_metric(parent, "eval.seconds", evaluation["seconds"])


def write_text(path: Path, text: str) -> None:
    with atomic_open(path) as handle:
        handle.write(text)


__all__ = ["EvaluateConfig", "EvalError", "run", "write_jsonl"]
