"""Builders for the registry tests: a real sqlite MLflow store, a tiny real PEFT adapter on the
real base model, and a throw-away project folder (a git repo) laid out like the pipeline's.

A fresh MLflow sqlite store costs ~7 s of migrations, so one template is built per pytest process
and copied for each test. What the train and evaluate stages leave is written here with the
stages' own types and helpers: `train_metrics.json` is a `results.TrainResult` and the train run
is logged like `stages/train.py` logs it (`tracking.child_run`, dataset inputs, the adapter as a
logged model); `metrics/eval.json` is a `results.EvalResult` whose gates come from
`evaluation.gates.check` with the project's `gates:`, and the prediction rows are
`evaluation.scoring.attach_scores` rows. Only the numbers are chosen by each test, which is the
point: the tests decide which challenger is worse. (tests/test_register.py also runs the real
evaluate stage once and feeds its output through register and promote.)
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from temper.params import TemperParams

ROOT = Path(__file__).resolve().parents[1]
MODEL = "temper-clause-review"


@functools.cache
def template_db() -> Path:
    """An empty, fully migrated MLflow sqlite store (built once per process)."""
    from mlflow import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="temper-mlflow-template-"))
    atexit.register(shutil.rmtree, folder, True)
    db = folder / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@functools.cache
def tiny_adapter(base_dir: str) -> Path:
    """A real LoRA adapter (r=2 on q/v projections) on the real base model, with its tokenizer.

    `init_lora_weights=False` gives non-zero B matrices, so the adapter changes the outputs and
    a test can tell adapted from plain generation.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="temper-adapter-"))
    atexit.register(shutil.rmtree, folder, True)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        ),
    )
    peft_model.save_pretrained(folder / "adapter", safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(folder / "adapter")
    return folder / "adapter"


def store_client(project: Path):
    """An MLflow client on the project's embedded sqlite store (tracking and registry)."""
    import mlflow

    uri = f"sqlite:///{project / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient()


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.email=t@example.com", "-c", "user.name=test", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


# The gates of the fixture projects (params.yaml): loose enough for the chosen numbers to pass
# where a test wants them to (0.4 accuracy against a 0.25 baseline passes, 0.1 fails).
GATES = {
    "min_primary": 0.3,
    "min_delta_low": 0.0,
    "min_json_valid_rate": 0.95,
    "min_schema_valid_rate": None,
    "max_p95_latency_ms": None,
    "min_judge_win_rate": 0.5,
}


def make_project(tmp: Path, base_dir: Path, params_update: dict[str, Any] | None = None) -> Path:
    """A project folder: params.yaml (store in tmp, `GATES`, then `params_update` per section),
    dvc.lock, card template, data README, small data/distilled files, models/base (link to the
    real one), a git repo with one commit."""
    shutil.copy(template_db(), tmp / "mlflow.db")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["mlflow"] = {
        "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "experiment": "temper",
        "artifact_root": "mlartifacts",
    }
    params["gates"] = dict(GATES)
    for key, values in (params_update or {}).items():
        params[key] = {**params.get(key, {}), **values}
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "model_card.md", tmp / "configs" / "model_card.md")
    shutil.copytree(ROOT / "configs" / "tasks", tmp / "configs" / "tasks")
    (tmp / "data" / "raw" / "contracts").mkdir(parents=True)
    shutil.copy(
        ROOT / "data" / "raw" / "contracts" / "README.md",
        tmp / "data" / "raw" / "contracts" / "README.md",
    )
    distilled = tmp / "data" / "distilled"
    distilled.mkdir(parents=True)
    for split, n in (("train", 6), ("validation", 3)):
        rows = [
            {
                "id": f"{split}-{i}",
                "text": f"Clause {i} of {split}.",  # as distil writes: text + parsed answer
                "answer": {"clause_type": "Governing Law"},
                "prompt": [{"role": "user", "content": f"Clause {i} of {split}."}],
                "completion": [
                    {"role": "assistant", "content": '{"clause_type": "Governing Law"}'}
                ],
            }
            for i in range(n)
        ]
        (distilled / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "models").mkdir()
    (tmp / "models" / "base").symlink_to(base_dir.resolve())
    write_lock(
        tmp,
        prepared="0123456789abcdef0123456789abcdef.dir",
        distilled="fedcba9876543210fedcba9876543210.dir",
    )
    (tmp / ".gitignore").write_text(
        "mlflow.db\nmlartifacts/\nmodels/\nreports/\nmetrics/\ndata/prepared/\n.cache/\n"
    )
    git(tmp, "init", "-q")
    git(tmp, "add", "params.yaml", "dvc.lock", "configs", "data", ".gitignore")
    git(tmp, "commit", "-q", "-m", "fixture")
    return tmp


