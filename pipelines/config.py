"""Typed configuration: `params.yaml` sections load into these models.

Each stage's entry function takes one of these (litgpt style): the YAML mirrors the
function's typed config, and `tests/test_config.py` loads every shipped file into them.
Unknown keys are errors, so a typo in `params.yaml` fails loudly instead of being ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or does not match its schema."""


class Section(BaseModel):
    """Base for every config section: unknown keys are rejected, values validated on set."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


S = TypeVar("S", bound=Section)


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: file not found") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """Turn `["train.lr=1e-3", "prepare.max_train_examples=null"]` into a nested dict.

    Values are parsed as YAML scalars, so numbers, booleans and `null` work as on the DVC
    command line (`dvc exp run -S key=value`).
    """
    nested: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=1e-3")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return nested


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Return `base` updated by `extra`, recursing into nested mappings."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_params(
    path: str | os.PathLike[str] = DEFAULT_PARAMS, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Read `params.yaml` and apply `section.key=value` overrides."""
    return deep_merge(read_yaml(path), parse_overrides(overrides))


def section(params: dict[str, Any], name: str, model: type[S], source: str = "params.yaml") -> S:
    """Validate `params[name]` into `model`, with an error that names the file and field."""
    try:
        return model.model_validate(params.get(name) or {})
    except ValidationError as err:
        lines = [f"  {name}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{source}: invalid '{name}' section:\n" + "\n".join(lines)) from None


def _type_name(annotation: Any) -> str:
    name = getattr(annotation, "__name__", None)
    if name and not getattr(annotation, "__args__", None):
        return name
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


def describe(model: type[Section], prefix: str) -> str:
    """A help text listing every field of a config section: name, default, type, meaning.

    Generated from the model itself (nested sections flattened to dotted names), so
    `temper <stage> --help` cannot drift from the code.
    """
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            rows.append(describe(annotation, f"{prefix}.{name}"))
            continue
        if field.is_required():
            default = "required"
        else:
            default = repr(field.get_default(call_default_factory=True))
        rows.append(
            f"{prefix}.{name} = {default} ({_type_name(annotation)}): {field.description or ''}"
        )
    return "\n\n".join(rows)
