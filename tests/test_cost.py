"""`temper cost` against a worked example computed by hand here, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from temper.providers.prices import load_prices
from temper.results import CostResult
from temper.stages.cost import CostConfig, CostInputError, Traffic, request_usd
from temper.stages.cost import run as cost

ROOT = Path(__file__).resolve().parents[1]
TABLE = {
    "as_of": "2026-01",
    "verified": False,
    "models": {
        "big": {"input": 2.0, "cached_input": 0.5, "output": 8.0, "min_cached_prefix": 1000,
                "source": "https://example.com/big", "date": "2026-01"},
        "small": {"input": 0.4, "cached_input": 0.1, "output": 1.6,
                  "source": "https://example.com/small", "date": "2026-01"},
    },
    "machines": {"box": {"usd_per_hour": 0.5, "source": "https://example.com/box", "date": "2026-01"}},
}  # fmt: skip


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A price table and the three measurement files, as their writers lay them out."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prices.yaml").write_text(yaml.safe_dump(TABLE))
    reports = tmp_path / "reports"
    reports.mkdir()
    bench = {"batched": {"requests_per_s": 0.1, "tokens_per_s": 2.5}, "rows": []}
    (reports / "bench_serve.json").write_text(json.dumps(bench))
    route = {"shares": {"self": 0.6, "mid": 0.3, "frontier": 0.1}, "oracle": True}
    (reports / "route.json").write_text(json.dumps(route))
    (reports / "cache.json").write_text(
        json.dumps({"default": {"threshold": 0.95, "hit_rate": 0.2}})
    )
    return tmp_path


def example(**kw) -> CostConfig:
    values = {
        "prices": "prices.yaml",
        "traffic": {"requests_per_day": 20_000, "input_tokens": 2000, "output_tokens": 100,
                    "cacheable_share": 0.5, "days_per_month": 30},
        "api_model": "big",
        "tier_models": {"mid": "small", "frontier": "big"},
        "machine": "box",
        "utilisation": 0.5,
        "min_machines": 1,
        "triggers": {"api_spend_usd": 1000, "regulated_data": True},
        "bench_file": "reports/bench_serve.json",
        **kw,
    }  # fmt: skip
    return CostConfig(**values)


def test_the_worked_example(setup):
    r = cost(example())
    # Volume: 20,000 requests/day * 30 days = 600,000 requests/month; 30 * 24 = 720 hours.
    assert r.monthly_requests == 600_000 and r.hours_per_month == 720
    # Per request on "big": 2,000 input tokens, half a shared prefix (1,000 >= its minimum of
    # 1,000, so cached): (1,000 * 2.00 + 1,000 * 0.50 + 100 * 8.00) / 1e6 = 3,300 / 1e6.
    assert r.per_request_usd["big"] == pytest.approx(0.0033)
    # On "small" (no minimum): (1,000 * 0.40 + 1,000 * 0.10 + 100 * 1.60) / 1e6 = 660 / 1e6.
    assert r.per_request_usd["small"] == pytest.approx(0.00066)
    # All-API: 600,000 * 0.0033 = 1,980 USD.
    assert r.options["all_api"].monthly_usd == pytest.approx(1980)
    assert r.options["all_api"].machine_hours == 0
    # One machine serves 0.1 requests/s * 50% utilisation * 3,600 s = 180 requests an hour.
    # Self-hosted: 600,000 / 180 = 3,333.33 machine-hours (above the floor of 1 * 720 h),
    # * 0.50 USD/h = 1,666.67 USD; 3,333.33 / 720 = 4.63 machines on average.
    sh = r.options["self_hosted"]
    assert sh.machine_hours == pytest.approx(3333.333, rel=1e-6)
    assert sh.monthly_usd == pytest.approx(1666.667, rel=1e-6)
    assert sh.machines == pytest.approx(4.6296, rel=1e-4)
    # Hybrid: the cache answers 20%, so 480,000 requests reach the router. All of them are
    # answered first by the self tier: 480,000 / 180 = 2,666.67 h * 0.50 = 1,333.33 USD.
    # Deferred: 30% to mid (small), 10% to frontier (big):
    # 480,000 * (0.3 * 0.00066 + 0.1 * 0.0033) = 480,000 * 0.000528 = 253.44 USD.
    hy = r.options["hybrid"]
    assert hy.api_usd == pytest.approx(253.44)
    assert hy.machine_usd == pytest.approx(1333.333, rel=1e-6)
    assert hy.monthly_usd == pytest.approx(1586.773, rel=1e-6)
    assert r.cheapest == "hybrid"
    # Break-even, self-hosted vs all-API: the self-hosted marginal cost, 0.50 / 180 =
    # 0.002778 USD a request, is below the API's 0.0033, so one exists, within the floor:
    # 0.0033 * V = 1 * 720 h * 0.50 = 360 USD  ->  V = 360 / 0.0033 = 109,090.9 requests.
    assert r.break_even_requests_per_month == pytest.approx(109_090.9, rel=1e-6)
    # Hybrid vs all-API: API part 0.8 * 0.000528 = 0.0004224 a request, machine part
    # 0.8 * 0.002778 = 0.002222: 0.0033 - 0.0004224 - 0.002222 > 0, so one exists:
    # 0.0033 * V = 360 + 0.0004224 * V  ->  V = 360 / 0.0028776 = 125,104.3 requests.
    assert r.hybrid_break_even_requests_per_month == pytest.approx(125_104.3, rel=1e-6)
    # Triggers: 1,980 > 1,000; the flags as set.
    assert r.triggers == {"api_spend": True, "latency_target": False, "regulated_data": True}
    assert r.inputs.oracle and r.inputs.shares_source == "reports/route.json"
    assert any("NOT verified" in n for n in r.notes) and any("oracle" in n for n in r.notes)
    assert not any(n.startswith("Shutdown") for n in r.notes)  # no row has a shutdown date
    # The files: the typed result round-trips, the report states the break-even, a PNG.
    assert CostResult.load("reports/cost.json") == r
    assert "109,091 requests/month" in (setup / "reports" / "cost.md").read_text()
    assert (setup / "reports" / "cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_break_even_when_a_machine_costs_more_per_request_than_the_api(setup):
    # 0.05 requests/s * 50% * 3,600 = 90 an hour: 0.50 / 90 = 0.00556 USD a request > 0.0033.
    r = cost(example(throughput_rps=0.05))
    assert r.break_even_requests_per_month is None
    assert r.inputs.throughput_source == "params (cost.throughput_rps)"
    assert "none (never cheaper)" in (setup / "reports" / "cost.md").read_text()


def test_a_prefix_shorter_than_the_vendor_minimum_is_billed_in_full(setup):
    table = load_prices("prices.yaml")
    traffic = Traffic(input_tokens=2000, output_tokens=100, cacheable_share=0.4)
    # 800 shared tokens < big's 1,000: (2,000 * 2.00 + 100 * 8.00) / 1e6.
    assert request_usd(table.models["big"], traffic) == pytest.approx(4800 / 1e6)
    # small has no minimum: (1,200 * 0.40 + 800 * 0.10 + 100 * 1.60) / 1e6 = 720 / 1e6.
    assert request_usd(table.models["small"], traffic) == pytest.approx(720 / 1e6)


def test_explicit_values_replace_the_files_and_old_bench_files_still_read(setup):
    (setup / "reports" / "route.json").unlink()
    (setup / "reports" / "cache.json").unlink()
    rows = [{"mode": "batched", "throughput_rps": r} for r in (0.6, 1.8, 1.2)]
    rows.append({"mode": "one-at-a-time", "throughput_rps": 5.0})
    (setup / "reports" / "bench_serve.json").write_text(json.dumps({"rows": rows}))
    r = cost(example(shares={"self": 1.0}, cache_hit_rate=0.0))
    assert r.inputs.throughput_rps == 1.8  # the best batched row
    assert r.options["hybrid"].monthly_usd == pytest.approx(r.options["self_hosted"].monthly_usd)


@pytest.mark.parametrize(
    ("gone", "names"),
    [
        ("bench_serve.json", ["scripts/bench_serve.py", "cost.throughput_rps"]),
        ("route.json", ["dvc repro route", "cost.shares"]),
        ("cache.json", ["cache hit rate", "cost.cache_hit_rate"]),
    ],
)
def test_a_missing_measurement_names_its_file_and_how_to_make_it(setup, gone, names):
    (setup / "reports" / gone).unlink()
    with pytest.raises(CostInputError) as err:
        cost(example())
    assert f"reports/{gone} not found" in str(err.value)
    assert all(n in str(err.value) for n in names)
    assert not (setup / "reports" / "cost.json").exists()


def test_bad_inputs_are_errors(setup):
    with pytest.raises(CostInputError, match="summing to 1"):
        cost(example(shares={"self": 0.5, "mid": 0.2}))
    with pytest.raises(CostInputError, match="does not map"):
        cost(example(shares={"self": 0.5, "other": 0.5}))
    with pytest.raises(ValueError, match="no model 'nope'"):
        cost(example(api_model="nope"))


def test_the_command_prints_the_summary(setup):
    from temper.cli import app

    params = {"cost": example().model_dump(mode="json")}
    (setup / "params.yaml").write_text(yaml.safe_dump(params))
    out = CliRunner().invoke(app, ["cost", "-S", "cost.traffic.requests_per_day=1000"])
    assert out.exit_code == 0, out.output
    assert "30,000 requests/month" in out.output and "break-even" in out.output
    (setup / "reports" / "route.json").unlink()
    out = CliRunner().invoke(app, ["cost"])
    assert out.exit_code == 1 and "reports/route.json not found" in out.output


def test_the_shipped_price_table_has_every_row_dated_and_sourced():
    table = load_prices(ROOT / "configs" / "prices.yaml")
    retiring = {"gpt-4o-mini", "gpt-4.1-mini", "gpt-4.1", "gpt-4o", "claude-sonnet-4-5"}
    current = {"gpt-6-luna", "gpt-6.1-terra", "gpt-6.1-sol", "claude-haiku-5-5"}
    assert retiring | current | {"claude-sonnet-5-5", "claude-haiku-4-5", "local"} <= set(
        table.models
    )
    assert {"cpu-2vcpu", "gpu-l4", "gpu-h100"} <= set(table.machines)
    rows = [*table.models.values(), *table.machines.values()]
    assert all(row.source and row.date for row in rows)
    # Not every row could be read on the vendor's own page, so the table must not claim it.
    assert table.verified == all(r.verified for r in rows)
    for name, p in table.models.items():
        assert p.cached_input is None or p.cached_input <= p.input, name
        if name.startswith("claude"):  # Anthropic: 5-minute writes at 1.25x input
            assert p.cache_write == pytest.approx(1.25 * p.input), name
        if not p.verified and name != "local":
            assert p.note, f"{name}: an unverified row says why in its note"
    # The models OpenAI and Anthropic retire carry their date, its page and a successor that
    # is itself not retiring.
    for name in retiring:
        p = table.models[name]
        assert p.shutdown is not None and p.shutdown_source.startswith("https://"), name
        successor = table.models[p.successor]
        assert successor.shutdown is None, f"{name}'s successor {p.successor} is retiring too"
    assert {str(table.models[m].shutdown) for m in retiring - {"claude-sonnet-4-5"}} == {
        "2027-01-14"
    }
    assert all(table.models[m].shutdown is None for m in current)
    assert table.models["local"].cost(1000, 1000) == 0


def test_params_yaml_cost_section_runs_on_the_shipped_table(tmp_path):
    from temper.config import load_params
    from temper.params import TemperParams

    params = load_params(ROOT / "params.yaml")
    cfg = TemperParams.of(params).cost
    out = {k: str(tmp_path / f"cost.{k}") for k in ("report", "result", "plot")}
    measured = {"throughput_rps": 1.0, "cache_hit_rate": 0.0, "shares": {"self": 1.0}}
    r = cost(cfg.model_copy(update={"prices": str(ROOT / cfg.prices), **out, **measured}))
    assert r.options["all_api"].monthly_usd > 0 and r.prices["verified"] is False
