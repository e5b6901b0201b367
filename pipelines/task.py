"""The task config: prompts, output schema and gold fields (`configs/tasks/*.yaml`).

Every stage that talks to a model goes through this module, so the student, the teacher,
the judge and the evaluator agree on one prompt and one answer format.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from .config import ConfigError, Section, read_yaml
from .io import stable_hash


class TaskField(Section):
    """One field of the JSON answer."""

    name: str = Field(description="Key in the JSON answer.")
    kind: Literal["label", "text"] = Field(
        description="label: one of `labels`, scored by accuracy/F1; text: free text, scored by ROUGE."
    )
    description: str = Field("", description="What the field holds (shown to teachers and judges).")
    gold: bool = Field(False, description="Whether the dataset has a gold reference for it.")
    nullable: bool = Field(False, description="Whether null is a valid answer.")
    labels: list[str] = Field(default_factory=list, description="Allowed values (label fields).")
    null_values: list[str] = Field(
        default_factory=list, description="Gold values that mean 'no value' and become null."
    )


class TaskConfig(Section):
    """A task: how to prompt for one record and what a valid answer looks like."""

    name: str = Field(description="Task name.")
    version: int = Field(1, description="Bump when prompts or schema change (cache keys).")
    description: str = Field("", description="One line on what the task is.")
    system_prompt: str = Field(description="System prompt of the student model.")
    user_template: str = Field(description="User message; `{text}` is the record's text.")
    labels_in_student_prompt: bool = Field(
        False, description="Append the label list to the student's system prompt."
    )
    max_new_tokens: int = Field(48, gt=0, description="Generation budget for one answer.")
    fields: list[TaskField] = Field(min_length=1, description="The answer's JSON fields.")

    @cached_property
    def by_name(self) -> dict[str, TaskField]:
        return {f.name: f for f in self.fields}

    @property
    def prompt_hash(self) -> str:
        """Identifies the prompts and schema: recorded on outputs, part of cache keys."""
        return stable_hash(self.model_dump(), length=12)

    def label_list(self) -> str:
        lines = []
        for field in self.fields:
            if field.kind == "label":
                lines.append(f"Allowed values of {field.name}: " + "; ".join(field.labels) + ".")
        return "\n".join(lines)

    def system_message(self, with_labels: bool | None = None) -> str:
        """The system prompt; with the label list for teachers, judges and few-shot baselines."""
        with_labels = self.labels_in_student_prompt if with_labels is None else with_labels
        return f"{self.system_prompt}\n{self.label_list()}" if with_labels else self.system_prompt

    def user_message(self, text: str) -> str:
        return self.user_template.format(text=text)

    def messages(self, text: str, with_labels: bool | None = None) -> list[dict[str, str]]:
        """Chat messages (system + user) asking for the answer to one record."""
        return [
            {"role": "system", "content": self.system_message(with_labels)},
            {"role": "user", "content": self.user_message(text)},
        ]

    def teacher_messages(self, shots: list[dict[str, Any]], text: str) -> list[dict[str, str]]:
        """The teacher's prompt (also the few-shot baselines'): the system prompt with the
        label list, one user/assistant turn per few-shot record, then the record."""
        messages = [{"role": "system", "content": self.system_message(with_labels=True)}]
        for shot in shots:
            messages.append({"role": "user", "content": self.user_message(shot["text"])})
            messages.append(
                {"role": "assistant", "content": self.format_answer(self.gold_answer(shot))}
            )
        messages.append({"role": "user", "content": self.user_message(text)})
        return messages

    def gold_answer(self, record: dict[str, Any]) -> dict[str, Any]:
        """The answer built from a record's gold fields (fields without gold are null)."""
        gold = record.get("gold") or {}
        return {
            f.name: (self.gold_value(f, gold.get(f.name)) if f.gold else None) for f in self.fields
        }

    def json_schema(self) -> dict[str, Any]:
        """JSON Schema of a valid answer (for providers' structured output and for docs)."""
        properties: dict[str, Any] = {}
        for field in self.fields:
            spec: dict[str, Any] = {"type": "string", "description": field.description}
            if field.kind == "label":
                spec["enum"] = list(field.labels) + ([None] if field.nullable else [])
            if field.nullable:
                spec["type"] = ["string", "null"]
            properties[field.name] = spec
        return {
            "type": "object",
            "properties": properties,
            "required": [f.name for f in self.fields],
            "additionalProperties": False,
        }

    def gold_value(self, field: TaskField, value: Any) -> Any:
        """Normalise a raw gold value: blanks and `null_values` become None."""
        if value is None:
            return None
        if isinstance(value, list):
            return [self.gold_value(field, v) for v in value]
        text = str(value).strip()
        return None if not text or text in field.null_values else text

    def validate_answer(self, answer: Any) -> list[str]:
        """Problems with a parsed answer; empty when it matches the schema."""
        if not isinstance(answer, dict):
            return [f"answer is {type(answer).__name__}, expected a JSON object"]
        problems = [f"missing field '{f.name}'" for f in self.fields if f.name not in answer]
        problems += [f"unexpected field '{k}'" for k in answer if k not in self.by_name]
        for field in self.fields:
            if field.name not in answer:
                continue
            value = answer[field.name]
            if value is None:
                if not field.nullable:
                    problems.append(f"field '{field.name}' is null but not nullable")
            elif not isinstance(value, str):
                problems.append(f"field '{field.name}' is {type(value).__name__}, expected string")
            elif field.kind == "label" and value not in field.labels:
                problems.append(f"field '{field.name}': {value!r} is not an allowed label")
        return problems

    def format_answer(self, answer: dict[str, Any]) -> str:
        """The canonical answer text: compact JSON, fields in schema order."""
        ordered = {f.name: answer.get(f.name) for f in self.fields}
        return json.dumps(ordered, ensure_ascii=False)


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def parse_answer(text: str) -> dict[str, Any] | None:
    """The first JSON object in a model's reply, tolerating code fences and chatter.

    Returns None when there is none; never raises (an unparseable reply is scored as wrong).
    """
    if not isinstance(text, str):
        return None
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        for start in (i for i, ch in enumerate(candidate) if ch == "{"):
            try:
                obj, _ = decoder.raw_decode(candidate, start)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def load_task(path: str | Path) -> TaskConfig:
    """Load and validate a task config, with errors that name the file and field."""
    from pydantic import ValidationError

    try:
        return TaskConfig.model_validate(read_yaml(path))
    except ValidationError as err:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{path}: invalid task config:\n" + "\n".join(lines)) from None
