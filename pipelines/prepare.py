"""Stage prepare: raw domain records -> clean, de-duplicated, leak-free chat-format splits.

Steps: read (JSONL / CSV / Parquet through a field mapping) -> normalise -> drop empties ->
remove exact duplicates -> split by document -> report near-duplicates -> filter by token
length -> sample the size profile -> render prompts through the task config -> write
`<out_dir>/{train,validation,test}.jsonl` and the stats file, atomically.

Raw files are read by hand rather than with `datasets.load_dataset`: its loaders stop at the
first bad row without naming the file, line and field, and cannot quarantine a row and go on.
The prepared JSONL is what the later stages load with `datasets`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import re
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from .config import Section
from .io import sha256_file, write_json, write_jsonl
from .task import TaskConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}


class InputError(ValueError):
    """A raw record cannot be used; the message names the file, line and field."""


class FieldMap(Section):
    """Which source column holds what."""

    id: str = Field("id", description="Record id column (unique).")
    text: str = Field("text", description="Column with the text the model reads.")
    group: str = Field("document_id", description="Document/group column: splits never share one.")
    split: str | None = Field(None, description="Split column to keep, if the source has one.")
    gold: dict[str, str] = Field(
        default_factory=dict, description="Task field -> column with its gold value."
    )
    gold_all: dict[str, str] = Field(
        default_factory=dict,
        description="Task field -> column with a list of all acceptable gold values.",
    )


class SplitConfig(Section):
    """Deterministic hash split by group, used when the source has no split column."""

    salt: str = Field("temper-split-v1", description="Salt of the group hash.")
    validation: float = Field(0.1, ge=0, lt=1, description="Fraction of groups for validation.")
    test: float = Field(0.1, ge=0, lt=1, description="Fraction of groups for test.")


class NearDupConfig(Section):
    """Near-duplicate detection (MinHash over word 3-grams, verified by exact Jaccard)."""

    threshold: float = Field(0.8, gt=0, le=1, description="Word-3-gram Jaccard that counts.")
    num_perm: int = Field(64, gt=0, description="MinHash permutations.")
    drop_cross_split: bool = Field(
        False, description="Drop the train side of near-duplicate pairs that cross splits."
    )


class PrepareConfig(Section):
    """`prepare:` in params.yaml."""

    sources: list[str] = Field(description="Raw files (.jsonl, .csv or .parquet).")
    fields: FieldMap = Field(default_factory=FieldMap, description="Source column mapping.")
    out_dir: str = Field("data/prepared", description="Folder for the split files.")
    metrics: str = Field("metrics/prepare.json", description="Stats file (DVC metrics).")
    on_error: Literal["fail", "quarantine"] = Field(
        "fail", description="fail: stop at a bad record; quarantine: count it and go on."
    )
    split: SplitConfig = Field(default_factory=SplitConfig, description="Hash split settings.")
    near_dup: NearDupConfig = Field(default_factory=NearDupConfig, description="Near-dups.")
    min_text_tokens: int = Field(
        4, ge=0, description="Drop records whose text alone is shorter than this (tokens)."
    )
    max_tokens: int = Field(
        512, gt=0, description="Drop records whose whole chat sequence (prompt + answer) is longer."
    )
    max_examples: dict[str, int | None] = Field(
        default_factory=dict,
        description="Per-split cap, sampled stratified by the first label field (null = all).",
    )
    seed: int = Field(0, description="Seed of the stratified sampling.")


# --------------------------------------------------------------------------- reading


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{where}: undecodable bytes ({err.reason} at byte {err.start})") from None


def read_rows(path: Path) -> list[tuple[str, dict[str, Any] | InputError]]:
    """Rows of one raw file as (location, row or the error that row raised)."""
    suffix = path.suffix.lower()
    rows: list[tuple[str, dict[str, Any] | InputError]] = []
    if suffix in (".jsonl", ".json", ".ndjson"):
        with open(path, "rb") as handle:
            for lineno, raw in enumerate(handle, 1):
                where = f"{path}:{lineno}"
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
                    rows.append((where, row))
                except InputError as err:
                    rows.append((where, err))
    elif suffix == ".csv":
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            line = path.read_bytes()[: err.start].count(b"\n") + 1
            raise InputError(f"{path}:{line}: undecodable bytes ({err.reason})") from None
        reader = csv.DictReader(text.splitlines(keepends=True))
        for row in reader:
            rows.append((f"{path}:{reader.line_num}", dict(row)))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for index, row in enumerate(pq.read_table(path).to_pylist()):
            rows.append((f"{path}:row {index}", row))
    else:
        raise InputError(f"{path}: unsupported format '{suffix}' (use .jsonl, .csv or .parquet)")
    return rows


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str) and value.startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return [value]
    return list(value) if isinstance(value, list | tuple | np.ndarray) else [value]


def extract(row: dict[str, Any], where: str, fmap: FieldMap, task: TaskConfig) -> dict[str, Any]:
    """Map one raw row onto Temper's record fields; errors name the missing field."""

    def need(column: str, knob: str, nullable: bool = False) -> Any:
        if column not in row or (row[column] is None and not nullable):
            raise InputError(f"{where}: missing field '{column}' (prepare.fields.{knob})")
        return row[column]

    text = need(fmap.text, "text")
    if not isinstance(text, str):
        raise InputError(f"{where}: field '{fmap.text}' is {type(text).__name__}, not text")
    record: dict[str, Any] = {
        "id": str(need(fmap.id, "id")),
        "group": str(need(fmap.group, "group")),
        "text": text,
        "where": where,
    }
    if fmap.split:
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
        gold[name] = task.gold_value(field, need(column, f"gold.{name}", field.nullable))
        if field.kind == "label" and gold[name] is not None and gold[name] not in field.labels:
            raise InputError(
                f"{where}: field '{column}': {gold[name]!r} is not a label of {task.name}.{name}"
            )
    for name, column in fmap.gold_all.items():
        field = task.by_name[name]
        gold_all[name] = [
            v for v in task.gold_value(field, _as_list(need(column, "gold_all"))) if v is not None
        ]
    record["gold"], record["gold_all"] = gold, gold_all
    return record


