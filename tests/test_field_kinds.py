"""Every answer kind of docs/tasks.md through the real pipeline, in one small CUAD task.

The task holds the label-like kinds (a multi-label set first, so the few-shot picking keys on
lists; a single label, which the splits are stratified by; a boolean) and the kinds without
labels (a list, a nullable text, an integer with a tolerance). Each field gets its own metrics;
the label-like ones macro-F1 where single-valued and a TF-IDF yardstick; the confusion matrix
is the single label's. The task goes through real `dvc exp run` (prepare -> distil -> train ->
evaluate -> route -> cache_eval -> cost -> register) in a copy of the project and gets its
model registered with `@challenger` (a model's first version gets the alias even from an
experiment). Tiny sizes: what is checked is that each kind runs on its own terms and that every
output dvc.yaml declares exists, not how well 2 steps learn.

(Until December 2026 this ran one task per kind, six pipeline runs of ~75 s, then two tasks,
label-like kinds and the rest. The kind-specific paths are per field, so one task reaches them
all; a task with no label-like field at all (no yardstick, an empty confusion matrix) is the
OpenAI chat profile's text task, `tests/test_openai_sources.py`.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from dvc_project import TINY, env_of, exp_run, make_repo, missing_outputs, profile_args, sh

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["Audit Rights", "Insurance", "Anti-Assignment", "Cap on Liability", "Governing Law"]
SMALL = ["prepare.max_examples={train:16,validation:4,test:2}", *TINY]


class Kind:
    """One field: its kind's settings, the CUAD column holding its gold, its metric."""

    def __init__(self, name: str, field: dict, column: str, metric: str, label_like: bool):
        self.name, self.field, self.column = name, field, column
        self.metric, self.label_like = f"{name}.{metric}", label_like


# the task's fields, in order (the first field keys the few-shot choice)
KINDS: list[Kind] = [
    Kind("tags", {"kind": "label", "multi": True, "labels": LABELS}, "labels", "micro_f1", True),
    Kind("clause_type", {"kind": "label", "labels": LABELS}, "category", "accuracy", True),
    Kind("multiple", {"kind": "boolean"}, "multi_label", "accuracy", True),
    Kind("terms", {"kind": "list"}, "labels", "set_f1", False),
    Kind(
        "excerpt",
        {"kind": "text", "nullable": True, "null_values": ["Yes", "No", "[]"]},
        "answer",
        "rougeL",
        False,
    ),
    Kind(
        "words",
        {"kind": "number", "integer": True, "tolerance": 5},
        "n_words",
        "within_tolerance",
        False,
    ),
]
PRIMARY = "clause_type.accuracy"


def task_file() -> dict:
    names = ", ".join(k.name for k in KINDS)
    return {
        "name": "kinds",
        "version": 1,
        "description": f"Answer {names} about a CUAD contract clause.",
        "system_prompt": f"Read the contract clause. Reply with JSON only, keys {names}.",
        "user_template": "Clause:\n{text}",
        "labels_in_student_prompt": True,
        "max_new_tokens": 48,
        "fields": [
            {"name": k.name, "description": f"The {k.name}.", "gold": True, **k.field}
            for k in KINDS
        ],
    }


def profile() -> dict:
    return {
        "task": "configs/tasks/kinds.yaml",
        "prepare": {
            "fields": {
                "id": "id",
                "text": "clause",
                "group": "contract_id",
                "split": "split",
                "gold": {k.name: k.column for k in KINDS},
                "gold_all": {},
            },
            # The label kinds keep to 5 of CUAD's 38 clause types (a small label list).
            "sources": ["data/raw/kinds/clauses.jsonl"],
            "source_dir": "data/raw/kinds",
        },
        "train": {"candidates": {"r16": {"learning_rate": 0.003}}},  # one candidate: quicker
        "evaluate": {"primary_metric": PRIMARY},
        "register": {"model_name": "temper-kinds"},
    }


def overrides(project: Path) -> list[str]:
    """The task's profile over the project's params.yaml, at tiny sizes."""
    return profile_args(project, profile()) + SMALL


@pytest.fixture(scope="module")
def project(tmp_path_factory, base_model_dir) -> Path:
    """A git + DVC copy of the project with a 5-label CUAD sample and the task."""

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
        (repo / "configs" / "tasks" / "kinds.yaml").write_text(yaml.safe_dump(task_file()))

    repo = tmp_path_factory.mktemp("kinds") / "project"
    make_repo(repo, base_model_dir, ["data/raw/contracts/README.md"], add_sample_and_tasks)
    return repo


@pytest.mark.slow
def test_every_field_kind_runs_to_register_with_its_metrics(project):
    exp_run(project, overrides(project), name="kinds")

    assert missing_outputs(project) == []
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    assert evaluation["task"]["name"] == "kinds"
    metrics = evaluation["candidates"]["r16"]["metrics"]
    yardstick = evaluation["classical"]["metrics"]
    for kind in KINDS:
        assert kind.metric in metrics and kind.metric in evaluation["baseline"]["metrics"]
        # a TF-IDF yardstick for the label-like kinds, and only for them
        assert (kind.metric in yardstick) == kind.label_like, (kind.metric, yardstick)
        if kind.field["kind"] in ("label", "boolean") and not kind.field.get("multi"):
            assert f"{kind.name}.macro_f1" in metrics
    # the single label's matrix: one row per test example
    confusion = (project / "reports" / "plots" / "confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted"
    assert len(confusion) == 1 + evaluation["n_examples"]

    register = json.loads((project / "metrics" / "register.json").read_text())
    assert register["registered"] and register["experiment"] == "kinds"
    assert register["alias"] == "challenger"  # a new model's first version gets the alias

    import mlflow

    store = f"sqlite:///{project / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    version = client.get_model_version_by_alias(register["model_name"], "challenger")
    assert str(version.version) == register["version"]
    parent = client.get_run(register["pipeline_run_id"])
    assert parent.info.run_name == "kinds" and parent.info.status == "FINISHED"


@pytest.mark.slow
def test_temper_exps_shows_the_experiments_on_one_screen(project):
    """`dvc exp show` had 1,282 columns; `temper exps` keeps the changed params and the
    headline results. A second experiment of the task above (same project) under another
    model name reruns register alone."""
    assert "kinds" in sh(project, "dvc", "exp", "list", "--name-only", env=env_of()).split()
    renamed = [*overrides(project), "register.model_name=temper-kinds-renamed"]
    out = exp_run(project, renamed, "renamed")
    assert "Running stage 'register'" in out and "Running stage 'evaluate'" not in out, out

    done = sh(project, "dvc", "exp", "list", "--name-only", env=env_of()).split()
    table = sh(project, "temper", "exps", env=env_of()).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[0] == "experiment" and "task name" in header and "registered" in header
    # the params that differ between the runs, and only those
    assert "register.model_name" in header and "train.rank" not in header, header
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    for name in done:
        assert "kinds" in rows[name] and "@challenger" in rows[name], rows[name]
    assert "temper-kinds-renamed" in rows["renamed"]
    assert max(len(line) for line in table) < 400  # a screen, not 56k characters
