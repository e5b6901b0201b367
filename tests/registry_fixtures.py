"""Builders for the registry tests: a real sqlite MLflow store, a tiny real PEFT adapter on the
real base model, and a throw-away project folder (a git repo) laid out like the pipeline's.

A fresh MLflow sqlite store costs ~7 s of migrations, so one template is built per pytest process
and copied for each test. Evaluation outputs (eval.json, predictions) are written here in the
shape the evaluate stage writes; their numbers are chosen by each test, which is the point: the
tests decide which challenger is worse.
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


def make_project(tmp: Path, base_dir: Path) -> Path:
    """A project folder: params.yaml (store in tmp), dvc.lock, card template, data README,
    models/base (link to the real one), a git repo with one commit."""
    shutil.copy(template_db(), tmp / "mlflow.db")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["mlflow"] = {
        "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "experiment": "temper",
        "artifact_root": "mlartifacts",
    }
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "model_card.md", tmp / "configs" / "model_card.md")
    (tmp / "data" / "raw" / "contracts").mkdir(parents=True)
    shutil.copy(
        ROOT / "data" / "raw" / "contracts" / "README.md",
        tmp / "data" / "raw" / "contracts" / "README.md",
    )
    (tmp / "models").mkdir()
    (tmp / "models" / "base").symlink_to(base_dir.resolve())
    write_lock(
        tmp,
        prepared="0123456789abcdef0123456789abcdef.dir",
        distilled="fedcba9876543210fedcba9876543210.dir",
    )
    (tmp / ".gitignore").write_text("mlflow.db\nmlartifacts/\nmodels/\nreports/\nmetrics/\n")
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


def train_candidates(tmp: Path, names: list[str], adapter: Path) -> dict[str, str]:
    """What the train stage leaves: adapter + train_metrics.json per candidate, and a child run
    per candidate under the pipeline run (made with tracking.py, as train.py does)."""
    import mlflow

    from temper import tracking
    from temper.config import load_params, section

    params = load_params(tmp / "params.yaml")
    cfg = section(params, "mlflow", tracking.MlflowConfig)
    parent = tracking.pipeline_run(cfg, params, tmp)
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent).info.experiment_id
    run_ids = {}
    for name in names:
        run = client.create_run(
            experiment_id,
            run_name=f"train-{name}",
            tags=tracking.child_run_tags(
                parent, **{"temper.stage": "train", "temper.candidate": name}
            ),
        )
        client.log_metric(run.info.run_id, "val_loss", 1.0)
        client.log_artifacts(run.info.run_id, str(adapter), "adapter")
        client.set_terminated(run.info.run_id, "FINISHED")
        out = tmp / "models" / "candidates" / name
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(adapter, out / "adapter")
        (out / "train_metrics.json").write_text(
            json.dumps({"mlflow_run_id": run.info.run_id, "val_loss": 1.0})
        )
        run_ids[name] = run.info.run_id
    return run_ids


def write_eval(
    tmp: Path, correct: dict[str, list[int]], winner: str | None, failing: tuple[str, ...] = ()
) -> dict[str, Any]:
    """metrics/eval.json and reports/predictions/<name>.jsonl as pipelines/evaluate.py writes
    them, for candidates with the given per-example correctness (1/0) on the same test ids;
    the baseline gets every fourth example right. Intervals are fixed +-0.05 (not bootstrapped:
    register only copies them)."""
    n = len(next(iter(correct.values())))
    ids = [f"clause-{i:04d}" for i in range(n)]
    base = [1 if i % 4 == 0 else 0 for i in range(n)]
    primary = "clause_type.accuracy"

    def summary(values: list[int]) -> dict[str, float]:
        mean = sum(values) / len(values)
        return {"value": mean, "ci_low": max(-1.0, mean - 0.05), "ci_high": min(1.0, mean + 0.05)}

    candidates = {}
    pred_dir = tmp / "reports" / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    for name, values in correct.items():
        delta = [a - b for a, b in zip(values, base, strict=True)]
        passed = name not in failing
        candidates[name] = {
            "metrics": {
                primary: summary(values),
                "json_valid_rate": {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0},
                "usd_per_1k": {"value": 0.02},
            },
            "delta_vs_baseline": {primary: summary(delta)},
            "gates": {
                "passed": passed,
                "checks": [
                    {
                        "gate": "min_primary",
                        "threshold": 0.3,
                        "op": ">=",
                        "value": summary(values)["value"],
                        "passed": passed,
                        "note": primary,
                    }
                ],
            },
            "adapter": f"models/candidates/{name}/adapter",
        }
        with open(pred_dir / f"{name}.jsonl", "w") as handle:
            for i, ok in zip(ids, values, strict=True):
                gold = {"clause_type": "Governing Law", "key_term": None}
                label = "Governing Law" if ok else "Audit Rights"
                handle.write(
                    json.dumps(
                        {
                            "id": i,
                            "output": json.dumps({"clause_type": label, "key_term": None}),
                            "latency_ms": 50.0,
                            "new_tokens": 12,
                            "gold": gold,
                            "correct": bool(ok),
                            "scores": {primary: float(ok)},
                        }
                    )
                    + "\n"
                )
    evaluation = {
        "primary_metric": primary,
        "n_examples": n,
        "winner": winner,
        "candidates": candidates,
        "baseline": {"name": "baseline", "kind": "base_model", "metrics": {primary: summary(base)}},
    }
    (tmp / "metrics").mkdir(exist_ok=True)
    (tmp / "metrics" / "eval.json").write_text(json.dumps(evaluation, indent=2))
    return evaluation


def pattern(n: int, right: int) -> list[int]:
    """n examples of which the first `right` are correct."""
    return [1] * right + [0] * (n - right)
