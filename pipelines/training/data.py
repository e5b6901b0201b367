"""Training records: read and check them, fit long clauses, tokenize as trl does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..chat import adapt
from ..errors import MissingInput, TemperError
from ..io import read_jsonl, sha256_file, stable_hash


class DataError(TemperError, ValueError):
    """A distilled record is unusable (names file, line and field)."""


def load_records(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Read prompt/completion records, checking the fields the trainer needs."""
    if not path.exists():
        raise MissingInput(f"{path}: not found (run the distil stage first)")
    records = read_jsonl(path)
    for lineno, rec in enumerate(records, 1):
        for key in ("prompt", "completion"):
            msgs = rec.get(key)
            if (
                not isinstance(msgs, list)
                or not msgs
                or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role")
                    for m in msgs
                )
            ):
                raise DataError(
                    f"{path}:{lineno}: field '{key}' must be a non-empty list of "
                    "{role, content} messages"
                )
        if rec["completion"][-1]["role"] != "assistant":
            raise DataError(f"{path}:{lineno}: field 'completion' must end with an assistant turn")
    if not records:
        raise DataError(f"{path}: no records")
    return records[:limit] if limit else records


def fit_prompt(
    tokenizer, rec: dict[str, Any], max_length: int, system_ok: bool | None = None
) -> tuple[dict[str, Any], bool]:
    """The record as the template takes it (`chat.adapt`: a system prompt folded into the user
    turn where the template has no system role), its last user message cut so that prompt +
    completion fit `max_length` tokens.

    trl truncates the whole sequence from the right, which would cut the answer (the only part
    with a loss). For classification the clause's start carries the signal, so its tail goes.
    """
    prompt = adapt(tokenizer, rec["prompt"], system_ok)
    if prompt is not rec["prompt"]:  # folded; else the record itself comes back when it fits
        rec = {**rec, "prompt": prompt}
    full = tokenizer.apply_chat_template(rec["prompt"] + rec["completion"], tokenize=True)
    full = full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full
    excess = len(full) - max_length
    if excess <= 0:
        return rec, False
    prompt = [dict(m) for m in rec["prompt"]]
    user = prompt[-1]
    ids = tokenizer(user["content"], add_special_tokens=False)["input_ids"]
    keep = len(ids) - excess - 2  # 2 tokens of slack: re-tokenising the cut text can shift
    if keep < 8:
        raise DataError(
            f"record {rec.get('id')}: max_length {max_length} leaves no room for the "
            "clause; raise train.max_length"
        )
    user["content"] = tokenizer.decode(ids[:keep])
    return {**rec, "prompt": prompt}, True


def to_dataset(tokenizer, records: list[dict[str, Any]], max_length: int):
    """A `datasets.Dataset` of conversational prompt/completion pairs; returns (ds, n_cut)."""
    from datasets import Dataset

    from ..chat import supports_system

    rows, cut = [], 0
    system_ok = supports_system(tokenizer)
    for rec in records:
        rec, was_cut = fit_prompt(tokenizer, rec, max_length, system_ok)
        cut += was_cut
        rows.append({"prompt": rec["prompt"], "completion": rec["completion"]})
    return Dataset.from_list(rows), cut


def tokenize_pair(tokenizer, rec: dict[str, Any]) -> dict[str, list[int]]:
    """input_ids and completion-only labels of one record, as trl builds them."""
    rec = {**rec, "prompt": adapt(tokenizer, rec["prompt"])}
    prompt = tokenizer.apply_chat_template(rec["prompt"], add_generation_prompt=True, tokenize=True)
    full = tokenizer.apply_chat_template(rec["prompt"] + rec["completion"], tokenize=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    full = full["input_ids"] if hasattr(full, "keys") else full
    labels = [-100] * len(prompt) + list(full[len(prompt) :])
    return {"input_ids": list(full), "labels": labels}


def data_hash(data_dir: Path) -> str:
    return stable_hash({n: sha256_file(data_dir / f"{n}.jsonl") for n in ("train", "validation")})
