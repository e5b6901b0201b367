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

from pydantic import Field, model_validator

from .config import ConfigError, Section, read_yaml
from .io import stable_hash

Kind = Literal["label", "text", "number", "boolean", "list"]
_TRUE = {"true", "yes", "y", "1"}
_FALSE = {"false", "no", "n", "0"}


class TaskField(Section):
    """One field of the JSON answer (the kinds: `docs/tasks.md`, "Answer schema: field kinds")."""

    name: str = Field(description="Key in the JSON answer.")
    kind: Kind = Field(
        description="label: one of `labels` (a list of them with `multi`), scored by accuracy/F1; "
        "text: free text, scored by exact match and ROUGE; number: int or float, scored exact and "
        "within `tolerance`; boolean: true/false, scored by accuracy; list: a list of strings, "
        "scored by set F1."
    )
    description: str = Field("", description="What the field holds (shown to teachers and judges).")
    gold: bool = Field(False, description="Whether the dataset has a gold reference for it.")
    nullable: bool = Field(False, description="Whether null is a valid answer.")
    labels: list[str] = Field(default_factory=list, description="Allowed values (label fields).")
    multi: bool = Field(
        False, description="label only: the answer is a list of distinct allowed labels."
    )
    tolerance: float = Field(
        0.0, ge=0, description="number only: absolute tolerance of the within_tolerance metric."
    )
    integer: bool = Field(False, description="number only: the answer must be a whole number.")
    null_values: list[str] = Field(
        default_factory=list, description="Gold values that mean 'no value' and become null."
    )

    @model_validator(mode="after")
    def _fits_kind(self) -> TaskField:
        if self.kind == "label" and not self.labels:
            raise ValueError(f"field {self.name!r}: a label field needs `labels`")
        if self.multi and self.kind != "label":
            raise ValueError(f"field {self.name!r}: `multi` is for label fields only")
        if self.kind != "number" and (self.integer or self.tolerance):
            raise ValueError(f"field {self.name!r}: `integer`/`tolerance` are for number fields")
        return self

    @property
    def is_list(self) -> bool:
        """The answer is a JSON array (list fields and multi-label fields)."""
        return self.kind == "list" or (self.kind == "label" and self.multi)

    def schema(self) -> dict[str, Any]:
        """This field's JSON Schema: the one rule set behind validation and constrained decoding.

        label/text keep the exact shape they always had (it is part of provider cache keys).
        """
        spec: dict[str, Any]
        if self.kind == "label" and not self.multi:
            spec = {"type": "string", "description": self.description}
            spec["enum"] = list(self.labels) + ([None] if self.nullable else [])
        elif self.kind == "label":
            item = {"type": "string", "enum": list(self.labels)}
            # No uniqueItems: llguidance cannot decode it, and answers are scored as sets.
            spec = {"type": "array", "description": self.description, "items": item}
        elif self.kind == "list":
            spec = {"type": "array", "description": self.description, "items": {"type": "string"}}
        elif self.kind == "number":
            spec = {"type": "integer" if self.integer else "number"}
            spec["description"] = self.description
        else:  # text, boolean
            spec = {"type": "string" if self.kind == "text" else "boolean"}
            spec["description"] = self.description
        if self.nullable:
            spec["type"] = [spec["type"], "null"]
        return spec

    def gold_value(self, value: Any) -> Any:
        """A raw gold value in this field's answer type; blanks and `null_values` become None.

        Raises ValueError when the value cannot be read as the field's kind.
        """
        if value is None:
            return None
        if self.is_list:
            items = _as_items(value, self.null_values)
            return None if items is None else [str(v).strip() for v in items]
        if isinstance(value, str):
            text = value.strip()
            if not text or text in self.null_values:
                return None
            value = text
        elif str(value) in self.null_values:
            return None
        if self.kind == "number":
            if isinstance(value, bool):
                raise ValueError(f"{value!r} is not a number")
            return float(value)  # "3", 3, "3.5" -> 3.0, 3.0, 3.5 (ValueError names a bad one)
        if self.kind == "boolean":
            if isinstance(value, bool):
                return value
            word = str(value).strip().lower()
            if word in _TRUE | _FALSE:
                return word in _TRUE
            raise ValueError(f"{value!r} is not a boolean (true/false, yes/no, 1/0)")
        return str(value)


def _as_items(value: Any, null_values: list[str]) -> list[Any] | None:
    """A list gold value: a list, a JSON array text, or one item; blank/null value -> None."""
    if isinstance(value, str):
        text = value.strip()
        if not text or text in null_values:
            return None
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{text[:60]!r} is not a JSON list: {err.msg}") from None
        else:
            value = [text]
    if not isinstance(value, list | tuple):
        value = list(value) if hasattr(value, "tolist") else [value]
    return [v for v in value if v is not None and str(v).strip()]


