"""Every shipped config loads into the typed config of the code that uses it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.cli import SECTIONS, flatten
from pipelines.config import ConfigError, load_params, parse_overrides, read_yaml, section
from pipelines.task import load_task

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_sections_all_load():
    params = load_params(ROOT / "params.yaml")
    unknown = set(params) - set(SECTIONS) - {"task"}
    assert not unknown, f"params.yaml sections without a typed config: {unknown}"
    for name, model in SECTIONS.items():
        assert name in params, f"params.yaml lacks the '{name}' section"
        section(params, name, model)
    assert (ROOT / params["task"]).is_file()


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs" / "profiles").glob("*.yaml")), ids=lambda p: p.stem
)
def test_profiles_apply_cleanly(path):
    params = load_params(ROOT / "params.yaml", flatten(read_yaml(path)))
    for name, model in SECTIONS.items():
        section(params, name, model)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs" / "tasks").glob("*.yaml")), ids=lambda p: p.stem
)
def test_task_configs_load(path):
    task = load_task(path)
    labels = [f for f in task.fields if f.kind == "label"]
    assert all(len(f.labels) == len(set(f.labels)) > 1 for f in labels)


def test_shipped_task_is_the_38_cuad_categories():
    import json

    task = load_task(ROOT / "configs" / "tasks" / "clause_review.yaml")
    categories = json.loads((ROOT / "data/raw/contracts/categories.json").read_text())["categories"]
    expected = [c["category"] for c in categories if c["included_in_clause_files"]]
    assert task.by_name["clause_type"].labels == expected
    assert len(expected) == 38


def test_unknown_key_is_an_error_naming_the_field():
    params = load_params(ROOT / "params.yaml", ["prepare.max_tokenz=5"])
    with pytest.raises(ConfigError, match=r"prepare\.max_tokenz: Extra inputs"):
        section(params, "prepare", SECTIONS["prepare"])


def test_wrong_type_is_an_error_naming_the_field():
    params = load_params(ROOT / "params.yaml", ["prepare.max_tokens=lots"])
    with pytest.raises(ConfigError, match=r"prepare\.max_tokens"):
        section(params, "prepare", SECTIONS["prepare"])


def test_overrides_parse_like_dvc_set_param():
    assert parse_overrides(["a.b=1", "a.c=null", "d=true", "e=x y"]) == {
        "a": {"b": 1, "c": None},
        "d": True,
        "e": "x y",
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["novalue"])


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="p.yaml: invalid YAML"):
        read_yaml(bad)