def write_lock(tmp: Path, prepared: str, distilled: str) -> None:
    """A dvc.lock as DVC writes it (schema 2.0), with the data outputs' md5."""
    lock = {
        "schema": "2.0",
        "stages": {
            "prepare": {
                "cmd": "temper prepare",
                "outs": [
                    {
                        "path": "data/prepared",
                        "hash": "md5",
                        "md5": prepared,
                        "size": 1,
                        "nfiles": 3,
                    }
                ],
            },
            "distil": {
                "cmd": "temper distil",
                "outs": [
                    {
                        "path": "data/distilled",
                        "hash": "md5",
                        "md5": distilled,
                        "size": 1,
                        "nfiles": 2,
                    },
                    {"path": "metrics/distil.json", "hash": "md5", "md5": "0" * 32, "size": 1},
                ],
            },
        },
    }
    (tmp / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))


def project_params(tmp: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    from temper.config import load_params

    return load_params(tmp / "params.yaml", overrides)


def train_candidates(
    tmp: Path, names: list[str], adapter: Path, log_model: bool = True
) -> dict[str, Any]:
    """What the train stage leaves, per candidate: `models/candidates/<name>/adapter/`, its
    `train_metrics.json` (a `TrainResult`) and a `train-<name>` child run under the pipeline
    run, logged as stages/train.py logs it: params `train.*`, the train/validation files as
    dataset inputs, the adapter as a logged model with the training metrics linked to it.
    `log_model=False`: a candidate trained without a logged model (`mlflow_model_id` None).
    Returns {name: TrainResult}."""
    from temper import tracking
    from temper.config import flatten
    from temper.io import model_hash
    from temper.results import TrainResult

    params = project_params(tmp)
    cfg = TemperParams.of(params).mlflow
    base = TemperParams.of(params).train.model_dump(exclude={"candidates"})
    base_hash = model_hash(tmp / "models" / "base")
    results = {}
    for name in names:
        digits = "".join(c for c in name.split("-")[0] if c.isdigit())
        config = {**base, "rank": int(digits or 16)}
        out = tmp / "models" / "candidates" / name
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(adapter, out / "adapter")
        with tracking.child_run(
            cfg, params, "train", f"train-{name}", **{"temper.candidate": name}
        ) as run:
            run.log_params({**flatten({"train": config}), "base_model_hash": base_hash})
            for split in ("train", "validation"):
                tracking.log_dataset(
                    run, tmp / "data" / "distilled" / f"{split}.jsonl", split, "training"
                )
            result = TrainResult(
                candidate=name,
                steps=4,
                train_loss=1.2,
                train_loss_mean=1.5,
                val_loss=1.0,
                base_val_loss=2.0,
                train_seconds=3.0,
                train_tokens=400,
                tokens_per_s=133.3,
                peak_rss_mb=1000.0,
                peak_cuda_mb=None,
                train_records=6,
                clauses_cut=0,
                val_records=3,
                trainable_params=1000,
                precision="fp32",
                gradient_checkpointing=False,
                num_processes=1,
                rank_weight_hashes=["0" * 16],
                rank_tokens=[400],
                resumed=False,
                mlflow_run_id=run.run_id,
                base_model_hash=base_hash,
                data_hash="d" * 16,
                config=config,
            )
            if log_model:
                keys = {k: config[k] for k in ("method", "rank", "learning_rate", "max_steps")}
                result.mlflow_model_id = tracking.log_adapter_model(
                    run, out / "adapter", name, flatten({"train": keys})
                )
            run.log_metrics(
                {"val_loss": result.val_loss, "base_val_loss": result.base_val_loss},
                model_id=result.mlflow_model_id,
            )
        result.save(out / "train_metrics.json")
        results[name] = result
    return results


PRIMARY = "clause_type.accuracy"


def write_eval(tmp: Path, correct: dict[str, list[int]], winner: str | None = None) -> Any:
    """metrics/eval.json (an `EvalResult`) and reports/predictions/<name>.jsonl (rows as
    `attach_scores` writes them) for candidates with the given per-example correctness (1/0)
    on the same test ids; the baseline (base model) gets every fourth example right.

    Intervals are fixed +-0.05 (not bootstrapped: register only copies them). The gates are
    `evaluation.gates.check` with the project's `gates:` and the winner is `pick_winner`'s, as
    in the evaluate stage; `winner` states what the test expects (checked). Returns the result.
    """
    import numpy as np

    from temper.evaluation.gates import check, pick_winner
    from temper.evaluation.scoring import answer_fields, attach_scores
    from temper.io import sha256_file, write_jsonl
    from temper.results import EvalResult
    from temper.task import load_task

    task = load_task(ROOT / "configs" / "tasks" / "clause_review.yaml")
    gates_cfg = TemperParams.of(project_params(tmp)).gates
    n = len(next(iter(correct.values())))
    gold = {"clause_type": "Governing Law", "key_term": None}
    records = [
        {
            "id": f"clause-{i:04d}",
            "text": f"Clause {i} is governed by the laws of New York.",
            "prompt": task.messages(f"Clause {i} is governed by the laws of New York."),
            "gold": gold,
            "gold_all": {"clause_type": ["Governing Law"]},
        }
        for i in range(n)
    ]
    test_file = tmp / "data" / "prepared" / "test.jsonl"
    write_jsonl(test_file, records)
    base = [1 if i % 4 == 0 else 0 for i in range(n)]

    def summary(values: list[int]) -> dict[str, float]:
        mean = sum(values) / len(values)
        return {"value": mean, "ci_low": max(-1.0, mean - 0.05), "ci_high": min(1.0, mean + 0.05)}

    def rows(values: list[int]) -> list[dict[str, Any]]:
        preds = []
        for rec, ok in zip(records, values, strict=True):
            label = "Governing Law" if ok else "Audit Rights"
            output = json.dumps({"clause_type": label, "key_term": None})
            preds.append(
                {
                    "id": rec["id"],
                    "output": output,
                    "latency_ms": 50.0,
                    "batch_ms": 400.0,
                    "new_tokens": 12,
                    **answer_fields(task, output),
                }
            )
        ex = {
            "scores": {PRIMARY: np.array(values, float), "json_valid_rate": np.ones(len(values))},
            "masks": {},
        }
        return attach_scores(preds, records, ex)

    candidates = {}
    pred_dir = tmp / "reports" / "predictions"
    for name, values in correct.items():
        delta = [a - b for a, b in zip(values, base, strict=True)]
        candidates[name] = {
            "adapter": f"models/candidates/{name}/adapter",
            "seconds": 1.0,
            "metrics": {
                PRIMARY: summary(values),
                "json_valid_rate": {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0},
                "usd_per_1k": {"value": 0.02},
            },
            "delta_vs_baseline": {PRIMARY: summary(delta)},
        }
        write_jsonl(pred_dir / f"{name}.jsonl", rows(values))
    write_jsonl(pred_dir / "baseline.jsonl", rows(base))
    result = EvalResult.model_validate(
        {
            "primary_metric": PRIMARY,
            "n_examples": n,
            "test_file": str(test_file),
            "test_sha256": sha256_file(test_file),
            "confidence": 0.95,
            "n_resamples": 1000,
            "task": {"name": task.name, "prompt_hash": task.prompt_hash},
            "baseline": {
                "name": "baseline",
                "kind": "base_model",
                "metrics": {PRIMARY: summary(base)},
                "few_shot_ids": [],
                "seconds": 1.0,
                "cached": False,
            },
            "candidates": candidates,
            "winner": None,
            "judge": {
                "enabled": False,
                "provider": "openai",
                "model": "gpt-4o-mini",
                "sample_frac": 0.2,
            },
            "gates_config": gates_cfg.model_dump(),
            "seconds": 2.0,
        }
    )
    for entry in result.candidates.values():
        entry.gates = check(gates_cfg, PRIMARY, entry)
    result.winner = pick_winner(result)
    assert result.winner == winner, f"fixture numbers give winner {result.winner}, not {winner}"
    result.save(tmp / "metrics" / "eval.json")
    return result


def pattern(n: int, right: int) -> list[int]:
    """n examples of which the first `right` are correct."""
    return [1] * right + [0] * (n - right)


def gentle_adapter(base_dir: Path, folder: Path) -> Path:
    """A real LoRA adapter whose B matrices are small: it changes the logits a little but keeps
    the base model's habit of answering in JSON (the fixtures' tiny adapter makes it chatter),
    so label confidences have answers to score."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(
        model,
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    peft_model.save_pretrained(folder, safe_serialization=True)
    return folder
