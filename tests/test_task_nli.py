"""A second real task with no code change: ContractNLI through the whole DVC pipeline.

The `nli` profile's overrides plus a small sample (and gates lowered so that 3 training steps
can pass them: what is checked is that the task runs end to end on its own terms, not how
well 3 steps learn), through real `dvc exp run` in a copy of the project."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from temper.cli import SECTIONS
from temper.cli.profiles import profile_overrides
from temper.config import read_yaml

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "prepare.max_examples={train:24,validation:12,test:12}",
    "train.max_steps=3",
    "train.save_steps=3",
    "evaluate.n_resamples=200",
    "evaluate.batch_size=12",
    "gates.min_primary=0.0",
    "gates.min_delta_low=null",
    "gates.min_json_valid_rate=null",
]


def sh(cwd: Path, *args: str, env: dict | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.mark.slow
def test_nli_profile_runs_prepare_to_register_with_no_code_change(tmp_path, base_model_dir):
    repo = tmp_path / "project"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("pipelines", "configs", "data/raw/contract_nli"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(base_model_dir, repo / "models" / "base")
    # The cost stage's measured throughput is a committed input (the benchmark is no stage).
    (repo / "docs" / "results").mkdir(parents=True)
    shutil.copy(ROOT / "docs/results/bench_serve.json", repo / "docs/results/bench_serve.json")
    (repo / ".gitignore").write_text("/models/\n/mlflow.db\n/mlartifacts/\n/.cache/\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "TEMPER_LOG_LEVEL": "WARNING"}
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "t@example.com")
    sh(repo, "git", "config", "user.name", "t")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "commit", "-f", "-q", "base_model", env=env)  # the copied base model
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "project")

    profile = read_yaml(ROOT / "configs" / "profiles" / "nli.yaml")
    overrides = profile_overrides(profile, read_yaml(repo / "params.yaml"), SECTIONS) + SMALL
    sh(repo, "dvc", "exp", "run", *[a for o in overrides for a in ("-S", o)], env=env)

    prepared = json.loads((repo / "metrics" / "prepare.json").read_text())
    assert prepared["task"]["name"] == "contract_nli"
    assert set(prepared["splits"]["train"]["labels"]) == {
        "Entailment",
        "Contradiction",
        "NotMentioned",
    }
    evaluation = json.loads((repo / "metrics" / "eval.json").read_text())
    assert evaluation["task"]["name"] == "contract_nli"
    assert evaluation["primary_metric"] == "label.macro_f1"
    cand = evaluation["candidates"]["r16"]["metrics"]
    for key in ("label.accuracy", "label.macro_f1", "json_valid_rate"):
        assert key in cand and key in evaluation["baseline"]["metrics"], key
    assert not any("clause_type" in k for k in cand)
    report = (repo / "reports" / "eval.md").read_text()
    assert "label.macro_f1" in report and "contract_nli" in report

    import mlflow

    # Both URIs given: an earlier test of the session may have set a global registry URI.
    store = f"sqlite:///{repo / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    assert client.get_experiment_by_name("temper-contract-nli") is not None
    versions = client.search_model_versions("name='temper-contract-nli'")
    assert len(versions) == 1
    register = json.loads((repo / "metrics" / "register.json").read_text())
    assert register["registered"] and register["model_name"] == "temper-contract-nli"
    # An experiment leaves @challenger where it is, but a new model's first version gets it.
    assert register["experiment"] and register["alias"] == "challenger"
