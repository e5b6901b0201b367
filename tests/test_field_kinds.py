"""Every answer kind of docs/tasks.md through the real pipeline: one small CUAD task per kind.

Each task has one field of its kind (gold from a CUAD column), goes through real
`dvc exp run` (prepare -> distil -> train -> evaluate -> route -> cache_eval -> cost ->
register) in a copy of the project, gets its model registered with `@challenger` (a model's
first version gets the alias even from an experiment) and its kind's metrics, with a classical
yardstick where the kind is label-like. Tiny sizes: what is checked is that each kind runs on
its own terms and that every output dvc.yaml declares exists, not how well 2 steps learn.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from dvc_project import env_of, exp_run, make_repo, sh

from temper.cli.profiles import profile_overrides
from temper.config import read_yaml
from temper.params import TemperParams

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["Audit Rights", "Insurance", "Anti-Assignment", "Cap on Liability", "Governing Law"]
SMALL = [
    "prepare.max_examples={train:16,validation:8,test:8}",
    "train.max_steps=2",
    "train.save_steps=2",
    "evaluate.n_resamples=100",
    "evaluate.batch_size=8",
    "evaluate.baseline_few_shot=1",  # the base-model baseline's prompt: 1 shot, not 3
    "evaluate.validation=null",  # one candidate: nothing to choose on validation
    "gates.min_primary=0.0",
    "gates.min_delta_low=null",
    "gates.min_json_valid_rate=null",
]

# kind -> (the field, the CUAD column holding its gold answer, the primary metric, yardstick?)
KINDS: dict[str, tuple[dict, str, str, bool]] = {
    "label": ({"kind": "label", "labels": LABELS}, "category", "accuracy", True),
    "multi_label": ({"kind": "label", "multi": True, "labels": LABELS}, "labels", "micro_f1", True),
    "text": (
        {"kind": "text", "nullable": True, "null_values": ["Yes", "No", "[]"]},
        "answer",
        "rougeL",
        False,
    ),
    "number": (
        {"kind": "number", "integer": True, "tolerance": 5},
        "n_words",
        "within_tolerance",
        False,
    ),
    "boolean": ({"kind": "boolean"}, "multi_label", "accuracy", True),
    "list": ({"kind": "list"}, "labels", "set_f1", False),
}


def task_file(kind: str) -> dict:
    field, _, _, _ = KINDS[kind]
    return {
        "name": f"kind_{kind}",
        "version": 1,
        "description": f"Answer one {kind} field about a CUAD contract clause.",
        "system_prompt": 'Read the contract clause. Reply with JSON only: {"answer": ...}.',
        "user_template": "Clause:\n{text}",
        "labels_in_student_prompt": True,
        "max_new_tokens": 24,
        "fields": [{"name": "answer", "description": f"The {kind} answer.", "gold": True, **field}],
    }


def profile(kind: str) -> dict:
    _, column, _, _ = KINDS[kind]
    return {
        "task": f"configs/tasks/kind_{kind}.yaml",
        "prepare": {
            "fields": {
                "id": "id",
                "text": "clause",
                "group": "contract_id",
                "split": "split",
                "gold": {"answer": column},
                "gold_all": {},
            },
            # The label kinds keep to 5 of CUAD's 38 clause types (a small label list).
            "sources": ["data/raw/kinds/clauses.jsonl"],
            "source_dir": "data/raw/kinds",
        },
        "train": {"candidates": {"r16": {"learning_rate": 0.003}}},  # one candidate: quicker
        "evaluate": {"primary_metric": f"answer.{KINDS[kind][2]}"},
        "register": {"model_name": f"temper-kind-{kind.replace('_', '-')}"},
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory, base_model_dir) -> Path:
    """A git + DVC copy of the project with a 5-label CUAD sample and one task per kind."""

    def add_sample_and_tasks(repo: Path) -> None:
        rows = []
        for split in ("train", "validation", "test"):
            for line in (ROOT / "data/raw/contracts" / f"{split}.jsonl").open():
                row = json.loads(line)
                if row["category"] in LABELS and set(row["labels"]) <= set(LABELS):
                    rows.append(line)
        sample = repo / "data" / "raw" / "kinds" / "clauses.jsonl"
        sample.parent.mkdir(parents=True)
        sample.write_text("".join(rows))
        for kind in KINDS:
            task = yaml.safe_dump(task_file(kind))
            (repo / "configs" / "tasks" / f"kind_{kind}.yaml").write_text(task)

    repo = tmp_path_factory.mktemp("kinds") / "project"
    make_repo(repo, base_model_dir, ["data/raw/contracts/README.md"], add_sample_and_tasks)
    return repo


def declared_outputs(repo: Path) -> list[Path]:
    """Every out, metric and plot file dvc.yaml declares (foreach stages resolved by glob)."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    paths = []
    for stage in stages.values():
        body = stage.get("do", stage)
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind, []):
                name = entry if isinstance(entry, str) else next(iter(entry))
                if "${" not in name:
                    paths.append(repo / name)
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_field_kind_runs_to_register_with_its_metrics(project, kind):
    field, _, primary, classical = KINDS[kind]
    params = read_yaml(project / "params.yaml")
    overrides = profile_overrides(profile(kind), params, TemperParams) + SMALL
    exp_run(project, overrides, name=f"kind-{kind}")

    missing = [str(p.relative_to(project)) for p in declared_outputs(project) if not p.exists()]
    assert not missing, missing
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    assert evaluation["task"]["name"] == f"kind_{kind}"
    metrics = evaluation["candidates"]["r16"]["metrics"]
    assert (
        f"answer.{primary}" in metrics and f"answer.{primary}" in evaluation["baseline"]["metrics"]
    )
    if classical:  # a TF-IDF yardstick for the label-like kinds
        assert f"answer.{primary}" in evaluation["classical"]["metrics"], evaluation.get(
            "classical"
        )
    if kind in ("label", "boolean"):
        assert "answer.macro_f1" in metrics

    register = json.loads((project / "metrics" / "register.json").read_text())
    assert register["registered"] and register["experiment"] == f"kind-{kind}"
    assert register["alias"] == "challenger"  # a new model's first version gets the alias

    import mlflow

    store = f"sqlite:///{project / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    version = client.get_model_version_by_alias(register["model_name"], "challenger")
    assert str(version.version) == register["version"]
    parent = client.get_run(register["pipeline_run_id"])
    assert parent.info.run_name == f"kind-{kind}" and parent.info.status == "FINISHED"


@pytest.mark.slow
def test_temper_exps_shows_the_experiments_on_one_screen(project):
    """`dvc exp show` had 1,282 columns; `temper exps` keeps the changed params and the
    headline results (runs after the kinds above, in the same project)."""
    done = sh(project, "dvc", "exp", "list", "--name-only", env=env_of()).split()
    assert done, "no experiment ran before this test"
    table = sh(project, "temper", "exps", env=env_of()).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[0] == "experiment" and "task" in header and "registered" in header
    if len(done) > 1:  # the params that differ between the kinds' runs, and only those
        assert {"task", "prepare.fields.gold.answer"} <= set(header[1:-7]), header
        assert "train.rank" not in header
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    for name in done:
        kind = name.removeprefix("kind-")
        assert f"kind_{kind}" in rows[name] and "@challenger" in rows[name], rows[name]
    assert max(len(line) for line in table) < 400  # a screen, not 56k characters
