"""`temper predict`: a model's answers to unlabelled records (JSONL, CSV or Parquet).

Each record needs a non-empty string in the text field (`--text-field`, default `text`); its id
is its `id` field when it has one, else its line number (JSONL, CSV: the line where the record
ends) or its row number (Parquet, from 1). A bad record (not valid JSON, not an object, no text
field, empty or non-string text) is an error naming `file:line: field`; with `on_error="skip"`
it is left out and counted instead. The answers are generated in sorted batches by
`generation.generate` (the same loop as evaluation) and written atomically, one JSON line per
record: id, the parsed answer, the raw output, whether it fits the task's schema (and its
problems), and the label confidences of `evaluation.confidence`. A summary JSON
(`<out stem>.summary.json`) beside the output holds the counts, including what was skipped.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Literal

from ..bundle import Bundle
from ..errors import TemperError
from ..io import write_json, write_jsonl
from .confidence import label_confidences
from .scoring import answer_fields

log = logging.getLogger(__name__)

FORMATS = (".jsonl", ".csv", ".parquet")
OnError = Literal["fail", "skip"]


class PredictInputError(TemperError, ValueError):
    """A bad input record; the message names the file, line and field."""


def _rows(path: Path) -> Any:
    """(line or row number, parsed record or an error message) for each record of the file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue  # blank lines (a trailing newline) are not records
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as err:
                    yield lineno, f"invalid JSON: {err.msg}"
    elif suffix == ".csv":
        csv.field_size_limit(sys.maxsize)  # clauses can pass csv's 131,072-character default
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                yield reader.line_num, row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for n, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield n, row
    else:
        raise PredictInputError(
            f"{path}: unknown input format {path.suffix!r} (use one of {FORMATS})"
        )


def read_records(
    path: str | Path, text_field: str = "text", on_error: OnError = "fail"
) -> tuple[list[dict[str, Any]], list[str]]:
    """[{id, text}] of the valid records and the problems of the skipped ones."""
    path = Path(path)
    if not path.exists():
        raise PredictInputError(f"{path}: input file not found")
    records, skipped = [], []
    for n, row in _rows(path):
        if isinstance(row, str):
            problem = f"{path}:{n}: {row}"
        elif not isinstance(row, dict):
            problem = f"{path}:{n}: expected a JSON object, got {type(row).__name__}"
        elif text_field not in row or row[text_field] is None:
            problem = f"{path}:{n}: {text_field}: missing"
        elif not isinstance(row[text_field], str):
            problem = f"{path}:{n}: {text_field}: {type(row[text_field]).__name__}, not text"
        elif not row[text_field].strip():
            problem = f"{path}:{n}: {text_field}: empty text"
        else:
            rid = row.get("id")
            records.append({"id": str(n) if rid in (None, "") else rid, "text": row[text_field]})
            continue
        if on_error == "fail":
            raise PredictInputError(problem + " (use --on-error skip to leave such records out)")
        skipped.append(problem)
    return records, skipped


def summary_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.summary.json")


def answer_texts(
    bundle: Bundle, texts: list[str], batch_size: int = 16, progress: bool = True
) -> list[dict[str, Any]]:
    """The bundle's answers to `texts`, as evaluated: parsed answer, raw output, schema
    validity and problems, label confidences, generated tokens (one dict per text)."""
    from .generation import generate

    if not texts:
        return []
    task, gen, tokenizer = bundle.task, bundle.generation, bundle.tokenizer
    gens = generate(
        bundle.model,
        tokenizer,
        [task.messages(t) for t in texts],
        gen.max_new_tokens,
        batch_size,
        stop_at_json=gen.stop_at_json and not task.is_text,
        progress=progress,
        desc="predict",
        schema=task.answer_schema() if gen.constrained else None,
        token_scores=True,
    )
    rows = []
    for g in gens:
        parsed = answer_fields(task, g.text)
        rows.append(
            {
                "answer": parsed["answer"],
                "output": g.text,
                "schema_valid": parsed["valid"],
                "problems": parsed["problems"],
                "confidence": label_confidences(
                    task, tokenizer, g.token_ids or [], g.token_logprobs or [], parsed["answer"]
                ),
                "new_tokens": g.new_tokens,
            }
        )
    return rows


def predict(
    bundle: Bundle,
    input_path: str | Path,
    out: str | Path,
    text_field: str = "text",
    batch_size: int = 16,
    on_error: OnError = "fail",
    progress: bool = True,
) -> dict[str, Any]:
    """Answer every record of `input_path` into `out` (JSONL); returns the summary."""
    records, skipped = read_records(input_path, text_field, on_error)
    for problem in skipped[:5]:
        log.warning("skipped %s", problem)
    t0 = time.perf_counter()
    rows = [
        {"id": rec["id"], **row}
        for rec, row in zip(
            records,
            answer_texts(bundle, [r["text"] for r in records], batch_size, progress),
            strict=True,
        )
    ]
    seconds = time.perf_counter() - t0
    write_jsonl(out, rows)
    summary = {
        "input": str(input_path),
        "output": str(out),
        "text_field": text_field,
        "predicted": len(rows),
        "skipped": len(skipped),
        "skipped_records": skipped[:100],
        "schema_valid": sum(r["schema_valid"] for r in rows),
        "seconds": round(seconds, 2),
        "task": bundle.task.name,
        "model": (bundle.manifest.registry if bundle.manifest else None) or str(bundle.path),
    }
    write_json(summary_path(out), summary)
    return summary
