"""Typed configuration: `params.yaml` sections load into these models.

Each stage's entry function takes one of these (litgpt style): the YAML mirrors the
function's typed config, and `tests/test_config.py` loads every shipped file into them.
Unknown keys are errors, so a typo in `params.yaml` fails loudly instead of being ignored.
"""

from __future__ import annotations

import json
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


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1, "c": {}}}` -> `{"a.b": 1, "a.c": {}}`: the dotted names that `-S`
    overrides and MLflow params use (an empty mapping stays a value, so it can be set)."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


def as_overrides(values: dict[str, Any]) -> list[str]:
    """A nested mapping as `-S` overrides: `{"a": {"b": 1}}` -> `["a.b=1"]` (values as JSON,
    which is YAML, so `parse_overrides` reads them back as they were)."""
    return [f"{key}={json.dumps(value)}" for key, value in flatten(values).items()]


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Return `base` updated by `extra`, recursing into nested mappings.

    An empty mapping in `extra` replaces the value instead of merging nothing into it, so
    `-S prepare.max_examples={}` clears the caps (as `null` does).
    """
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and value and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class Params(dict):
    """The merged params, remembering where they came from (for error messages): the file
    (`source`) and the `-S` overrides applied on top, as given (`overrides`)."""

    def __init__(self, data: dict[str, Any], source: str, overrides: list[str]) -> None:
        super().__init__(data)
        self.source = source
        self.overrides = overrides


def load_params(
    path: str | os.PathLike[str] = DEFAULT_PARAMS, overrides: list[str] | None = None
) -> Params:
    """Read `params.yaml` and apply `section.key=value` overrides, in order."""
    params = read_yaml(path)
    for item in overrides or []:
        # One at a time: `-S a={}` then `-S a.b=1` gives {b: 1}, not the file's `a` plus b.
        params = deep_merge(params, parse_overrides([item]))
    return Params(params, str(path), list(overrides or []))


def _origin(dotted: str, overrides: list[str]) -> str | None:
    """The last `-S` override that set `dotted`, a mapping holding it, or a key inside it."""
    for item in reversed(overrides):
        key = item.partition("=")[0]
        if key == dotted or dotted.startswith(key + ".") or key.startswith(dotted + "."):
            return f"-S {item}"
    return None


def section(params: dict[str, Any], name: str, model: type[S], source: str | None = None) -> S:
    """Validate `params[name]` into `model`, with an error that names the field and where its
    value came from: the params file or the `-S` override (when `params` is a `Params`)."""
    try:
        return model.model_validate(params.get(name) or {})
    except ValidationError as err:
        file = source or getattr(params, "source", None) or str(DEFAULT_PARAMS)
        overrides = getattr(params, "overrides", [])
        errors = []
        for e in err.errors():
            dotted = ".".join([name, *(str(p) for p in e["loc"])])
            errors.append((dotted, _origin(dotted, overrides) or file, e["msg"]))
        origins = list(dict.fromkeys(origin for _, origin, _ in errors))
        if len(origins) == 1:
            lines = [f"  {dotted}: {msg}" for dotted, _, msg in errors]
        else:
            lines = [f"  {dotted} ({origin}): {msg}" for dotted, origin, msg in errors]
        header = origins[0] if len(origins) == 1 else f"{file} with -S overrides"
        raise ConfigError(f"{header}: invalid '{name}' section:\n" + "\n".join(lines)) from None


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
