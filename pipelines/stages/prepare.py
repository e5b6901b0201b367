"""Stage prepare: raw domain records -> clean, de-duplicated, leak-free chat-format splits.

Steps: read (JSONL / CSV / Parquet through a field mapping, streamed: `sources.py`) ->
normalise -> check ids -> drop empties -> remove exact duplicates -> split by document -> report
near-duplicates (`neardup.py`) -> filter by token length (`tokens.py`) -> sample the size profile -> render
prompts through the task config -> write `<out_dir>/{train,validation,test}.jsonl`,
`quarantine.jsonl`, `dropped.jsonl` and the stats file, as one set.

Every record read ends up in exactly one place: a split file, `dropped.jsonl` (with the
reason) or `quarantine.jsonl` (with the error), or was not drawn by the size profile
(`splits.<name>.available` counts those). The prepared JSONL is what later stages load with
`datasets`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from ..config import ConfigError, Section
from ..io import atomic_dir, sha256_file, temp_path, write_json, write_jsonl
from ..model_source import load_tokenizer
from ..records.conversations import chat_records, log_records
from ..records.neardup import dedup_key, find_near_duplicates
from ..records.sampling import stratified_sample
from ..records.sources import (
    FieldMap,
    InputError,
    extract,
    gold_all_fallbacks,
    iter_numbered,
    normalise_text,
)
from ..records.splits import SPLITS, SplitConfig, assign_splits
from ..records.tokens import TokenCounter
from ..stats import percentile
from ..task import TaskConfig

log = logging.getLogger(__name__)


class NearDupConfig(Section):
    """Near-duplicate detection (MinHash over word 3-grams, verified by exact Jaccard)."""

    threshold: float = Field(0.8, gt=0, le=1, description="Word-3-gram Jaccard that counts.")
    num_perm: int = Field(64, gt=0, description="MinHash permutations.")
    drop_cross_split: bool = Field(
        False, description="Drop the train side of near-duplicate pairs that cross splits."
    )
    max_candidates: int = Field(
        100,
        gt=0,
        description="Candidates verified per record (those sharing most LSH bands first); "
        "records with more are counted in near_duplicates.capped_records.",
    )


class PrepareConfig(Section):
    """`prepare:` in params.yaml."""

    sources: list[str] = Field(
        default_factory=list, description="Raw files (.jsonl, .csv or .parquet); at least one."
    )
    format: Literal["rows", "openai_chat", "openai_log"] = Field(
        "rows",
        description="rows: one record per row through `fields`; openai_chat: an OpenAI chat "
        "fine-tuning file (JSONL of `messages`); openai_log: logged OpenAI-style requests and "
        "responses, the replies kept as distil's labels (docs/migrate-openai.md). The OpenAI "
        "formats ignore `fields`: ids, groups, prompts and gold come from the lines.",
    )
    source_dir: str | None = Field(
        None,
        description="The folder that holds every source: dvc.yaml makes it prepare's dependency "
        "(`${prepare.source_dir}`), so a source outside it is an error (DVC would not see it "
        "change). null: not checked (library use).",
    )
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
    allow_empty_splits: bool = Field(
        False, description="Accept a split with no records (default: an error, with the counts)."
    )

    @field_validator("max_examples", mode="before")
    @classmethod
    def _null_is_no_cap(cls, value: Any) -> Any:
        return {} if value is None else value  # `-S prepare.max_examples=null`: no caps


# --------------------------------------------------------------------------- splits


def percentiles(values: list[int]) -> dict[str, float]:
    """Length spread of a split (`stats.percentile`: lengths that occur, never interpolated)."""
    if not values:
        return {}
    q = percentile(values, [50, 90, 99])
    return {
        "min": int(min(values)),
        "p50": float(q[0]),
        "p90": float(q[1]),
        "p99": float(q[2]),
        "max": int(max(values)),
    }


# --------------------------------------------------------------------------- the stage


class Ledger:
    """Where every read record went, per source: dropped (with reason) or quarantined."""

    def __init__(self, cfg: PrepareConfig) -> None:
        self.cfg = cfg
        self.read = [0] * len(cfg.sources)
        self.lost: list[Counter[str]] = [Counter() for _ in cfg.sources]
        self.quarantined: list[dict[str, Any]] = []
        self.dropped: list[dict[str, Any]] = []
        self.fallbacks: dict[str, dict[str, str]] = {}  # source -> {missing column: used}

    def bad(self, err: InputError, where: str, source: int) -> None:
        if self.cfg.on_error == "fail":
            raise err
        self.quarantined.append({"where": where, "reason": str(err)})
        self.lost[source]["quarantined"] += 1

    def fallback(self, source: int, row: dict[str, Any]) -> dict[str, str]:
        """The gold columns that stand in for the source's missing `gold_all` ones (decided
        on its first row: a CSV's header), said once in the log and kept for the metrics."""
        found = gold_all_fallbacks(self.cfg.fields, row) if self.cfg.format == "rows" else {}
        if found:
            name = self.cfg.sources[source]
            self.fallbacks[name] = found
            pairs = ", ".join(f"'{m}' -> '{u}'" for m, u in found.items())
            log.warning(
                "prepare: %s has no multi-label gold column (%s): each record's single label "
                "is its only accepted one (prepare.fields.gold_all)",
                name,
                pairs,
            )
        return found

    def drop(self, record: dict[str, Any], reason: str, **extra: Any) -> None:
        self.dropped.append(
            {"id": record["id"], "where": record["where"], "reason": reason, **extra}
        )
        self.lost[record["source"]][reason] += 1

    def check_sources(self, records: list[dict[str, Any]]) -> None:
        """Every source still contributes a record; otherwise say where its records went."""
        kept = Counter(r["source"] for r in records)
        problems = []
        for index, source in enumerate(self.cfg.sources):
            if kept[index]:
                continue
            lost = self.lost[index]
            parts = [f"quarantined {lost['quarantined']}"] if lost["quarantined"] else []
            drops = [f"{n} {reason}" for reason, n in lost.items() if reason != "quarantined"]
            parts += ["dropped " + ", ".join(drops)] if drops else []
            problems.append(
                f"{source}: no records left ({self.read[index]} read: {', '.join(parts)})"
            )
        if problems:
            raise InputError(
                "; ".join(problems) + " (see prepare.on_error, min_text_tokens, max_tokens)"
            )


