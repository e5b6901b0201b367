"""DVC follows params: data and task deps come from params.yaml, and a profile's `-S` list
means the same to `dvc exp run` as to temper. Real DVC (and git) in a temporary repo."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml

from temper.cli.profiles import profile_overrides
from temper.config import load_params, read_yaml
from temper.params import TemperParams

ROOT = Path(__file__).resolve().parents[1]


def sh(cwd: Path, *args: str) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_dvc_yaml_names_no_shipped_data_path():
    text = (ROOT / "dvc.yaml").read_text(encoding="utf-8")
    assert "contracts" not in text
    assert "clause_review" not in text


def copy_project(dst: Path) -> None:
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, dst / name)
    for name in ("pipelines", "configs"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))


def prepare_status(repo: Path) -> dict:
    out = json.loads(sh(repo, "dvc", "status", "--json", "prepare") or "{}")
    return out.get("prepare", [])


def test_editing_your_source_or_task_file_marks_prepare_changed(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_project(repo)
    # Your own data, in a folder of its own; params.yaml points prepare at it.
    mine = repo / "data" / "mine"
    mine.mkdir(parents=True)
    (mine / "clauses.jsonl").write_text('{"id": "1", "clause": "a b c d"}\n', encoding="utf-8")
    params = read_yaml(repo / "params.yaml")
    params["prepare"]["sources"] = ["data/mine/clauses.jsonl"]
    params["prepare"]["source_dir"] = "data/mine"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    # prepare's other inputs and its outputs, as files DVC can hash (what prepare would
    # write is not the point here: what makes DVC re-run it is).
    (repo / "models" / "base").mkdir(parents=True)
    (repo / "models" / "base" / "tokenizer.json").write_text("{}", encoding="utf-8")
    (repo / "data" / "prepared").mkdir(parents=True)
    (repo / "data" / "prepared" / "train.jsonl").write_text("", encoding="utf-8")
    (repo / "metrics").mkdir()
    (repo / "metrics" / "prepare.json").write_text("{}", encoding="utf-8")
    sh(repo, "dvc", "init", "--no-scm", "-q")
    sh(repo, "dvc", "commit", "-f", "-q", "prepare")
    assert prepare_status(repo) == []  # up to date

    with open(mine / "clauses.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"id": "2", "clause": "e f g h"}\n')
    changed = prepare_status(repo)
    assert {"changed deps": {"data/mine": "modified"}} in changed, changed

    sh(repo, "dvc", "commit", "-f", "-q", "prepare")
    task_file = repo / params["task"]
    task_file.write_text(task_file.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")
    changed = prepare_status(repo)
    assert {"changed deps": {params["task"]: "modified"}} in changed, changed


def test_a_profile_means_the_same_to_dvc_exp_run_as_to_temper(tmp_path):
    repo = tmp_path / "exp"
    repo.mkdir()
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    (repo / "dvc.yaml").write_text(
        "stages:\n  echo:\n    cmd: python -c pass\n    params: [task, prepare, evaluate]\n",
        encoding="utf-8",
    )
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "t@example.com")
    sh(repo, "git", "config", "user.name", "t")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "init")
    profile = read_yaml(ROOT / "configs" / "profiles" / "nli.yaml")
    overrides = profile_overrides(profile, read_yaml(repo / "params.yaml"), TemperParams)
    sh(repo, "dvc", "exp", "run", "-q", *[a for o in overrides for a in ("-S", o)])
    assert read_yaml(repo / "params.yaml") == dict(load_params(ROOT / "params.yaml", overrides))
