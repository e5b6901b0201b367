"""Constrained decoding with the real base model: every answer fits the task's JSON schema."""

from __future__ import annotations

import pytest

from temper.evaluation.constrained import _in_string
from temper.task import TaskConfig, parse_answer

CLAUSES = [
    "This Agreement shall be governed by the laws of the State of New York.",
    "Either party may terminate this Agreement upon ninety (90) days written notice.",
    "Licensee shall maintain general liability insurance of at least $1,000,000.",
]


def test_string_state_follows_escapes():
    assert _in_string('{"a": "b') and not _in_string('{"a": "b"')
    assert _in_string('{"a": "b\\"') and not _in_string('{"a": "b\\\\"')


def answers(model, tokenizer, task, schema, n_tokens=40):
    from temper.evaluation.generation import generate

    prompts = [task.messages(c) for c in CLAUSES]
    gens = generate(model, tokenizer, prompts, n_tokens, 3, progress=False, schema=schema)
    return [g.text for g in gens]


@pytest.fixture(scope="module")
def model(base_model_dir):
    import torch

    from temper.evaluation.generation import load_model

    torch.set_num_threads(1)
    return load_model(base_model_dir)


def problems(task, text):
    answer = parse_answer(text)
    return task.validate_answer(answer) if answer is not None else ["no JSON"]


@pytest.mark.slow
def test_constrained_answers_all_fit_the_schema_and_free_ones_do_not(model, task):
    free = answers(*model, task, None)
    fitted = answers(*model, task, task.json_schema())
    # Measured: the untrained base model invents labels ("Clause") and runs out of budget.
    assert sum(not problems(task, t) for t in free) < len(free)
    assert all(not problems(task, t) for t in fitted), fitted
    assert all(t.startswith('{"clause_type": "') for t in fitted)  # the canonical format


@pytest.mark.slow
def test_every_field_kind_is_decoded_to_a_valid_answer(model):
    task = TaskConfig(
        name="t",
        system_prompt="Read the clause and reply with JSON.",
        user_template="Clause:\n{text}",
        fields=[
            {"name": "amount", "kind": "number"},
            {"name": "days", "kind": "number", "integer": True, "nullable": True},
            {"name": "parties", "kind": "list"},
            {"name": "tags", "kind": "label", "multi": True, "labels": ["law", "money", "time"]},
            {"name": "urgent", "kind": "boolean"},
            {"name": "summary", "kind": "text"},
        ],
    )
    fitted = answers(*model, task, task.json_schema(), n_tokens=48)
    assert all(not problems(task, t) for t in fitted), fitted