def row_records(
    cfg: PrepareConfig,
    task: TaskConfig,
    row: dict[str, Any],
    where: str,
    number: int,
    fallback: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The records of one source row, by `prepare.format` (a chat line may hold several)."""
    if cfg.format == "openai_chat":
        return chat_records(row, where, task)
    if cfg.format == "openai_log":
        return log_records(row, where, task)
    return [extract(row, where, cfg.fields, task, number=number, fallback=fallback)]


def read_records(cfg: PrepareConfig, task: TaskConfig, ledger: Ledger) -> list[dict[str, Any]]:
    """Every usable record of every source, streamed: mapped, normalised, ids checked."""
    records: list[dict[str, Any]] = []
    first_seen: dict[str, str] = {}
    for index, source in enumerate(cfg.sources):
        if cfg.format != "rows" and Path(source).suffix.lower() not in (".jsonl", ".json"):
            raise InputError(f"{source}: prepare.format {cfg.format} reads JSONL files only")
        fallback = None
        for where, number, row in iter_numbered(source):
            ledger.read[index] += 1
            if isinstance(row, InputError):
                ledger.bad(row, where, index)
                continue
            if fallback is None:
                fallback = ledger.fallback(index, row)
            try:
                found = row_records(cfg, task, row, where, number, fallback)
            except InputError as err:
                ledger.bad(err, where, index)
                continue
            for record in found:
                if (first := first_seen.get(record["id"])) is not None:
                    err = InputError(
                        f"{where}: duplicate id {record['id']!r} (first at {first}) "
                        "(prepare.fields.id)"
                    )
                    ledger.bad(err, where, index)
                    continue
                first_seen[record["id"]] = where
                record["source"] = index
                record["text"] = normalise_text(record["text"])
                if not record["text"]:
                    ledger.drop(record, "empty")
                    continue
                records.append(record)
        if not ledger.read[index]:
            raise InputError(f"{source}: no records (0 read) (prepare.sources)")
    return records


def drop_exact_duplicates(records: list[dict[str, Any]], ledger: Ledger) -> list[dict[str, Any]]:
    """One copy per de-duplication key, preferring the evaluation splits, so that a duplicate
    never sits in train while its twin is scored in test. Returned in location order."""
    priority = {"test": 0, "validation": 1, "train": 2}
    kept: dict[bytes, dict[str, Any]] = {}
    for record in sorted(records, key=lambda r: (priority[r["split"]], r["where"])):
        # A 16-byte digest of the key, not the key: the key is as long as the text.
        key = hashlib.blake2b(dedup_key(record["text"]).encode(), digest_size=16).digest()
        if key in kept:
            ledger.drop(record, "duplicate", duplicate_of=kept[key]["id"])
        else:
            kept[key] = record
    # Location order as text ("f:10" before "f:9"): the order the outputs have always had.
    return sorted(kept.values(), key=lambda r: r["where"])


def near_duplicates(
    records: list[dict[str, Any]], cfg: NearDupConfig, ledger: Ledger
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The near-duplicate report, and the records (without the dropped train sides)."""
    found = find_near_duplicates(
        [r["text"] for r in records], cfg.threshold, cfg.num_perm, cfg.max_candidates
    )
    pairs = found.pairs
    cross = [(i, j, s) for i, j, s in pairs if records[i]["split"] != records[j]["split"]]
    stats = {
        "pairs": len(pairs),
        "cross_split_pairs": len(cross),
        "threshold": cfg.threshold,
        "candidates_checked": found.checked,
        "capped_records": found.capped,
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
    if found.capped:
        log.warning(
            "prepare: %d record(s) had more than %d near-duplicate candidates; the rest were "
            "not checked (near_dup.max_candidates)",
            found.capped,
            cfg.max_candidates,
        )
    if cfg.drop_cross_split:
        drop = {
            i if records[i]["split"] == "train" else j
            for i, j, _ in cross
            if "train" in (records[i]["split"], records[j]["split"])
        }
        for i in sorted(drop):
            ledger.drop(records[i], "near_duplicate_cross_split")
        records = [r for i, r in enumerate(records) if i not in drop]
    return stats, records


def length_filter(
    records: list[dict[str, Any]], counter: TokenCounter, cfg: PrepareConfig, ledger: Ledger
) -> list[dict[str, Any]]:
    """The records whose text has `min_text_tokens` and whose chat sequence fits `max_tokens`
    (`n_tokens` set); the others dropped, in record order.

    A text too long by its characters alone (`TokenCounter.surely_over`) is dropped without
    being tokenized: a 2 MB clause in a CSV would otherwise be tokenized whole only to be
    dropped. Only texts that would fail the token count anyway go that way.
    """
    over = [counter.surely_over(r["text"], cfg.max_tokens) for r in records]
    counted = [r for r, o in zip(records, over, strict=True) if not o]
    counts = zip(*counter.count(counted), strict=True)
    limit = counter.bound.limit(cfg.max_tokens) if counter.bound else None
    kept = []
    for record, is_over in zip(records, over, strict=True):
        if is_over:
            ledger.drop(record, "too_long", n_chars=len(record["text"]), max_chars=limit)
            continue
        n_tokens, n_text = next(counts)
        record["n_tokens"] = n_tokens
        if n_text < cfg.min_text_tokens or n_tokens > cfg.max_tokens:
            reason = "too_short" if n_text < cfg.min_text_tokens else "too_long"
            ledger.drop(record, reason, n_tokens=n_tokens, n_text_tokens=n_text)
        else:
            kept.append(record)
    return kept


def check_splits(
    cfg: PrepareConfig, before: Counter[str], after: Counter[str] | None = None
) -> None:
    """An empty split is an error (unless allowed): later stages train, tune or score on it."""
    counts = after if after is not None else before
    empty = [s for s in SPLITS if not counts[s]]
    if not empty or cfg.allow_empty_splits:
        return
    if after is None:
        tally = ", ".join(f"{s} {before[s]}" for s in SPLITS) + " record(s) after de-duplication"
    else:
        tally = ", ".join(f"{s} {after[s]} (of {before[s]} before filtering)" for s in SPLITS)
    if any(before[s] for s in empty):
        hint = "the length filter dropped all of them: see prepare.min_text_tokens / max_tokens"
    elif cfg.fields.split:
        hint = (
            f"the source's split column '{cfg.fields.split}' (prepare.fields.split) has no "
            f"{' / '.join(repr(s) for s in empty)} records: add some, or set "
            "prepare.fields.split: null to split by document hash (prepare.split)"
        )
    else:
        hint = (
            f"the hash split (prepare.split.validation={cfg.split.validation}, "
            f"test={cfg.split.test}) put no document group there: add documents or raise "
            "the fraction"
        )
    raise InputError(
        f"empty split(s) {', '.join(empty)}: {tally}. {hint}; or set "
        "prepare.allow_empty_splits: true if that is intended"
    )


def check_source_dir(cfg: PrepareConfig) -> None:
    """There are sources, and each lies inside `source_dir`, the folder DVC watches."""
    if not cfg.sources:
        raise ConfigError("prepare.sources: no raw files given (.jsonl, .csv or .parquet)")
    if cfg.source_dir is None:
        return
    root = Path(cfg.source_dir).resolve()
    outside = [s for s in cfg.sources if not Path(s).resolve().is_relative_to(root)]
    if outside:
        raise ConfigError(
            f"prepare.sources: {', '.join(outside)} outside prepare.source_dir={cfg.source_dir}: "
            "DVC would not re-run prepare when it changes (move it there or set source_dir)"
        )


def run(cfg: PrepareConfig, task: TaskConfig, model_dir: str | Path) -> dict[str, Any]:
    """Run the prepare stage; returns the stats that are also written to `cfg.metrics`."""
    check_source_dir(cfg)
    ledger = Ledger(cfg)
    records = read_records(cfg, task, ledger)
    assign_splits(records, cfg.split)
    records = drop_exact_duplicates(records, ledger)
    near_dup_stats, records = near_duplicates(records, cfg.near_dup, ledger)
    # Checked before the tokenizer loads: an input that leaves nothing is an error that names
    # the source, not an IndexError from tokenizing an empty list.
    ledger.check_sources(records)
    before = Counter(r["split"] for r in records)
    check_splits(cfg, before)

    counter = TokenCounter(load_tokenizer(model_dir), task)
    length_ok = length_filter(records, counter, cfg, ledger)
    ledger.check_sources(length_ok)

    label_field = task.label_field()
    chosen: dict[str, list[dict[str, Any]]] = {}
    stats: dict[str, Any] = {"splits": {}}
    for split in SPLITS:
        pool = [r for r in length_ok if r["split"] == split]
        chosen[split] = stratified_sample(pool, cfg.max_examples.get(split), label_field, cfg.seed)
        labels = Counter(r["gold"].get(label_field) for r in chosen[split]) if label_field else {}
        stats["splits"][split] = {
            "records": len(chosen[split]),
            "available": len(pool),
            "groups": len({r["group"] for r in chosen[split]}),
            "tokens": percentiles([r["n_tokens"] for r in chosen[split]]),
            "labels": dict(sorted(labels.items(), key=lambda kv: str(kv[0]))),
        }
    check_splits(cfg, before, Counter({s: len(rs) for s, rs in chosen.items()}))
    stats.update(
        {
            "task": {"name": task.name, "version": task.version, "prompt_hash": task.prompt_hash},
            "sources": {s: sha256_file(s) for s in cfg.sources},
            "read": sum(ledger.read),
            "quarantined": {
                "total": len(ledger.quarantined),
                "reasons": dict(Counter(_reason(q["reason"]) for q in ledger.quarantined)),
            },
            "dropped": dict(Counter(d["reason"] for d in ledger.dropped)),
            "fallbacks": ledger.fallbacks,
            "near_duplicates": near_dup_stats,
        }
    )
    write_outputs(cfg, task, chosen, ledger, stats)
    log.info("prepare: %s", {s: v["records"] for s, v in stats["splits"].items()})
    return stats


def write_outputs(
    cfg: PrepareConfig,
    task: TaskConfig,
    chosen: dict[str, list[dict[str, Any]]],
    ledger: Ledger,
    stats: dict[str, Any],
) -> None:
    """Replace the split files, quarantine.jsonl, dropped.jsonl and the metrics as one set.

    Everything goes to a fresh folder beside `out_dir` and the metrics to a temporary name
    beside theirs; the folder is swapped in, then the metrics renamed over. A failure before
    the swap leaves the whole previous set in place.
    """
    out_dir, metrics = Path(cfg.out_dir), Path(cfg.metrics)
    inside = None  # the metrics file may live inside out_dir (it is then in the new folder)
    with contextlib.suppress(ValueError):
        inside = metrics.resolve().relative_to(out_dir.resolve())
    staged = None
    try:
        with atomic_dir(out_dir) as tmp:
            for split, records in chosen.items():
                write_jsonl(tmp / f"{split}.jsonl", (_row(r, split, task) for r in records))
            write_jsonl(tmp / "quarantine.jsonl", ledger.quarantined)
            write_jsonl(tmp / "dropped.jsonl", ledger.dropped)
            if inside is not None:
                write_json(tmp / inside, stats)
            else:
                staged = temp_path(metrics)
                write_json(staged, stats)
        if staged is not None:
            os.replace(staged, metrics)
            staged = None
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)


def _row(record: dict[str, Any], split: str, task: TaskConfig) -> dict[str, Any]:
    row = {
        "id": record["id"],
        "group": record["group"],
        "split": split,
        "text": record["text"],
        # A chat file's or a log's own turns; otherwise the task's system prompt + the text.
        "prompt": record.get("prompt") or task.messages(record["text"]),
        "gold": record["gold"],
        "gold_all": record["gold_all"],
        "n_tokens": record["n_tokens"],
    }
    if "logged" in record:  # the prototype's logged reply: distil's label (docs/distil.md)
        row["logged"] = record["logged"]
    return row


def _reason(message: str) -> str:
    """The kind of a quarantine message, without its file/line prefix (for counting)."""
    kind = message.split(": ", 1)[-1]
    return re.sub(r"'[^']*'|\(.*\)|\d+", "…", kind).strip()
