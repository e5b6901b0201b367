"""Raw source files (JSONL, CSV, Parquet): read row by row, mapped onto Temper's records.

Raw files are read by hand rather than with `datasets.load_dataset`: its loaders stop at the
first bad row without naming the file, line and field, and cannot quarantine a row and go on.
Every reader streams (a row, or one Parquet batch, in memory at a time) and yields `(location, row)` where a row
that cannot be read is an `InputError` naming `file:line`, so the caller decides whether to
stop or quarantine it and go on.
"""

from __future__ import annotations

import csv
import json
import re
import string
import unicodedata
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field, field_validator

from ..config import Section
from ..errors import TemperError

if TYPE_CHECKING:
    from ..task import TaskConfig

# The csv module refuses fields over 131,072 characters by default. A clause (or a whole
# document in a text column) can be longer; 2**31 - 1 is the most a C long holds everywhere.
CSV_FIELD_LIMIT = 2**31 - 1
_BOM = b"\xef\xbb\xbf"


class InputError(TemperError, ValueError):
    """A raw record cannot be used; the message names the file, line and field."""


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{where}: undecodable bytes ({err.reason} at byte {err.start})") from None


def iter_rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any] | InputError]]:
    """Rows of one raw file as (location, row or the error that row raised), streamed."""
    for where, _, row in iter_numbered(path):
        yield where, row


def iter_numbered(path: str | Path) -> Iterator[tuple[str, int, dict[str, Any] | InputError]]:
    """(location, record number, row or its error): the number is what a generated id
    (`prepare.fields.id: null`) uses: the JSONL line, the CSV data row (the first row under
    the header is 1), the Parquet row counted from 1."""
    path = Path(path)
    suffix = path.suffix.lower()
    readers = {".jsonl": _jsonl, ".json": _jsonl, ".ndjson": _jsonl, ".csv": _csv}
    if suffix not in (*readers, ".parquet"):
        raise InputError(f"{path}: unsupported format '{suffix}' (use .jsonl, .csv or .parquet)")
    if not path.is_file():
        what = "is not a file" if path.exists() else "file not found"
        raise InputError(f"{path}: {what} (prepare.sources)")
    if suffix == ".parquet":
        yield from _parquet(path)
    else:
        yield from readers[suffix](path)