# Task settings added after the first format, with their defaults (see `prompt_hash`).
_LATER: dict[str, dict[str, Any]] = {
    "task": {"answer": "json"},
    "field": {"multi": False, "tolerance": 0.0, "integer": False},
}


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
    answer: Literal["json", "text"] = Field(
        "json",
        description="json: the answer is a JSON object with `fields`; text: free text (a chat "
        "fine-tune's replies), held in one text field (default: `answer`), scored by exact "
        "match and ROUGE; no JSON schema is sent to models or enforced in decoding.",
    )
    fields: list[TaskField] = Field(min_length=1, description="The answer's JSON fields.")
    judge_prompt: str | None = Field(
        None,
        description="The judge's system prompt (null: one written from `description` and the "
        "fields' descriptions; see temper.evaluation.judge).",
    )

    @model_validator(mode="before")
    @classmethod
    def _text_answer_field(cls, data: Any) -> Any:
        """A text task without `fields` gets its one field: `answer`, text, with gold."""
        if isinstance(data, dict) and data.get("answer") == "text" and not data.get("fields"):
            data = {**data, "fields": [{"name": "answer", "kind": "text", "gold": True}]}
        return data

    @model_validator(mode="after")
    def _text_has_one_field(self) -> TaskConfig:
        if self.answer == "text" and (len(self.fields) != 1 or self.fields[0].kind != "text"):
            raise ValueError("answer: text needs exactly one field, of kind text (or no fields)")
        return self

    @property
    def is_text(self) -> bool:
        """The answer is free text, not a JSON object (`answer: text`)."""
        return self.answer == "text"

    def answer_schema(self) -> dict[str, Any] | None:
        """The schema sent to models (structured output, constrained decoding); None for a
        text task, whose reply is prose that no JSON schema describes."""
        return None if self.is_text else self.json_schema()

    def parse(self, text: str | None) -> dict[str, Any] | None:
        """A reply as an answer dict: the JSON object in it, or for a text task the stripped
        text in its one field. None when there is none (no JSON object; an empty reply)."""
        if not self.is_text:
            return parse_answer(text) if text is not None else None
        if not isinstance(text, str) or not text.strip():
            return None
        return {self.fields[0].name: text.strip()}

    @cached_property
    def by_name(self) -> dict[str, TaskField]:
        return {f.name: f for f in self.fields}

    @property
    def prompt_hash(self) -> str:
        """Identifies the prompts and schema: recorded on outputs, part of cache keys.

        Settings added after version 1 of this format (`_LATER`) count only when set, so a
        task that does not use them keeps its hash (and every cache entry made under it).
        """
        # The judge's prompt is not the student's or the teacher's: the judge keys its own
        # cache on it (temper.evaluation.judge), so changing it re-asks only the judge.
        dump = self.model_dump(exclude={"judge_prompt"})
        for key, default in _LATER["task"].items():
            if dump.get(key) == default:
                dump.pop(key)
        for field in dump["fields"]:
            for key, default in _LATER["field"].items():
                if field.get(key) == default:
                    field.pop(key)
        return stable_hash(dump, length=12)

    def label_field(self) -> str | None:
        """The first single-label field with gold: what splits are stratified by."""
        return next(
            (f.name for f in self.fields if f.kind == "label" and not f.multi and f.gold), None
        )

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
        """JSON Schema of a valid answer: providers' structured output, `validate_answer` and
        constrained decoding all use this one definition."""
        return {
            "type": "object",
            "properties": {f.name: f.schema() for f in self.fields},
            "required": [f.name for f in self.fields],
            "additionalProperties": False,
        }

    def gold_value(self, field: TaskField, value: Any) -> Any:
        """Normalise a raw gold value to the field's answer type (None for blanks and
        `null_values`). For a single-valued field a list is a list of alternatives (`gold_all`),
        each normalised; for list and multi-label fields a list is the value itself."""
        if isinstance(value, list) and not field.is_list:
            return [field.gold_value(v) for v in value]
        return field.gold_value(value)

    @cached_property
    def _validator(self) -> Any:
        import jsonschema

        schema = self.json_schema()
        jsonschema.Draft202012Validator.check_schema(schema)
        return jsonschema.Draft202012Validator(schema)

    def validate_answer(self, answer: Any) -> list[str]:
        """Problems with a parsed answer (checked against `json_schema()`); empty when valid.

        Each message names the field, so a teacher's repair prompt can say what to fix.
        """
        errors = sorted(self._validator.iter_errors(answer), key=lambda e: list(e.path))
        # A value of the wrong type also fails its enum/items rules: report the type alone.
        typed = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
        errors = [e for e in errors if e.validator == "type" or tuple(e.absolute_path) not in typed]
        return [_problem(e, answer) for e in errors]

    def format_answer(self, answer: dict[str, Any]) -> str:
        """The canonical answer text: compact JSON, fields in schema order (a text task: the
        text itself)."""
        if self.is_text:
            value = answer.get(self.fields[0].name)
            return "" if value is None else str(value)
        ordered = {f.name: answer.get(f.name) for f in self.fields}
        return json.dumps(ordered, ensure_ascii=False)


_JSON_TYPES = {
    "string": "string",
    "number": "number",
    "integer": "integer",
    "boolean": "boolean",
    "array": "list",
    "object": "JSON object",
    "null": "null",
}


def _json_type(value: Any) -> str:
    """The JSON name of a Python value's type, as a message shows it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return (
        "list"
        if isinstance(value, list)
        else "JSON object"
        if isinstance(value, dict)
        else type(value).__name__
    )


def _problem(error: Any, answer: Any) -> str:
    """One jsonschema error as a message that names the field (and item) it is about."""
    path = list(error.absolute_path)
    if not path:
        if error.validator == "type":
            return f"answer is {_json_type(answer)}, expected a JSON object"
        if error.validator == "required":
            return f"missing field '{error.message.split(chr(39))[1]}'"
        if error.validator == "additionalProperties":
            extra = sorted(k for k in answer if k not in error.schema.get("properties", {}))
            return "; ".join(f"unexpected field '{k}'" for k in extra)
        return f"answer: {error.message}"
    where = f"field '{path[0]}'" + "".join(f" item {p}" for p in path[1:])
    value = error.instance
    if error.validator == "type":
        wanted = error.validator_value
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
        if value is None:
            return f"{where} is null but not nullable"
        names = " or ".join(_JSON_TYPES.get(w, w) for w in wanted if w != "null")
        return f"{where} is {_json_type(value)}, expected {names}"
    if error.validator == "enum":
        return f"{where}: {value!r} is not an allowed label"
    return f"{where}: {error.message}"


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
