"""Typed configuration: `params.yaml` sections load into these models.

Each stage's entry function takes one of these (litgpt style): the YAML mirrors the
function's typed config, and `tests/test_config.py` loads every shipped file into them.
Unknown keys are errors, so a typo in `params.yaml` fails loudly instead of being ignored.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import TemperError

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(TemperError, ValueError):
    """A configuration file is missing, unreadable or does not match its schema."""


class UnreadableParams(ConfigError):
    """The params file or an `-S` override cannot be read: a usage error (exit 2)."""

    exit_code = 2


class Section(BaseModel):
    """Base for every config section: unknown keys are rejected, values validated on set."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


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


def parse_override(item: str) -> Any:
    """One `-S` override parsed by Hydra's grammar, the parser `dvc exp run -S` uses, so a
    value means the same to temper as to DVC: `key=v` sets, `+key=v` adds, `++key=v` adds
    or sets, `~key` deletes; values are Hydra's (`null`, `1e-3`, `[a,b]`, `{k: v}`, quotes)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_override(item)
    except HydraException as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(
            f"override {item!r}: {first} (expected KEY=VALUE, e.g. train.rank=8)"
        ) from None


def parse_value(raw: str) -> Any:
    """A `-S` value as DVC reads it (`5e-4` a float, `[a,b]`, `{k: v}`, `null`, quotes)."""
    return parse_override(f"k={raw}").value()


def override_key(item: str) -> str:
    """The dotted key of an override (`+`, `++`, `~` dropped)."""
    key = item.partition("=")[0].lstrip("~+")
    return key


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """Turn `["train.lr=1e-3", "prepare.max_train_examples=null"]` into a nested dict.

    Temper sets a key whether or not params.yaml has it (DVC wants `+` for a new one);
    deletions (`~key`) are applied by `load_params`.
    """
    nested: dict[str, Any] = {}
    for item in overrides or []:
        parsed = parse_override(item)
        if parsed.is_delete() or "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=1e-3")
        node = nested
        *parents, leaf = parsed.key_or_group.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a mapping")
            node = child
        node[leaf] = parsed.value()
    return nested


def delete_key(params: dict[str, Any], item: str) -> dict[str, Any]:
    """`~a.b`: a copy of `params` without `a.b` (an error if it is not there, as in DVC)."""
    key = override_key(item)
    *parents, leaf = key.split(".")
    out = dict(params)
    node = out
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"override {item!r}: there is no '{key}' to delete")
        node[part] = dict(node[part])
        node = node[part]
    if leaf not in node:
        raise ConfigError(f"override {item!r}: there is no '{key}' to delete")
    del node[leaf]
    return out


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
    try:
        params = read_yaml(path)
        for item in overrides or []:
            # One at a time: `-S a={}` then `-S a.b=1` gives {b: 1}, not the file's `a` plus b.
            if item.startswith("~"):
                params = delete_key(params, item)
            else:
                params = deep_merge(params, parse_overrides([item]))
    except ConfigError as err:
        raise UnreadableParams(str(err)) from None
    return Params(params, str(path), list(overrides or []))


def _origin(dotted: str, overrides: list[str]) -> str | None:
    """The last `-S` override that set `dotted`, a mapping holding it, or a key inside it."""
    for item in reversed(overrides):
        key = override_key(item)
        if key == dotted or dotted.startswith(key + ".") or key.startswith(dotted + "."):
            return f"-S {item}"
    return None


def value_origin(params: dict[str, Any], dotted: str) -> str:
    """Where a resolved value came from: the last `-S` override that set it, the params file
    (the key is in it), or the code's default."""
    found = _origin(dotted, getattr(params, "overrides", []))
    if found:
        return found
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "default"
        node = node[part]
    return str(getattr(params, "source", DEFAULT_PARAMS))


def invalid(err: ValidationError, model: type[Section], params: dict[str, Any]) -> ConfigError:
    """A validation error of the root params model as one message naming each bad field
    (`train.rank`) and where its value came from: the params file or the `-S` override."""
    file = getattr(params, "source", None) or str(DEFAULT_PARAMS)
    overrides = getattr(params, "overrides", [])
    errors = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        dotted = ".".join(loc)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg += _did_you_mean(model, loc)
        errors.append((dotted, _origin(dotted, overrides) or file, msg))
    origins = list(dict.fromkeys(origin for _, origin, _ in errors))
    if len(origins) == 1:
        lines = [f"  {dotted}: {msg}" for dotted, _, msg in errors]
    else:
        lines = [f"  {dotted} ({origin}): {msg}" for dotted, origin, msg in errors]
    header = origins[0] if len(origins) == 1 else f"{file} with -S overrides"
    names = list(dict.fromkeys(dotted.split(".")[0] for dotted, _, _ in errors))
    what = f"'{names[0]}' section" if len(names) == 1 else "sections " + ", ".join(names)
    return ConfigError(f"{header}: invalid {what}:\n" + "\n".join(lines))