# --------------------------------------------------------------------------- cleaning

_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
_WHITESPACE = re.compile(r"\s+")
_TOKEN = re.compile(r"[^\W_]+")


def normalise_text(text: str) -> str:
    """Unicode NFC, no zero-width characters, one space for every whitespace run, stripped."""
    text = unicodedata.normalize("NFC", text).replace("\u00a0", " ")
    return _WHITESPACE.sub(" ", _ZERO_WIDTH.sub("", text)).strip()


def dedup_key(text: str) -> str:
    """Exact-duplicate key: lower-cased alphanumeric tokens (case, punctuation don't count)."""
    return " ".join(_TOKEN.findall(text.casefold()))


def shingles(text: str, n: int = 3) -> set[str]:
    words = dedup_key(text).split()
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def near_duplicate_pairs(
    texts: list[str], threshold: float = 0.8, num_perm: int = 64
) -> list[tuple[int, int, float]]:
    """Index pairs whose word-3-gram Jaccard is >= threshold (MinHash LSH, then verified)."""
    from datasketch import MinHash, MinHashLSH

    sets = [shingles(t) for t in texts]
    # LSH is probabilistic: query at a lower threshold for recall, then keep only the pairs
    # whose exact Jaccard reaches `threshold` (precision).
    lsh = MinHashLSH(threshold=max(0.05, threshold - 0.2), num_perm=num_perm)
    hashes = MinHash.bulk([[s.encode() for s in sh] for sh in sets], num_perm=num_perm)
    pairs = []
    for i, mh in enumerate(hashes):
        if not sets[i]:
            continue
        for j in lsh.query(mh):
            jac = len(sets[i] & sets[j]) / len(sets[i] | sets[j])
            if jac >= threshold:
                pairs.append((j, i, round(jac, 4)))
        lsh.insert(i, mh)
    return sorted(pairs)


def hash_split(group: str, cfg: SplitConfig) -> str:
    """Deterministic split of a group: the same group always lands in the same split."""
    bucket = int(hashlib.sha256(f"{cfg.salt}|{group}".encode()).hexdigest()[:12], 16) % 10_000
    if bucket < cfg.test * 10_000:
        return "test"
    if bucket < (cfg.test + cfg.validation) * 10_000:
        return "validation"
    return "train"