def _jsonl(path: Path) -> Iterator[tuple[str, int, dict[str, Any] | InputError]]:
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            where = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]  # editors on Windows save UTF-8 with a byte-order mark
            try:
                line = _decode(raw, where)
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(f"{where}: malformed JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise InputError(f"{where}: expected a JSON object")
                yield where, lineno, row
            except InputError as err:
                yield where, lineno, err


def _lines(handle: Iterable[bytes]) -> Iterator[str]:
    """Physical lines decoded one at a time. Undecodable bytes become lone surrogates
    (`surrogateescape`) so the csv parser goes on; the row that holds them is refused after."""
    for lineno, raw in enumerate(handle, 1):
        if lineno == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        yield raw.decode("utf-8", errors="surrogateescape")


def _undecodable(values: list[str]) -> str | None:
    for value in values:
        for index, char in enumerate(value):
            if "\udc80" <= char <= "\udcff":
                return f"byte 0x{ord(char) - 0xDC00:02x} at character {index}"
    return None


def _csv(path: Path) -> Iterator[tuple[str, int, dict[str, Any] | InputError]]:
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    with open(path, "rb") as handle:
        reader = csv.reader(_lines(handle))
        header: list[str] | None = None
        last_line = 0  # a quoted field may span lines: a row starts after the previous one
        # Locations keep the file's true line (the header is line 1: what an editor shows);
        # record numbers, which generated ids use, count data rows from 1 (blank lines skipped).
        number = 0
        while True:
            start = last_line + 1
            where = f"{path}:{start}"
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                last_line = reader.line_num
                number += 1
                yield where, number, InputError(f"{where}: unreadable CSV row ({err})")
                continue
            last_line = reader.line_num
            if header is None:
                if bad := _undecodable(values):
                    raise InputError(f"{where}: undecodable bytes in the CSV header ({bad})")
                header = values
                continue
            if not values:  # a blank line
                continue
            number += 1
            if bad := _undecodable(values):
                yield where, number, InputError(f"{where}: undecodable bytes ({bad})")
            elif len(values) != len(header):
                yield (
                    where,
                    number,
                    InputError(f"{where}: {len(values)} fields, the header has {len(header)}"),
                )
            else:
                yield where, number, dict(zip(header, values, strict=True))


def _parquet(path: Path) -> Iterator[tuple[str, int, dict[str, Any] | InputError]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{path}: not a readable Parquet file ({err})") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield f"{path}:row {index}", index + 1, row
            index += 1


# --------------------------------------------------------------------------- mapping

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}


class FieldMap(Section):
    """Which source column holds what."""

    id: str | None = Field(
        "id",
        description="Record id column (unique); null: ids made from the file name and record "
        "number, `<file>:<n>` (JSONL line; CSV data row, the first under the header is 1).",
    )
    text: str = Field(
        "text",
        description="Column with the text the model reads, or a template over columns, e.g. "
        "'Hypothesis: {hypothesis}\\nExcerpt: {premise}' (a task whose input has several parts).",
    )
    fill: dict[str, str] = Field(
        default_factory=dict,
        description="Text template: what a null or missing column renders as, e.g. "
        "{premise: '(none)'}; a column without a fill must be present.",
    )
    group: str = Field("document_id", description="Document/group column: splits never share one.")
    split: str | None = Field(None, description="Split column to keep, if the source has one.")
    gold: dict[str, str] = Field(
        default_factory=dict, description="Task field -> column with its gold value."
    )
    gold_all: dict[str, str] = Field(
        default_factory=dict,
        description="Task field -> column with a list of all acceptable gold values; a source "
        "without that column uses the field's gold column as its only value (logged, and "
        "counted in the metrics' `fallbacks`).",
    )

    @field_validator("text")
    @classmethod
    def _template_parses(cls, value: str) -> str:
        try:
            template_columns(value)
        except ValueError as err:  # "Single '}' encountered", ...: braces that don't pair
            raise ValueError(
                f"{value!r} is not a valid text template ({err}; write {{{{ for a brace)"
            ) from None
        return value


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str) and value.startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return [value]
    return list(value) if isinstance(value, list | tuple | np.ndarray) else [value]


def is_template(text_field: str) -> bool:
    """Whether `prepare.fields.text` is a template (`{column}` placeholders), not a column."""
    return any(name for _, name, _, _ in string.Formatter().parse(text_field) if name is not None)


def template_columns(text_field: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(text_field) if name]


def render_text(row: dict[str, Any], where: str, fmap: FieldMap) -> str:
    """The text of a template: each `{column}` from the row, nulls from `fmap.fill`."""
    values = {}
    for column in template_columns(fmap.text):
        value = row.get(column)
        if value is None:
            if column not in fmap.fill:
                what = "missing" if column not in row else "null"
                raise InputError(
                    f"{where}: field '{column}' is {what} (used by prepare.fields.text; "
                    f"set prepare.fields.fill.{column} to render it anyway)"
                )
            value = fmap.fill[column]
        elif isinstance(value, list | tuple):
            value = " ".join(str(v) for v in value)
        values[column] = value
    return fmap.text.format_map(values)


def generated_id(where: str, number: int | None) -> str:
    """`<file name>:<record number>` (the location's own line or row when no number is given)."""
    path, _, line = where.rpartition(":")
    return f"{Path(path).name}:{number if number is not None else line.removeprefix('row ')}"


def gold_all_fallbacks(fmap: FieldMap, columns: Collection[str]) -> dict[str, str]:
    """`{missing gold_all column: the same field's gold column}` for a source whose columns
    (a CSV header, a first row) lack a `gold_all` column but hold the single gold one.

    A CSV export often drops the multi-label column (CUAD's `labels`) while its single label
    (`category`) holds the gold: the one label stands in as a one-element list instead of
    every row being refused. A field whose gold column is missing too gets no fallback (its
    rows fail on the missing required field).
    """
    return {
        column: fmap.gold[name]
        for name, column in fmap.gold_all.items()
        if column not in columns and fmap.gold.get(name) in columns
    }


