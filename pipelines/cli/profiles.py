"""Profiles as `-S` overrides: a partial params file -> the list that `dvc exp run -S` and
`temper <stage> -S` both read (Hydra's grammar, the one DVC parses `-S` with)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..config import ConfigError, Section, flatten, parse_override, read_yaml

PROFILES_DIR = Path("configs/profiles")

_BARE = re.compile(r"[A-Za-z0-9_./-]+")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def profile_names(directory: Path = PROFILES_DIR) -> str:
    """The profiles in `directory`, for an error message (and why there are none)."""
    names = sorted(p.stem for p in directory.glob("*.yaml"))
    if names:
        return ", ".join(names)
    if directory.is_dir():
        return f"none, {directory} holds no .yaml file"
    return f"none, no folder {directory} here (run temper in the project's root)"


def read_profile(name: str, directory: Path = PROFILES_DIR) -> dict[str, Any]:
    """The profile `directory/NAME.yaml` (a partial params file); a name with no such file is
    an error that lists the profiles there."""
    path = directory / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"no profile {name!r} ({path} not found); profiles: {profile_names(directory)}"
        )
    return read_yaml(path)


def override_value(value: Any, where: str = "") -> str:
    """A value in DVC's `-S` grammar (Hydra's, which temper's `-S` parses too): strings that
    would read as something else are double-quoted, no spaces outside quotes (so that an
    unquoted `$(temper profile x)` splits into whole arguments)."""
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    if isinstance(value, str):
        if "\\" in value or "\n" in value:
            raise ConfigError(f"{where}: a backslash or newline cannot pass through -S; use a file")
        if _BARE.fullmatch(value) and parse_override(f"k={value}").value() == value:
            return value
        return '"' + value.replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ",".join(override_value(v, where) for v in value) + "]"
    if isinstance(value, dict):
        bad = [k for k in value if not _KEY.fullmatch(str(k))]
        if bad:
            raise ConfigError(
                f"{where}: key {bad[0]!r} cannot pass through -S (letters, digits, _)"
            )
        return "{" + ",".join(f"{k}:{override_value(v, where)}" for k, v in value.items()) + "}"
    raise ConfigError(f"{where}: cannot pass a {type(value).__name__} through -S")


def profile_overrides(
    profile: dict[str, Any], params: dict[str, Any], root: type[Section]
) -> list[str]:
    """A profile (a partial params file) as the `-S` list that turns `params` into it.

    `root` is the params model (`TemperParams`). Typed sections merge field by field; any other mapping (gold columns, candidates, caps)
    replaces the one in `params` whole (`~key` then `+key.leaf=...`: DVC would merge it).
    Keys `params` lacks get DVC's `+`. Both `dvc exp run` and temper's `-S` read the result.
    """
    out: list[str] = []

    def walk(values: dict[str, Any], existing: Any, model: Any, prefix: str) -> None:
        for key, value in values.items():
            dotted = f"{prefix}{key}"
            field = model.model_fields.get(key)
            if field is None:
                raise ConfigError(f"{dotted}: not a field of {model.__name__}")
            sub = field.annotation
            is_section = isinstance(sub, type) and issubclass(sub, Section)
            here = isinstance(existing, dict) and key in existing
            if isinstance(value, dict) and is_section:
                walk(value, existing.get(key) if here else {}, sub, dotted + ".")
            elif isinstance(value, dict):
                # Replaced whole: deleted, then added leaf by leaf (`+a.b.c=1`), which keeps
                # braces out of the list (a shell's eval would brace-expand `{b:1,c:2}`).
                out.extend([f"~{dotted}"] if here else [])
                leaves = flatten(value, dotted + ".") if value else {dotted: {}}
                out.extend(f"+{k}={override_value(v, k)}" for k, v in leaves.items())
            else:
                out.append(f"{'' if here else '+'}{dotted}={override_value(value, dotted)}")

    walk(profile, params, root, "")
    return out
