"""Every shipped config loads into the typed config of the code that uses it."""

from __future__ import annotations

from pathlib import Path

import pytest

from temper.cli.profiles import profile_overrides
from temper.config import (
    ConfigError,
    load_params,
    parse_overrides,
    read_yaml,
)
from temper.params import TemperParams, config_sections
from temper.task import load_task

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_sections_all_load():
    params = load_params(ROOT / "params.yaml")
    unknown = set(params) - set(config_sections()) - {"task"}
    assert not unknown, f"params.yaml sections without a typed config: {unknown}"
    for name in config_sections():
        assert name in params, f"params.yaml lacks the '{name}' section"
    TemperParams.of(params)
    assert (ROOT / params["task"]).is_file()


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs" / "profiles").glob("*.yaml")), ids=lambda p: p.stem
)
def test_profiles_apply_cleanly(path):
    overrides = profile_overrides(read_yaml(path), read_yaml(ROOT / "params.yaml"), TemperParams)
    params = load_params(ROOT / "params.yaml", overrides)
    TemperParams.of(params)
    # What the profile says is what comes out, mappings replaced whole (not merged).
    profile = read_yaml(path)
    for name, values in profile.items():
        if isinstance(values, dict):
            for key, value in values.items():
                if not isinstance(value, dict) or key in ("max_examples", "candidates"):
                    assert params[name][key] == value, f"{name}.{key}"
        else:
            assert params[name] == values
    task = load_task(ROOT / params["task"])
    prepare = TemperParams.of(params).prepare
    assert set(prepare.fields.gold) <= set(task.by_name), "gold columns name task fields"
    for source in prepare.sources:
        assert (ROOT / source).is_file()
        assert (ROOT / source).resolve().is_relative_to((ROOT / prepare.source_dir).resolve())


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
        TemperParams.of(params)


def test_wrong_type_is_an_error_naming_the_field():
    params = load_params(ROOT / "params.yaml", ["prepare.max_tokens=lots"])
    with pytest.raises(ConfigError, match=r"prepare\.max_tokens"):
        TemperParams.of(params)


def test_overrides_parse_like_dvc_set_param():
    assert parse_overrides(["a.b=1", "a.c=null", "d=true", "e=x y"]) == {
        "a": {"b": 1, "c": None},
        "d": True,
        "e": "x y",
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["novalue"])


def test_overrides_take_dvc_add_and_delete_forms():
    params = load_params(
        ROOT / "params.yaml",
        ["~prepare.fields.gold", "+prepare.fields.gold={label: label}", "++train.rank=4"],
    )
    assert params["prepare"]["fields"]["gold"] == {"label": "label"}
    assert params["train"]["rank"] == 4
    with pytest.raises(ConfigError, match="no 'prepare.nothing' to delete"):
        load_params(ROOT / "params.yaml", ["~prepare.nothing"])


def test_profile_overrides_quote_what_needs_it_and_split_on_spaces_only_in_quotes():
    params = {"prepare": {"fields": {"text": "clause", "gold": {"a": "b"}}}}
    profile = {"prepare": {"fields": {"text": "Q: {q} | A: {a}", "gold": {"label": "label"}}}}
    overrides = profile_overrides(profile, params, TemperParams)
    assert overrides == [
        'prepare.fields.text="Q: {q} | A: {a}"',
        "~prepare.fields.gold",
        "+prepare.fields.gold.label=label",
    ]
    assert all(" " not in o for o in overrides[1:])
    with pytest.raises(ConfigError, match="newline"):
        profile_overrides({"task": "a\nb"}, {"task": "x"}, TemperParams)


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="p.yaml: invalid YAML"):
        read_yaml(bad)


def test_bad_override_is_named_in_the_error():
    params = load_params(ROOT / "params.yaml", ["prepare.max_tokens=abc"])
    with pytest.raises(ConfigError, match=r"^-S prepare\.max_tokens=abc: invalid 'prepare'"):
        TemperParams.of(params)
    # A section-level check (validation + test < 1) is traced to the override that broke it.
    params = load_params(ROOT / "params.yaml", ["prepare.split.test=0.95"])
    with pytest.raises(ConfigError, match=r"^-S prepare\.split\.test=0\.95: invalid 'prepare'"):
        TemperParams.of(params)
    # An override of another key does not take the blame for the file's bad value.
    params = load_params(ROOT / "params.yaml", ["prepare.seed=1", "prepare.max_tokenz=5"])
    with pytest.raises(ConfigError, match=r"^-S prepare\.max_tokenz=5: invalid") as err:
        TemperParams.of(params)
    assert "seed" not in str(err.value)


def test_bad_value_in_the_file_names_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("prepare:\n  sources: [a.jsonl]\n  max_tokens: lots\n")
    params = load_params(path, ["prepare.seed=3"])
    with pytest.raises(ConfigError, match=rf"^{path}: invalid 'prepare' section"):
        TemperParams.of(params)
    assert params.source == str(path) and params.overrides == ["prepare.seed=3"]
    # Mixed origins: each line says where its value came from.
    params = load_params(path, ["prepare.seed=abc"])
    with pytest.raises(ConfigError) as err:
        TemperParams.of(params)
    assert f"prepare.max_tokens ({path})" in str(err.value)
    assert "prepare.seed (-S prepare.seed=abc)" in str(err.value)