def extract(
    row: dict[str, Any],
    where: str,
    fmap: FieldMap,
    task: TaskConfig,
    keep_split: bool = True,
    number: int | None = None,
    fallback: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Map one raw row onto Temper's record fields; errors name the missing field.

    keep_split=False ignores `fmap.split` (scoring a file whose split column holds anything).
    `number`: the record number of `iter_numbered`, for a generated id (`fmap.id` null).
    `fallback`: the source's `gold_all_fallbacks`; those fields' gold_all is `[gold]`.
    """

    def need(column: str, knob: str, nullable: bool = False) -> Any:
        if column not in row or (row[column] is None and not nullable):
            raise InputError(f"{where}: missing field '{column}' (prepare.fields.{knob})")
        return row[column]

    def check_label(field: Any, column: str, value: Any) -> None:
        if field.kind != "label" or value is None:
            return
        for label in value if isinstance(value, list) else [value]:  # a multi-label field's list
            if label not in field.labels:
                raise InputError(
                    f"{where}: field '{column}': {label!r} is not a label of "
                    f"{task.name}.{field.name}"
                )

    def gold_value(field: Any, column: str, value: Any) -> Any:
        try:
            return task.gold_value(field, value)
        except ValueError as err:  # a number or boolean field's gold that is neither
            raise InputError(f"{where}: field '{column}': {err}") from None

    text = render_text(row, where, fmap) if is_template(fmap.text) else need(fmap.text, "text")
    if not isinstance(text, str):
        raise InputError(f"{where}: field '{fmap.text}' is {type(text).__name__}, not text")
    record: dict[str, Any] = {
        "id": str(need(fmap.id, "id")) if fmap.id is not None else generated_id(where, number),
        "group": str(need(fmap.group, "group")),
        "text": text,
        "where": where,
    }
    if fmap.split and keep_split:
        raw_split = str(need(fmap.split, "split")).strip().lower()
        if raw_split not in SPLIT_ALIASES:
            raise InputError(
                f"{where}: field '{fmap.split}' has unknown split {raw_split!r} "
                f"(expected one of {sorted(set(SPLIT_ALIASES))})"
            )
        record["split"] = SPLIT_ALIASES[raw_split]
    gold, gold_all = {}, {}
    for name, column in fmap.gold.items():
        field = task.by_name.get(name)
        if field is None:
            raise InputError(f"prepare.fields.gold: '{name}' is not a field of task {task.name}")
        gold[name] = gold_value(field, column, need(column, f"gold.{name}", field.nullable))
        check_label(field, column, gold[name])
    for name, column in fmap.gold_all.items():
        field = task.by_name.get(name)
        if field is None:
            raise InputError(
                f"prepare.fields.gold_all: '{name}' is not a field of task {task.name}"
            )
        if column in (fallback or {}):  # the source has no such column: the one gold label
            gold_all[name] = [] if gold.get(name) is None else [gold[name]]
            continue
        values = gold_value(field, column, _as_list(need(column, f"gold_all.{name}")))
        gold_all[name] = [v for v in values if v is not None]
        for value in gold_all[name]:
            check_label(field, column, value)
    record["gold"], record["gold_all"] = gold, gold_all
    return record


# --------------------------------------------------------------------------- cleaning

# NUL is never text (a C string end, a binary file read as text); the zero-width characters
# and the byte-order mark are invisible and only break exact-duplicate matching.
_INVISIBLE = re.compile("[\x00\u200b\u200c\u200d\u2060\ufeff]")
_WHITESPACE = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """Unicode NFC, no NUL or zero-width characters, one space per whitespace run, stripped."""
    text = unicodedata.normalize("NFC", text).replace("\u00a0", " ")
    return _WHITESPACE.sub(" ", _INVISIBLE.sub("", text)).strip()
