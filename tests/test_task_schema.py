"""The answer schema: field kinds, the JSON Schema they generate, validation derived from it,
gold normalisation per kind."""

from __future__ import annotations

import jsonschema
import pytest
import yaml

from temper.config import ConfigError
from temper.task import TaskConfig, TaskField, load_task

FIELDS = [
    {"name": "kind", "kind": "label", "labels": ["A", "B"], "gold": True},
    {"name": "tags", "kind": "label", "multi": True, "labels": ["x", "y", "z"], "gold": True},
    {"name": "note", "kind": "text", "nullable": True, "null_values": ["-"]},
    {"name": "amount", "kind": "number", "tolerance": 0.5, "gold": True},
    {"name": "count", "kind": "number", "integer": True, "nullable": True},
    {"name": "urgent", "kind": "boolean", "gold": True},
    {"name": "parties", "kind": "list", "gold": True},
]


@pytest.fixture
def task() -> TaskConfig:
    return TaskConfig(name="t", system_prompt="s", user_template="{text}", fields=FIELDS)


VALID = {
    "kind": "A",
    "tags": ["x", "z"],
    "note": None,
    "amount": 3.5,
    "count": 2,
    "urgent": False,
    "parties": ["Acme", "Beta"],
}


def test_each_kind_generates_its_json_schema(task):
    props = task.json_schema()["properties"]
    assert props["kind"]["type"] == "string" and props["kind"]["enum"] == ["A", "B"]
    assert props["tags"]["type"] == "array"
    assert props["tags"]["items"] == {"type": "string", "enum": ["x", "y", "z"]}
    assert props["note"]["type"] == ["string", "null"]
    assert props["amount"]["type"] == "number"
    assert props["count"]["type"] == ["integer", "null"]
    assert props["urgent"]["type"] == "boolean"
    assert props["parties"]["items"] == {"type": "string"}
    assert task.json_schema()["required"] == [f["name"] for f in FIELDS]
    jsonschema.Draft202012Validator.check_schema(task.json_schema())


def test_the_cuad_schema_and_prompt_hash_are_what_they_were():
    # The label/text shapes and the hash are part of provider and teacher cache keys.
    task = load_task("configs/tasks/clause_review.yaml")
    props = task.json_schema()["properties"]
    assert props["key_term"]["type"] == ["string", "null"] and "enum" not in props["key_term"]
    assert props["clause_type"]["type"] == "string" and len(props["clause_type"]["enum"]) == 38
    assert task.prompt_hash == "a7fc7e8caa50"  # as on main before the field kinds
    assert task.model_copy(update={"judge_prompt": "other"}).prompt_hash == task.prompt_hash


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"kind": "C"}, "field 'kind': 'C' is not an allowed label"),
        ({"kind": None}, "field 'kind' is null but not nullable"),
        ({"tags": ["x", "w"]}, "field 'tags' item 1: 'w' is not an allowed label"),
        ({"tags": "x"}, "field 'tags' is string, expected list"),
        ({"note": 3}, "field 'note' is number, expected string"),
        ({"amount": "3.5"}, "field 'amount' is string, expected number"),
        ({"amount": True}, "field 'amount' is boolean, expected number"),
        ({"count": 2.5}, "field 'count' is number, expected integer"),
        ({"urgent": "yes"}, "field 'urgent' is string, expected boolean"),
        ({"parties": ["Acme", 1]}, "field 'parties' item 1 is number, expected string"),
        ({"extra": 1}, "unexpected field 'extra'"),
    ],
)
def test_validation_messages_name_the_field(task, change, problem):
    assert task.validate_answer(VALID) == []
    assert task.validate_answer({**VALID, **change}) == [problem]


def test_missing_fields_and_non_objects(task):
    partial = {k: v for k, v in VALID.items() if k not in ("amount", "urgent")}
    assert task.validate_answer(partial) == ["missing field 'amount'", "missing field 'urgent'"]
    assert task.validate_answer([1]) == ["answer is list, expected a JSON object"]
    assert task.validate_answer("x") == ["answer is string, expected a JSON object"]


def test_validate_answer_accepts_exactly_what_the_json_schema_accepts(task):
    # validate_answer is derived from json_schema(): the two agree on every example.
    validator = jsonschema.Draft202012Validator(task.json_schema())
    examples = [VALID, [], None, {}, {**VALID, "count": None}, {**VALID, "count": 3.0}]
    examples += [{**VALID, k: v} for k in VALID for v in (None, "A", 1, 1.5, True, [], ["x"])]
    accepted = 0
    for example in examples:
        assert (task.validate_answer(example) == []) == validator.is_valid(example), example
        accepted += validator.is_valid(example)
    assert 5 < accepted < len(examples)  # both sides of the line are exercised


def test_gold_normalisation_per_kind(task):
    f = task.by_name
    assert [task.gold_value(f["amount"], v) for v in ("3", 3, " 3.5 ", "", None)] == [
        3.0,
        3.0,
        3.5,
        None,
        None,
    ]
    assert [task.gold_value(f["urgent"], v) for v in ("true", "Yes", True, "0", "no")] == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert task.gold_value(f["tags"], '["x", "y"]') == ["x", "y"]
    assert task.gold_value(f["tags"], ["x"]) == ["x"]
    assert task.gold_value(f["tags"], "z") == ["z"]
    assert task.gold_value(f["parties"], '[" Acme ", null, ""]') == ["Acme"]
    assert task.gold_value(f["note"], "-") is None and task.gold_value(f["note"], " hi ") == "hi"
    # A single-valued field reads a list as alternatives (gold_all), each normalised.
    assert task.gold_value(f["amount"], ["1", "2"]) == [1.0, 2.0]
    with pytest.raises(ValueError, match="not a boolean"):
        task.gold_value(f["urgent"], "maybe")
    with pytest.raises(ValueError, match="could not convert"):
        task.gold_value(f["amount"], "three")


def test_cuad_gold_keeps_its_old_normalisation():
    task = load_task("configs/tasks/clause_review.yaml")
    key = task.by_name["key_term"]
    assert [task.gold_value(key, v) for v in ("Yes", "No", "[]", " 90 days ", "")] == [
        None,
        None,
        None,
        "90 days",
        None,
    ]
    assert task.gold_value(task.by_name["clause_type"], ["Insurance", " "]) == ["Insurance", None]


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ({"name": "a", "kind": "label"}, "needs `labels`"),
        ({"name": "a", "kind": "text", "multi": True}, "for label fields only"),
        ({"name": "a", "kind": "text", "tolerance": 1}, "for number fields"),
    ],
)
def test_field_settings_that_do_not_fit_the_kind_are_refused(tmp_path, field, message):
    path = tmp_path / "t.yaml"
    config = {"name": "t", "system_prompt": "s", "user_template": "{text}", "fields": [field]}
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(
        ConfigError, match=rf"t.yaml: invalid task config:\n  fields.0: .*{message}"
    ):
        load_task(path)
    with pytest.raises(ValueError, match=message):
        TaskField(**field)
