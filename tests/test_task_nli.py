"""A second real task with no code change: ContractNLI through the whole DVC pipeline.

The `nli` profile's overrides plus a small sample (and gates lowered so that 3 training steps
can pass them: what is checked is that the task runs end to end on its own terms, not how
well 3 steps learn), through real `dvc exp run` in a copy of the project."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dvc_project import TINY, exp_run, make_repo, profile_args

from temper.config import read_yaml

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["prepare.max_examples={train:24,validation:4,test:2}", *TINY]


@pytest.mark.slow
def test_nli_profile_runs_prepare_to_register_with_no_code_change(tmp_path, base_model_dir):
    repo = make_repo(tmp_path / "project", base_model_dir, ["data/raw/contract_nli"])

    profile = read_yaml(ROOT / "configs" / "profiles" / "nli.yaml")
    exp_run(repo, profile_args(repo, profile) + SMALL)

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
