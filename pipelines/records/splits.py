"""Which split a record lands in: a deterministic hash of its document group (or the
source's own split column, checked for leakage), so no document is in two splits."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any

from pydantic import Field, model_validator

from ..config import Section
from .sources import InputError

SPLITS = ("train", "validation", "test")


class SplitConfig(Section):
    """Deterministic hash split by group, used when the source has no split column."""

    salt: str = Field("temper-split-v1", description="Salt of the group hash.")
    validation: float = Field(0.1, ge=0, lt=1, description="Fraction of groups for validation.")
    test: float = Field(0.1, ge=0, lt=1, description="Fraction of groups for test.")

    @model_validator(mode="after")
    def _leaves_train(self) -> SplitConfig:
        if self.validation + self.test >= 1:
            raise ValueError(
                f"validation + test = {self.validation} + {self.test} leaves no groups for "
                "train: the two fractions must sum to less than 1"
            )
        return self


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