def assign_splits(records: list[dict[str, Any]], cfg: SplitConfig) -> None:
    """Give every record a split by its group; a source split column is kept but checked.

    Raises InputError when the source's own split puts one group in two splits (leakage).
    """
    seen: dict[str, set[str]] = defaultdict(set)
    for record in records:
        if "split" not in record:
            record["split"] = hash_split(record["group"], cfg)
        seen[record["group"]].add(record["split"])
    leaks = {g: sorted(s) for g, s in seen.items() if len(s) > 1}
    if leaks:
        sample = ", ".join(f"{g!r} in {s}" for g, s in list(leaks.items())[:5])
        raise InputError(f"{len(leaks)} document group(s) occur in more than one split: {sample}")


def stratified_sample(
    records: list[dict[str, Any]], limit: int | None, key: str | None, seed: int
) -> list[dict[str, Any]]:
    """Up to `limit` records, every label kept in proportion (at least one each), seeded."""
    if limit is None or len(records) <= limit:
        return records
    rng = random.Random(seed)
    by_label: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_label[record["gold"].get(key) if key else None].append(record)
    share = {label: limit * len(rs) / len(records) for label, rs in by_label.items()}
    quota = {label: max(1, int(x)) for label, x in share.items()}
    # Largest remainders fill what flooring left; trimming the largest fixes any overshoot
    # from giving every label at least one record.
    for label in sorted(share, key=lambda k: (quota[k] - share[k], str(k))):
        if sum(quota.values()) >= limit:
            break
        quota[label] += 1
    while sum(quota.values()) > limit:
        quota[max(quota, key=quota.get)] -= 1
    chosen = []
    for label in sorted(by_label, key=str):
        group = sorted(by_label[label], key=lambda r: r["id"])
        chosen += rng.sample(group, quota[label])
    return sorted(chosen, key=lambda r: r["id"])


def percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    q = np.percentile(values, [50, 90, 99])
    return {
        "min": int(min(values)),
        "p50": float(q[0]),
        "p90": float(q[1]),
        "p99": float(q[2]),
        "max": int(max(values)),
    }


# --------------------------------------------------------------------------- the stage


