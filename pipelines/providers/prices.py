"""The dated price table (`configs/prices.yaml`): API models per 1M tokens, machines per hour.

Each row names the vendor page it comes from and when it was read; `verified: false` says the
figures have not been checked against the vendors' current lists (reports say so).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from pydantic import Field

from ..config import ConfigError, Section, read_yaml
from .base import Price


class ModelPrice(Price):
    """A model's token prices (`Price`) and where they were read."""

    min_cached_prefix: int | None = Field(
        None, ge=0, description="Shortest prefix the vendor caches (null: any)."
    )
    source: str = Field(description="The vendor's pricing page.")
    date: str | dt.date = Field(description="When the price was read (YYYY-MM[-DD]).")


class MachinePrice(Section):
    """One machine's on-demand price."""

    usd_per_hour: float = Field(ge=0)
    what: str = Field("", description="Instance type, accelerator, region.")
    source: str
    date: str | dt.date


class PriceTable(Section):
    as_of: str | dt.date
    verified: bool = False
    models: dict[str, ModelPrice]
    machines: dict[str, MachinePrice] = Field(default_factory=dict)

    def model(self, name: str, path: str | Path = "the price table") -> ModelPrice:
        if name not in self.models:
            raise ConfigError(f"{path}: no model {name!r} (have {sorted(self.models)})")
        return self.models[name]

    def machine(self, name: str, path: str | Path = "the price table") -> MachinePrice:
        if name not in self.machines:
            raise ConfigError(f"{path}: no machine {name!r} (have {sorted(self.machines)})")
        return self.machines[name]


def load_prices(path: str | Path) -> PriceTable:
    """The table at `path`; errors name the file."""
    try:
        return PriceTable.model_validate(read_yaml(path))
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{path}: not a price table: {err}") from None
