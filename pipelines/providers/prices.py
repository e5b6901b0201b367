"""The dated price table (`configs/prices.yaml`): API models per 1M tokens, machines per hour.

Each row names the vendor page it comes from and when it was read; `verified: false` says the
figures have not been checked against the vendors' current lists (reports say so). A model the
vendor retires carries its `shutdown` date, the page that announced it and, where the table
has one, its `successor`: pricing such a model logs a warning once per table and model
(`PriceTable.model`), and `temper cost` writes the same line into its report.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from pydantic import Field, model_validator

from ..config import ConfigError, Section, read_yaml
from .base import Price

log = logging.getLogger(__name__)

_warned: set[tuple[str, str]] = set()  # (table, model) pairs already warned about


class ModelPrice(Price):
    """A model's token prices (`Price`), where they were read and when the vendor retires it."""

    min_cached_prefix: int | None = Field(
        None, ge=0, description="Shortest prefix the vendor caches (null: any)."
    )
    source: str = Field(description="The vendor's pricing page.")
    date: str | dt.date = Field(description="When the price was read (YYYY-MM[-DD]).")
    verified: bool = Field(
        False, description="The figures were read on the vendor's own page on `date`."
    )
    note: str = Field("", description="What was not re-read, conflicting sources, caveats.")
    shutdown: dt.date | None = Field(
        None, description="The day the vendor stops serving the model (null: none announced)."
    )
    shutdown_source: str | None = Field(
        None, description="The page announcing the shutdown, and when it was read."
    )
    successor: str | None = Field(
        None, description="The table's row for the vendor's recommended replacement."
    )

    @model_validator(mode="after")
    def _shutdown_has_source(self) -> ModelPrice:
        if self.shutdown is not None and not self.shutdown_source:
            raise ValueError("shutdown needs shutdown_source (the page that announced it)")
        return self


class MachinePrice(Section):
    """One machine's on-demand price."""

    usd_per_hour: float = Field(ge=0)
    what: str = Field("", description="Instance type, accelerator, region.")
    source: str
    date: str | dt.date
    verified: bool = Field(False, description="Read on the vendor's own page on `date`.")


class PriceTable(Section):
    as_of: str | dt.date
    verified: bool = False
    models: dict[str, ModelPrice]
    machines: dict[str, MachinePrice] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _successors_exist(self) -> PriceTable:
        for name, row in self.models.items():
            if row.successor is not None and row.successor not in self.models:
                raise ValueError(
                    f"models.{name}.successor: {row.successor!r} is not a row of models"
                )
        return self

    def model(self, name: str, path: str | Path = "the price table") -> ModelPrice:
        """The row of `name`; logs a warning (once per table) when it has a shutdown date."""
        if name not in self.models:
            raise ConfigError(f"{path}: no model {name!r} (have {sorted(self.models)})")
        row = self.models[name]
        message = shutdown_warning(name, row)
        if message and (str(path), name) not in _warned:
            _warned.add((str(path), name))
            log.warning("%s: %s", path, message)
        return row

    def machine(self, name: str, path: str | Path = "the price table") -> MachinePrice:
        if name not in self.machines:
            raise ConfigError(f"{path}: no machine {name!r} (have {sorted(self.machines)})")
        return self.machines[name]


def today() -> dt.date:
    """Today in UTC (vendors date their shutdowns in UTC)."""
    return dt.datetime.now(dt.UTC).date()


def shutdown_warning(name: str, row: ModelPrice, on: dt.date | None = None) -> str | None:
    """One line on `name`'s shutdown as seen `on` a day (default today); None if none is set."""
    if row.shutdown is None:
        return None
    days = (row.shutdown - (on or today())).days
    if days > 0:
        when = f"shuts down on {row.shutdown} ({days} day{'s' * (days != 1)} left)"
    elif days == 0:
        when = f"shuts down today ({row.shutdown})"
    else:
        when = f"was shut down on {row.shutdown} ({-days} day{'s' * (days != -1)} ago)"
    after = f"; successor in the table: {row.successor}" if row.successor else ""
    return f"model {name} {when}{after} (source: {row.shutdown_source})"


def load_prices(path: str | Path) -> PriceTable:
    """The table at `path`; errors name the file."""
    try:
        return PriceTable.model_validate(read_yaml(path))
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{path}: not a price table: {err}") from None


def warn_if_retiring(model: str, path: str | Path = "configs/prices.yaml") -> str | None:
    """The shutdown line of `model` when the price table at `path` gives it a date (logged
    once); None when the table, the model or a date is missing. For callers that price from
    params (distil's teacher) rather than from the table."""
    if not Path(path).is_file():
        return None
    table = load_prices(path)
    if model not in table.models:
        return None
    return shutdown_warning(model, table.model(model, path))