def run(cfg: PrepareConfig, task: TaskConfig, model_dir: str | Path) -> dict[str, Any]:
    """Run the prepare stage; returns the stats that are also written to `cfg.metrics`."""
    from transformers import AutoTokenizer

    quarantined: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []

    def bad(err: InputError, where: str) -> None:
        if cfg.on_error == "fail":
            raise err
        quarantined.append({"where": where, "reason": str(err)})

    n_read = 0
    for source in cfg.sources:
        for where, row in read_rows(Path(source)):
            n_read += 1
            if isinstance(row, InputError):
                bad(row, where)
                continue
            try:
                record = extract(row, where, cfg.fields, task)
            except InputError as err:
                bad(err, where)
                continue
            record["text"] = normalise_text(record["text"])
            if not record["text"]:
                dropped.append({"id": record["id"], "where": where, "reason": "empty"})
                continue
            records.append(record)

    ids = Counter(r["id"] for r in records)
    if dupes := [i for i, n in ids.items() if n > 1]:
        raise InputError(f"{len(dupes)} record id(s) occur more than once, e.g. {dupes[:3]}")

    assign_splits(records, cfg.split)

    # Exact duplicates: keep one copy, preferring the evaluation splits so that a duplicate
    # never sits in train while its twin is scored in test.
    priority = {"test": 0, "validation": 1, "train": 2}
    kept: dict[str, dict[str, Any]] = {}
    for record in sorted(records, key=lambda r: (priority[r["split"]], r["where"])):
        key = dedup_key(record["text"])
        if key in kept:
            dropped.append(
                {
                    "id": record["id"],
                    "where": record["where"],
                    "reason": "duplicate",
                    "duplicate_of": kept[key]["id"],
                }
            )
        else:
            kept[key] = record
    records = sorted(kept.values(), key=lambda r: r["where"])

    pairs = near_duplicate_pairs(
        [r["text"] for r in records], cfg.near_dup.threshold, cfg.near_dup.num_perm
    )
    cross = [(i, j, s) for i, j, s in pairs if records[i]["split"] != records[j]["split"]]
    near_dup_stats = {
        "pairs": len(pairs),
        "cross_split_pairs": len(cross),
        "threshold": cfg.near_dup.threshold,
        "cross_split_examples": [
            {
                "a": records[i]["id"],
                "b": records[j]["id"],
                "splits": [records[i]["split"], records[j]["split"]],
                "jaccard": s,
            }
            for i, j, s in cross[:10]
        ],
    }
    if cfg.near_dup.drop_cross_split:
        drop = {
            i if records[i]["split"] == "train" else j
            for i, j, _ in cross
            if "train" in (records[i]["split"], records[j]["split"])
        }
        for i in sorted(drop):
            dropped.append(
                {
                    "id": records[i]["id"],
                    "where": records[i]["where"],
                    "reason": "near_duplicate_cross_split",
                }
            )
        records = [r for i, r in enumerate(records) if i not in drop]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rendered = [
        tokenizer.apply_chat_template(
            task.messages(r["text"])
            + [{"role": "assistant", "content": task.format_answer(r["gold"])}],
            tokenize=False,
        )
        for r in records
    ]
    lengths = [len(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    text_lengths = [
        len(ids)
        for ids in tokenizer([r["text"] for r in records], add_special_tokens=False)["input_ids"]
    ]
    length_ok = []
    for record, n_tokens, n_text in zip(records, lengths, text_lengths, strict=True):
        record["n_tokens"] = n_tokens
        if n_text < cfg.min_text_tokens or n_tokens > cfg.max_tokens:
            reason = "too_short" if n_text < cfg.min_text_tokens else "too_long"
            dropped.append(
                {
                    "id": record["id"],
                    "where": record["where"],
                    "reason": reason,
                    "n_tokens": n_tokens,
                    "n_text_tokens": n_text,
                }
            )
        else:
            length_ok.append(record)

    label_field = next((f.name for f in task.fields if f.kind == "label" and f.gold), None)
    out_dir = Path(cfg.out_dir)
    stats: dict[str, Any] = {"splits": {}}
    for split in SPLITS:
        pool = [r for r in length_ok if r["split"] == split]
        chosen = stratified_sample(pool, cfg.max_examples.get(split), label_field, cfg.seed)
        rows = [
            {
                "id": r["id"],
                "group": r["group"],
                "split": split,
                "text": r["text"],
                "prompt": task.messages(r["text"]),
                "gold": r["gold"],
                "gold_all": r["gold_all"],
                "n_tokens": r["n_tokens"],
            }
            for r in chosen
        ]
        write_jsonl(out_dir / f"{split}.jsonl", rows)
        stats["splits"][split] = {
            "records": len(rows),
            "available": len(pool),
            "groups": len({r["group"] for r in rows}),
            "tokens": percentiles([r["n_tokens"] for r in rows]),
            "labels": dict(
                sorted(
                    Counter(r["gold"].get(label_field) for r in rows).items(),
                    key=lambda kv: str(kv[0]),
                )
            )
            if label_field
            else {},
        }
    write_jsonl(out_dir / "quarantine.jsonl", quarantined)
    write_jsonl(out_dir / "dropped.jsonl", dropped)

    stats.update(
        {
            "task": {"name": task.name, "version": task.version, "prompt_hash": task.prompt_hash},
            "sources": {s: sha256_file(s) for s in cfg.sources},
            "read": n_read,
            "quarantined": {
                "total": len(quarantined),
                "reasons": dict(Counter(_reason(q["reason"]) for q in quarantined)),
            },
            "dropped": dict(Counter(d["reason"] for d in dropped)),
            "near_duplicates": near_dup_stats,
        }
    )
    write_json(cfg.metrics, stats)
    log.info("prepare: %s", {s: v["records"] for s, v in stats["splits"].items()})
    return stats


def _reason(message: str) -> str:
    """The kind of a quarantine message, without its file/line prefix (for counting)."""
    kind = message.split(": ", 1)[-1]
    return re.sub(r"'[^']*'|\(.*\)|\d+", "…", kind).strip()
