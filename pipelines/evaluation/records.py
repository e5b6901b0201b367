"""The records evaluate scores: a prepared split, or a raw file (`temper evaluate --data`)
mapped and cleaned as the prepare stage does, checked field by field."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..io import read_jsonl
from ..task import TaskConfig
from .config import EvalError

log = logging.getLogger(__name__)


def load_records(path: str | Path, task: TaskConfig, fields: Any = None) -> list[dict[str, Any]]:
    """Test records: prepared format, or raw format mapped through `prepare.fields`."""
    path = Path(path)
    if not path.exists():
        raise EvalError(f"{path}: file not found")
    rows = read_jsonl(path)
    if not rows:
        raise EvalError(f"{path}: no records")
    if "prompt" in rows[0] and "gold" in rows[0]:
        records = rows
    else:  # raw rows: the same mapping and cleaning as the prepare stage
        from ..records.sources import (
            FieldMap,
            InputError,
            extract,
            gold_all_fallbacks,
            iter_rows,
            normalise_text,
        )

        fmap = fields or FieldMap()
        fallback = gold_all_fallbacks(fmap, rows[0])  # as prepare: the first row decides
        if fallback:
            log.warning("%s: no multi-label gold column, single labels used: %s", path, fallback)
        records = []
        for where, row in iter_rows(path):
            if isinstance(row, InputError):
                raise EvalError(str(row))
            try:
                # Any split column value is fine here: the file is scored whole.
                rec = extract(row, where, fmap, task, keep_split=False, fallback=fallback)
            except InputError as err:
                raise EvalError(str(err)) from None
            rec["text"] = normalise_text(rec["text"])
            rec["prompt"] = task.messages(rec["text"])
            records.append(rec)
    for lineno, rec in enumerate(records, 1):
        for key in ("id", "text", "prompt", "gold"):
            if key not in rec:
                raise EvalError(f"{path}:{lineno}: missing field '{key}'")
        for f in task.fields:
            if f.gold and f.name not in rec["gold"]:
                raise EvalError(f"{path}:{lineno}: missing field 'gold.{f.name}'")
    return records
