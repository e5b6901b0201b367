"""The price table's shutdown dates: the warnings `temper cost` and the route stage give, the
table's own checks, and params.yaml's defaults staying on models that are not retiring."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from temper.config import ConfigError, load_params
from temper.providers import prices
from temper.providers.prices import ModelPrice, load_prices, shutdown_warning

ROOT = Path(__file__).resolve().parents[1]
CURRENT_UNTIL = dt.date(2027, 2, 1)  # a default must be served at least until then


def row(**kw: Any) -> dict[str, Any]:
    """A model row of the table, sourced and dated."""
    return {"input": 2.0, "output": 8.0, "source": "https://example.com/p", "date": "2026-12"} | kw


def test_the_line_counts_days_left_and_days_past():
    r = ModelPrice(**row(shutdown="2027-01-14", shutdown_source="https://example.com/d"))
    on = dt.date(2026, 12, 5)
    assert shutdown_warning("m", r, on) == (
        "model m shuts down on 2027-01-14 (40 days left) (source: https://example.com/d)"
    )
    assert "(1 day left)" in shutdown_warning("m", r, dt.date(2027, 1, 13))
    assert "shuts down today (2027-01-14)" in shutdown_warning("m", r, dt.date(2027, 1, 14))
    assert "was shut down on 2027-01-14 (1 day ago)" in shutdown_warning(
        "m", r, dt.date(2027, 1, 15)
    )
    assert "(365 days ago)" in shutdown_warning("m", r, dt.date(2028, 1, 14))
    with_successor = r.model_copy(update={"successor": "n"})
    assert "; successor in the table: n (source:" in shutdown_warning("m", with_successor, on)
    assert shutdown_warning("m", ModelPrice(**row()), on) is None


def test_a_shutdown_needs_its_page_and_a_successor_its_row(tmp_path):
    path = tmp_path / "prices.yaml"
    path.write_text(
        yaml.safe_dump({"as_of": "2026-12", "models": {"m": row(shutdown="2027-01-14")}})
    )
    with pytest.raises(
        ConfigError, match=r"(?s)prices.yaml: not a price table.*models\.m\n.*needs shutdown_source"
    ):
        load_prices(path)
    path.write_text(yaml.safe_dump({"as_of": "2026-12", "models": {"m": row(successor="gone")}}))
    with pytest.raises(
        ConfigError, match=r"(?s)prices.yaml: not a price table.*models\.m\.successor: 'gone'"
    ):
        load_prices(path)


def test_pricing_a_retiring_model_logs_once_per_table(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(prices, "_warned", set())
    soon = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=9)
    table = {
        "as_of": "2026-12",
        "models": {
            "old": row(shutdown=soon.isoformat(), shutdown_source="https://example.com/d"),
            "new": row(),
        },
    }
    path = tmp_path / "prices.yaml"
    path.write_text(yaml.safe_dump(table))
    loaded = load_prices(path)
    with caplog.at_level(logging.WARNING, logger="temper.providers.prices"):
        for _ in range(3):
            loaded.model("old", path)
            loaded.model("new", path)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: model old shuts down on {soon} (9 days left) (source: https://example.com/d)"
    ]


def test_temper_cost_warns_in_its_output_report_and_result(tmp_path, monkeypatch):
    """The real command on a table whose all-API model shuts down in 40 days and whose mid
    tier's model was shut down 3 days ago: each gets its line, with the right day count."""
    from temper.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prices, "_warned", set())
    today = dt.datetime.now(dt.UTC).date()
    ahead, past = today + dt.timedelta(days=40), today - dt.timedelta(days=3)
    table = {
        "as_of": "2026-12",
        "models": {
            "big": row(shutdown=ahead.isoformat(), shutdown_source="https://example.com/big",
                       successor="next"),
            "small": row(input=0.4, output=1.6, shutdown=past.isoformat(),
                         shutdown_source="https://example.com/small"),
            "next": row(input=1.0, output=5.0),
        },
        "machines": {"box": {"usd_per_hour": 0.5, "source": "https://example.com/box",
                             "date": "2026-12"}},
    }  # fmt: skip
    (tmp_path / "prices.yaml").write_text(yaml.safe_dump(table))
    cfg = {
        "prices": "prices.yaml",
        "api_model": "big",
        "tier_models": {"mid": "small", "frontier": "next"},
        "machine": "box",
        "throughput_rps": 1.0,
        "cache_hit_rate": 0.1,
        "shares": {"self": 0.7, "mid": 0.2, "frontier": 0.1},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"cost": cfg}))
    out = CliRunner().invoke(app, ["cost"])
    assert out.exit_code == 0, out.output
    big = (
        f"model big shuts down on {ahead} (40 days left); successor in the table: next "
        "(source: https://example.com/big)"
    )
    small = f"model small was shut down on {past} (3 days ago) (source: https://example.com/small)"
    assert f"WARNING: {big}" in out.output and f"WARNING: {small}" in out.output
    assert f"prices.yaml: {big}" in out.output  # the log line (PriceTable.model)
    assert "model next" not in out.output  # no shutdown date, no warning
    report = (tmp_path / "reports" / "cost.md").read_text()
    assert f"> Shutdown: {big}" in report and f"> Shutdown: {small}" in report
    assert f"| {ahead}, successor next |" in report  # the prices table's shutdown column
    notes = json.loads((tmp_path / "reports" / "cost.json").read_text())["notes"]
    assert f"Shutdown: {big}" in notes and f"Shutdown: {small}" in notes


def priced_names(node: Any, found: set[str]) -> set[str]:
    """Every model params.yaml prices or calls: `model`, `price_as`, `api_model`,
    `tier_models` and the keys of the providers' inline `prices`."""
    if isinstance(node, list):
        for item in node:
            priced_names(item, found)
    if not isinstance(node, dict):
        return found
    for key, value in node.items():
        if key in ("model", "price_as", "api_model") and isinstance(value, str):
            found.add(value)
        elif key == "tier_models":
            found.update(value.values())
        elif key == "prices" and isinstance(value, dict):
            found.update(value)
        else:
            priced_names(value, found)
    return found


def test_no_default_in_params_prices_a_model_about_to_shut_down():
    table = load_prices(ROOT / "configs" / "prices.yaml")
    params = load_params(ROOT / "params.yaml")
    names = priced_names(params, set()) - {"gold"}  # gold: the offline stand-in, no price
    assert {"gpt-6-luna", "gpt-6.1-sol"} <= names  # the walk finds the defaults
    unknown = {n for n in names if n not in table.models}
    assert not unknown, f"params.yaml names models the price table lacks: {sorted(unknown)}"
    retiring = {
        n: str(table.models[n].shutdown)
        for n in names
        if table.models[n].shutdown is not None and table.models[n].shutdown < CURRENT_UNTIL
    }
    assert not retiring, f"params.yaml defaults to models being shut down: {retiring}"


def test_inline_prices_in_params_are_the_tables():
    """A provider's own `prices:` (distil, judge, the monitor's judge) use the table's figures."""
    table = load_prices(ROOT / "configs" / "prices.yaml")
    params = load_params(ROOT / "params.yaml")
    blocks = [
        params["distil"]["provider"]["prices"],
        params["judge"]["provider"]["prices"],
        params["monitor"]["judge"]["provider"]["prices"],
    ]
    fields = ("input", "output", "cached_input", "cache_write", "batch_input", "batch_output")
    for block in blocks:
        for name, inline in block.items():
            listed = table.models[name]
            for field in set(fields) & set(inline):
                assert inline[field] == pytest.approx(getattr(listed, field)), (name, field)