def _did_you_mean(model: type[Section], loc: list[str]) -> str:
    """` (did you mean 'learning_rate'?)` for an unknown key: the same name at another depth
    of its section, by its full key (`distil.max_usd` -> `distil.provider.max_usd`), else a
    close spelling or the field whose words' initials it is (`lr` -> `learning_rate`), else a
    close spelling at another depth."""
    section = _nested(model.model_fields.get(loc[0])) if len(loc) > 1 else None
    for part in loc[:-1]:  # walk into nested sections (distil.provider.x)
        model = _nested(model.model_fields.get(part))
        if model is None:
            return ""
    key, names = loc[-1], list(model.model_fields)
    same, near = _elsewhere(loc, section)
    found = same or [repr(n) for n in difflib.get_close_matches(key, names, n=2, cutoff=0.6)]
    if not same:
        found += [repr(n) for n in names if _initials(n) == key and repr(n) not in found]
    found = found or near
    return f" (did you mean {' or '.join(found)}?)" if found else ""


def _nested(field: Any) -> type[Section] | None:
    """The config class of a nested-section field, or None for a plain value."""
    annotation = getattr(field, "annotation", None)
    return annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None


def _initials(name: str) -> str:
    return "".join(w[0] for w in name.split("_"))


def _paths(model: type[Section], prefix: str) -> list[str]:
    """Every field of a section, nested ones included, as dotted keys (`distil.provider.kind`)."""
    out = []
    for name, field in model.model_fields.items():
        nested = _nested(field)
        out += _paths(nested, f"{prefix}{name}.") if nested else [prefix + name]
    return out


def _elsewhere(loc: list[str], section: type[Section] | None) -> tuple[list[str], list[str]]:
    """Keys of the section at another depth than the unknown one (it was put a level too high
    or too low): those with its last part, and those whose last part or whole dotted name is
    a close spelling of it."""
    if section is None:
        return [], []
    parent = ".".join(loc[:-1])
    others = [p for p in _paths(section, loc[0] + ".") if p.rpartition(".")[0] != parent]
    leaves = {p: p.rpartition(".")[2] for p in others}
    same = [p for p, leaf in leaves.items() if leaf == loc[-1]]
    close = difflib.get_close_matches(loc[-1], list(leaves.values()), n=2, cutoff=0.8)
    near = [p for p, leaf in leaves.items() if leaf in close]
    near += difflib.get_close_matches(".".join(loc), others, n=2, cutoff=0.8)
    return same[:3], list(dict.fromkeys(near))[:3]


def _type_name(annotation: Any) -> str:
    name = getattr(annotation, "__name__", None)
    if name and not getattr(annotation, "__args__", None):
        return name
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


def describe(
    model: type[Section],
    prefix: str,
    values: dict[str, Any] | None = None,
    origin: Callable[[str], str] | None = None,
) -> str:
    """A help text listing every field of a config section: name, value, type, meaning.

    Generated from the model itself (nested sections flattened to dotted names), so
    `temper <stage> --help` cannot drift from the code. With `values` (the section as the
    commands resolve it, dumped) a field whose value differs from the code's default shows
    both: `train.layers = 8 (params.yaml; default: None)`, `origin(dotted)` naming the source.
    """
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        dotted = f"{prefix}.{name}"
        if isinstance(annotation, type) and issubclass(annotation, Section):
            nested = (values or {}).get(name) if values is not None else None
            rows.append(describe(annotation, dotted, nested, origin))
            continue
        default_value = (
            None if field.is_required() else field.get_default(call_default_factory=True)
        )
        default = "required" if field.is_required() else repr(default_value)
        shown = default
        if values is not None and name in values:
            value = values[name]
            if field.is_required() or value != _dumped(default_value):
                where = origin(dotted) if origin else "params"
                shown = f"{value!r} ({where}; default: {default})"
        rows.append(f"{dotted} = {shown} ({_type_name(annotation)}): {field.description or ''}")
    return "\n\n".join(rows)


def _dumped(value: Any) -> Any:
    """A default as it appears in a `model_dump(mode="json")` (sections become dicts)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, tuple):
        return list(value)
    return value
