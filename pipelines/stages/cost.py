"""Stage cost: monthly cost of all-API, self-hosted and hybrid serving, and the break-even.

Inputs: a traffic profile and the choices (`cost:` in params.yaml), the dated price table
(`configs/prices.yaml`), and three measured figures, each read from the file that measured it
unless params give it: the batched server's throughput (`scripts/bench_serve.py`), the share
of requests each tier answers (the route stage) and the semantic cache's hit rate (the cache
evaluation). Writes `reports/cost.{json,md,png}`. The formulae are in docs/cost.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from ..config import ConfigError, Section
from ..io import read_json
from ..providers.prices import ModelPrice, PriceTable, load_prices, shutdown_warning
from ..reports.cost import SHUTDOWN, write_plot, write_report
from ..results import CostInputs, CostOption, CostResult

SELF = "self"  # the route stage's name for the self-hosted tier


class Traffic(Section):
    """The traffic profile: how much, how big, how much of each prompt is shared."""

    requests_per_day: float = Field(10_000, gt=0, description="Requests per day.")
    input_tokens: float = Field(450, ge=0, description="Input tokens per request (all of it).")
    output_tokens: float = Field(25, ge=0, description="Output tokens per request.")
    cacheable_share: float = Field(
        0.6,
        ge=0,
        le=1,
        description="Share of the input that is a prefix shared by every request (system "
        "prompt, label list, few-shot turns): the vendors' prompt cache bills it at "
        "cached_input when it is at least the model's min_cached_prefix tokens.",
    )
    days_per_month: float = Field(30, gt=0, le=31, description="Days in a billing month.")


class Triggers(Section):
    """The usual reasons to self-host, beyond the price."""

    api_spend_usd: float = Field(
        5000, ge=0, description="Holds when the all-API monthly bill is above this."
    )
    latency_target: bool = Field(
        False, description="The product has a latency target an API round trip cannot meet."
    )
    regulated_data: bool = Field(
        False, description="The data is regulated and must not leave your machines."
    )


class CostConfig(Section):
    """`cost:` in params.yaml."""

    prices: str = Field("configs/prices.yaml", description="The dated price table.")
    traffic: Traffic = Field(default_factory=Traffic)
    api_model: str = Field("gpt-6.1-sol", description="The all-API option: one model answers all.")
    tier_models: dict[str, str] = Field(
        default_factory=lambda: {"mid": "gpt-6-luna", "frontier": "gpt-6.1-sol"},
        description="The hybrid's API tiers (route stage names) and the model each one is.",
    )
    machine: str = Field("cpu-2vcpu", description="The self-hosted machine (a price-table row).")
    machine_usd_per_hour: float | None = Field(
        None, ge=0, description="Overrides the machine's table price (null: the table's)."
    )
    utilisation: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Average share of its measured peak throughput a machine delivers "
        "(traffic is bursty: the rest is headroom).",
    )
    min_machines: int = Field(
        1, ge=0, description="Machines kept running at all hours (they cost their hours idle)."
    )
    throughput_rps: float | None = Field(
        None, gt=0, description="Requests/s of one machine (null: read bench_file)."
    )
    bench_file: str = Field(
        "docs/results/bench_serve.json",
        description="scripts/bench_serve.py --out: measured, committed (the benchmark is "
        "not a stage: it needs a registered version and the machine to itself).",
    )
    shares: dict[str, float] | None = Field(
        None,
        description="Share of requests each tier answers, e.g. {self: 0.7, mid: 0.2, "
        "frontier: 0.1} (null: read route_file).",
    )
    route_file: str = Field("reports/route.json", description="The route stage's result.")
    cache_hit_rate: float | None = Field(
        None, ge=0, le=1, description="Semantic cache hit rate (null: read cache_file)."
    )
    cache_file: str = Field("reports/cache.json", description="The cache evaluation's result.")
    triggers: Triggers = Field(default_factory=Triggers)
    report: str = Field("reports/cost.md", description="The Markdown report.")
    result: str = Field("reports/cost.json", description="The typed result (CostResult).")
    plot: str = Field("reports/cost.png", description="Monthly cost vs monthly volume.")


class CostInputError(ConfigError):
    """A measured input is neither in params nor in the file that should hold it."""


def _missing(path: str, what: str, how: str, key: str, example: str) -> CostInputError:
    return CostInputError(
        f"{path} not found: it holds the measured {what}. Make it with `{how}`, or give the "
        f"value: -S cost.{key}={example}"
    )


def measured(cfg: CostConfig) -> CostInputs:
    """The three measured inputs: from params when given, else from their files."""
    rps, rps_src = cfg.throughput_rps, "params (cost.throughput_rps)"
    if rps is None:
        if not Path(cfg.bench_file).exists():
            how = f"python scripts/bench_serve.py --out {cfg.bench_file}"
            raise _missing(cfg.bench_file, "serving throughput", how, "throughput_rps", "1.8")
        bench = _read(cfg.bench_file)
        batched = bench.get("batched") or max(
            (r for r in bench.get("rows", []) if r.get("mode") == "batched"),
            key=lambda r: r["throughput_rps"],
            default={},
        )
        rps = batched.get("requests_per_s", batched.get("throughput_rps"))
        if not rps:
            raise CostInputError(f"{cfg.bench_file}: no batched throughput in it")
        rps_src = cfg.bench_file
    shares, oracle, shares_src = cfg.shares, False, "params (cost.shares)"
    if shares is None:
        if not Path(cfg.route_file).exists():
            example = "'{self: 0.7, mid: 0.2, frontier: 0.1}'"
            raise _missing(cfg.route_file, "tier shares", "dvc repro route", "shares", example)
        route = _read(cfg.route_file, "shares")
        shares, oracle, shares_src = route["shares"], bool(route.get("oracle")), cfg.route_file
    hit, hit_src = cfg.cache_hit_rate, "params (cost.cache_hit_rate)"
    if hit is None:
        if not Path(cfg.cache_file).exists():
            how = "temper cache-eval"
            raise _missing(cfg.cache_file, "cache hit rate", how, "cache_hit_rate", "0.1")
        default = _read(cfg.cache_file, "default")["default"]
        if not isinstance(default, dict) or "hit_rate" not in default:
            raise CostInputError(f"{cfg.cache_file}: no default.hit_rate in it")
        hit, hit_src = float(default["hit_rate"]), cfg.cache_file
    if abs(sum(shares.values()) - 1) > 1e-3 or min(shares.values()) < 0:
        raise CostInputError(f"tier shares must be fractions summing to 1, got {shares}")
    unknown = sorted(set(shares) - {SELF} - set(cfg.tier_models))
    if unknown:
        raise CostInputError(
            f"tier shares name {unknown}, which cost.tier_models does not map to a model"
        )
    return CostInputs(
        throughput_rps=float(rps),
        throughput_source=rps_src,
        shares={k: float(v) for k, v in shares.items()},
        shares_source=shares_src,
        oracle=oracle,
        cache_hit_rate=float(hit),
        cache_source=hit_src,
    )


def _read(path: str, *keys: str) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise CostInputError(f"{path}: expected a JSON object")
    if missing := [k for k in keys if k not in data]:
        raise CostInputError(f"{path}: no {', '.join(missing)} in it")
    return data


def request_usd(price: ModelPrice, traffic: Traffic) -> float:
    """One request at API prices, the shared prefix billed at cached_input when cacheable."""
    prefix = traffic.input_tokens * traffic.cacheable_share
    if price.min_cached_prefix is not None and prefix < price.min_cached_prefix:
        prefix = 0.0
    return price.cost(traffic.input_tokens, traffic.output_tokens, prefix)


def option(
    volume: float, self_share: float | None, api_usd: float, hw: dict[str, float]
) -> CostOption:
    """`volume` requests a month: `self_share` of them through the self-hosted machines
    (None: no machines), `api_usd` each on APIs. `hw`: usd_h, per_hour (requests per
    machine-hour), floor_h (the hours of the machines that never stop), hours (the month's)."""
    hours = 0.0
    if self_share is not None:
        hours = max(hw["floor_h"], volume * self_share / hw["per_hour"])
    api = volume * api_usd
    return CostOption(
        monthly_usd=hours * hw["usd_h"] + api,
        api_usd=api,
        machine_usd=hours * hw["usd_h"],
        machine_hours=hours,
        machines=hours / hw["hours"],
    )


def break_even(a: float, gamma: float, beta: float, hw: dict[str, float]) -> float | None:
    """The monthly volume V where a*V (all-API) equals usd_h*max(floor_h, beta*V/per_hour)
    + gamma*V (an option with machines: `hw` as in `option`); None when it is never cheaper.

    The difference is piecewise linear with a falling slope, negative at V=0: it crosses 0
    iff its last slope a - gamma - usd_h*beta/per_hour is positive, and then within the
    floor (first piece), at usd_h*floor_h / (a - gamma).
    """
    if a - gamma - hw["usd_h"] * beta / hw["per_hour"] <= 0:
        return None
    return hw["usd_h"] * hw["floor_h"] / (a - gamma)


def run(cfg: CostConfig) -> CostResult:
    """Price the traffic profile three ways; write the JSON, Markdown and PNG reports."""
    table = load_prices(cfg.prices)
    models = list(dict.fromkeys([cfg.api_model, *cfg.tier_models.values()]))
    per_request = {m: request_usd(table.model(m, cfg.prices), cfg.traffic) for m in models}
    usd_h = cfg.machine_usd_per_hour
    if usd_h is None:
        usd_h = table.machine(cfg.machine, cfg.prices).usd_per_hour
    inputs = measured(cfg)
    t = cfg.traffic
    volume = t.requests_per_day * t.days_per_month
    hours = 24 * t.days_per_month
    per_hour = inputs.throughput_rps * cfg.utilisation * 3600  # requests per machine-hour
    hw = {"usd_h": usd_h, "per_hour": per_hour, "floor_h": cfg.min_machines * hours}
    hw["hours"] = hours
    a = per_request[cfg.api_model]
    miss = 1 - inputs.cache_hit_rate
    # Every request the cache misses is answered first by the self tier; the deferred share
    # then goes to one API tier (the router's bands), so the machines see all of the misses.
    hybrid_api = miss * sum(
        share * per_request[cfg.tier_models[tier]]
        for tier, share in inputs.shares.items()
        if tier != SELF
    )
    shapes = {"all_api": (None, a), "self_hosted": (1.0, 0.0), "hybrid": (miss, hybrid_api)}
    options = {k: option(volume, share, api, hw) for k, (share, api) in shapes.items()}
    result = CostResult(
        config=cfg.model_dump(mode="json"),
        monthly_requests=volume,
        hours_per_month=hours,
        inputs=inputs,
        prices=_rows_used(cfg, table, models, usd_h),
        per_request_usd={**per_request, "self (marginal)": usd_h / per_hour},
        options=options,
        cheapest=min(options, key=lambda k: options[k].monthly_usd),
        break_even_requests_per_month=break_even(a, 0.0, 1.0, hw),
        hybrid_break_even_requests_per_month=break_even(a, hybrid_api, miss, hw),
        triggers={
            "api_spend": options["all_api"].monthly_usd > cfg.triggers.api_spend_usd,
            "latency_target": cfg.triggers.latency_target,
            "regulated_data": cfg.triggers.regulated_data,
        },
        notes=_notes(cfg, table, models, inputs),
    )
    result.save(cfg.result)
    marks = [v for v in (volume, result.break_even_requests_per_month) if v]
    volumes = _geomspace(min(marks) / 100, max(marks) * 100, 200)
    curves = {
        k: [option(v, *shape, hw).monthly_usd for v in volumes] for k, shape in shapes.items()
    }
    write_plot(cfg.plot, result, volumes, curves)
    write_report(cfg.report, result, Path(cfg.plot).name)
    return result


def _geomspace(lo: float, hi: float, n: int) -> list[float]:
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def _rows_used(
    cfg: CostConfig, table: PriceTable, models: list[str], usd_h: float
) -> dict[str, Any]:
    if cfg.machine_usd_per_hour is not None:
        machine = {"usd_per_hour": usd_h, "source": "params (cost.machine_usd_per_hour)"}
    else:
        machine = table.machines[cfg.machine].model_dump(mode="json")
    return {
        "table": cfg.prices,
        "as_of": str(table.as_of),
        "verified": table.verified,
        "models": {m: table.models[m].model_dump(mode="json") for m in models},
        "machine": {cfg.machine: machine},
    }


def _notes(cfg: CostConfig, table: PriceTable, models: list[str], inputs: CostInputs) -> list[str]:
    """The caveats the report opens with: shutdowns first, then unverified prices."""
    notes = [
        f"{SHUTDOWN}{line}"
        for m in models
        if (line := shutdown_warning(m, table.models[m])) is not None
    ]
    if not table.verified:
        unverified = [m for m in models if not table.models[m].verified]
        if cfg.machine_usd_per_hour is None and not table.machines[cfg.machine].verified:
            unverified.append(cfg.machine)
        which = f" (used here and not read on the vendor's page: {', '.join(unverified)})"
        notes.append(
            f"Prices from {cfg.prices} (as of {table.as_of}) are NOT verified against the "
            f"vendors' current lists{which if unverified else ''}: check each row's source "
            "before a decision."
        )
    if inputs.oracle:
        notes.append(
            "The tier shares come from the route stage with oracle API tiers (gold labels): "
            "the hybrid's accuracy behind them is an upper bound."
        )
    if cfg.triggers.regulated_data:
        notes.append(
            "Regulated data: the hybrid's API tiers would receive requests; only the "
            "self-hosted option (or API tiers you are allowed to use) qualifies."
        )
    return notes