@pytest.mark.parametrize("value", ["{}", "null"])
def test_override_of_an_empty_mapping_or_null_clears_the_mapping(value):
    params = load_params(ROOT / "params.yaml", [f"prepare.max_examples={value}"])
    assert TemperParams.of(params).prepare.max_examples == {}
    # Later overrides apply to the cleared value, not to the file's.
    params = load_params(
        ROOT / "params.yaml", [f"prepare.max_examples={value}", "prepare.max_examples.test=7"]
    )
    assert TemperParams.of(params).prepare.max_examples == {"test": 7}
    # A non-empty mapping still merges into the file's mapping.
    params = load_params(ROOT / "params.yaml", ["prepare.max_examples={test: 7}"])
    assert TemperParams.of(params).prepare.max_examples == {
        "train": 1280,
        "validation": 128,
        "test": 7,
    }


def test_exponent_numbers_and_dvc_plus_keys_parse_as_under_dvc():
    """`-S train.learning_rate=5e-4` is a float (YAML 1.1 would read a string) and
    `-S '+train.candidates.new={rank: 8}'` (DVC's "add a key") means the same as without +."""
    assert parse_overrides(["train.learning_rate=5e-4"]) == {"train": {"learning_rate": 0.0005}}
    assert parse_overrides(["++a.b=1e3", "+c={rank: 8}"]) == {"a": {"b": 1000.0}, "c": {"rank": 8}}
    assert parse_overrides(["a.b=x5e-4"]) == {"a": {"b": "x5e-4"}}
    params = load_params(ROOT / "params.yaml", ["+train.candidates.r16.rank=8"])
    cfg = TemperParams.of(params).train
    assert cfg.candidates["r16"] == {"learning_rate": 0.0015, "epochs": 1.0, "rank": 8}


def test_unknown_key_suggests_the_field_meant():
    params = load_params(ROOT / "params.yaml", ["train.lr=5e-4"])
    with pytest.raises(ConfigError, match=r"train\.lr: .*did you mean 'learning_rate'"):
        TemperParams.of(params)
    params = load_params(ROOT / "params.yaml", ["distil.provider.modle=x"])
    with pytest.raises(ConfigError, match=r"did you mean .*'model'"):  # or 'mode'
        TemperParams.of(params)


# Examples in the docs that show an error on purpose.
BAD_ON_PURPOSE = {"prepare.max_tokens=abc", "train.lr=5e-4", "distil.max_usd=0.05"}


def shipped_examples() -> list[tuple[str, str]]:
    """(file, override) of every `-S`/`--set key=value` example in params.yaml's comments,
    the README and docs/ (wrapped lines joined: an example may be cut by the line end)."""
    import re

    texts = {"params.yaml": " ".join(line.split("#", 1)[1] for line in (ROOT / "params.yaml").read_text().splitlines() if "#" in line)}  # fmt: skip
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        texts[str(path.relative_to(ROOT))] = " ".join(path.read_text().splitlines())
    found = []
    for name, text in texts.items():
        for m in re.finditer(r"(?:-S|--set)\s+('[^']+'|\"[^\"]+\"|[^\s`)]+)", text):
            item = m.group(1).strip("'\"").rstrip(":,.")
            key = item.partition("=")[0].lstrip("+")
            if (
                "=" in item
                and key.split(".")[0] in config_sections()
                and item not in BAD_ON_PURPOSE
            ):
                found.append((name, item))
    return found


def test_the_docs_have_examples_to_check():
    files = {name for name, _ in shipped_examples()}
    assert {"params.yaml", "README.md"} <= files and len(shipped_examples()) >= 10


@pytest.mark.parametrize(("where", "item"), shipped_examples(), ids=lambda x: str(x)[:60])
def test_every_documented_override_runs_as_written(where, item):
    """Each example resolves: its key is a real field of the typed config (or a key of a
    mapping field such as train.candidates), the section validates, and the value lands."""
    from temper.cli.params_help import resolved
    from temper.config import parse_value

    params = load_params(ROOT / "params.yaml", [item])
    key, _, raw = item.partition("=")
    parts = key.lstrip("+").split(".")
    node = resolved(TemperParams.of(params), parts[0])[parts[0]]
    for part in parts[1:]:
        assert isinstance(node, dict) and part in node, f"{where}: {key} is not a field"
        node = node[part]
    value = parse_value(raw)
    if isinstance(value, dict) and value:  # a non-empty mapping merges into the file's
        assert node == {**node, **value}, f"{where}: -S {item} gave {node!r}"
    elif value is not None:  # null may resolve to a field's empty value
        assert node == value, f"{where}: -S {item} gave {node!r}"
