"""What identifies a registered version: its data (as DVC recorded it), its evaluation set,
and the compact JSON its tags hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..errors import InvalidInput, MissingInput
from ..io import stable_hash

TAG_LIMIT = 5000  # MLflow tag values: 5000 chars is safe on sqlite and on a server


def tag_json(obj: Any, artifact: str = "temper/eval.json") -> str:
    """Compact JSON for a tag, or a pointer to the artifact when it would not fit (a cut JSON
    string would not parse)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return text if len(text) <= TAG_LIMIT else f"too long for a tag: see artifact {artifact}"


def eval_set_hash(scores: list[dict[str, Any]]) -> str:
    """Identity of an evaluation set: its example ids and gold answers."""
    return stable_hash(sorted((s["id"], json.dumps(s.get("gold"), sort_keys=True)) for s in scores))


def data_hashes(lock_path: str | Path, outs: list[str]) -> dict[str, str]:
    """md5 of the data outputs as DVC recorded them in dvc.lock (`<path>: <md5>`)."""
    path = Path(lock_path)
    if not path.exists():
        raise MissingInput(f"{path}: not found (run the pipeline with `dvc repro`)")
    lock = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    found: dict[str, str] = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") in outs and out.get("md5"):
                found[out["path"]] = out["md5"]
    if not found:
        raise InvalidInput(
            f"{path}: none of {outs} is a recorded output; cannot identify the "
            "data (run `dvc repro` so the lock records them)"
        )
    return dict(sorted(found.items()))
