"""Choosing records: a stratified sample of a split, and the few-shot examples of a prompt.

Both are deterministic (seeded, or a hash of seed and id) so the same inputs always give the
same records, the same prompts and the same cache keys.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from typing import Any

from ..io import stable_hash
from ..task import TaskConfig


def _group_key(value: Any) -> Any:
    """A gold value as a dict key: lists (multi-label sets, list fields) by their JSON text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else value


def stratified_sample(
    records: list[dict[str, Any]], limit: int | None, key: str | None, seed: int
) -> list[dict[str, Any]]:
    """Up to `limit` records, every label kept in proportion (at least one each), seeded."""
    if limit is None or len(records) <= limit:
        return records
    rng = random.Random(seed)
    by_label: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_label[_group_key(record["gold"].get(key)) if key else None].append(record)
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


def pick_few_shot(
    task: TaskConfig, train: list[dict[str, Any]], k: int, seed: str
) -> list[dict[str, Any]]:
    """k train records in a fixed pseudo-random order, valid gold, distinct first-field labels.

    Deterministic (a hash of seed and id, not an RNG), so the teacher's prompt and every cache
    key stay the same from run to run.
    """
    if k == 0:
        return []
    first = task.fields[0].name
    chosen: list[dict[str, Any]] = []
    seen: set[Any] = set()
    for record in sorted(train, key=lambda r: stable_hash([seed, r["id"]])):
        answer = task.gold_answer(record)
        if task.validate_answer(answer) or _group_key(answer[first]) in seen:
            continue
        seen.add(_group_key(answer[first]))
        chosen.append(record)
        if len(chosen) == k:
            break
    return chosen
