"""`temper cost`'s report: the Markdown page, the cost-vs-volume PNG and the terminal summary,
all drawn from its typed result (`CostResult`). matplotlib's Agg backend; atomic writes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..evaluation.report import md_table
from ..io import atomic_open
from ..results import CostResult

OPTIONS = {"all_api": "all-API", "self_hosted": "self-hosted", "hybrid": "hybrid"}
SHUTDOWN = "Shutdown: "  # opens a note on a priced model the vendor retires (the summary shows it)


def usd(x: float) -> str:
    return f"${x:,.2f}" if x < 100 else f"${x:,.0f}"


def volume_text(v: float | None) -> str:
    return "none (never cheaper)" if v is None else f"{v:,.0f} requests/month"


def write_plot(
    path: str | Path,
    r: CostResult,
    volumes: Sequence[float],
    curves: dict[str, Sequence[float]],
) -> None:
    """Monthly cost against monthly volume on log axes, one line per option; the break-even
    (self-hosted = all-API) dashed, this profile's volume dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, costs in curves.items():
        ax.plot(volumes, costs, label=OPTIONS[name])
    ax.set_xscale("log")
    ax.set_yscale("log")
    if (v := r.break_even_requests_per_month) is not None and v > 0:
        ax.axvline(v, color="grey", linestyle="--", linewidth=1, label="break-even")
        ax.annotate(
            f"break-even\n{v:,.0f}/month",
            (v, min(min(c) for c in curves.values())),
            fontsize=8,
            xytext=(4, 8),
            textcoords="offset points",
        )
    ax.axvline(r.monthly_requests, color="black", linestyle=":", linewidth=1, label="this profile")
    c = r.config
    ax.set_xlabel("requests per month")
    ax.set_ylabel("USD per month")
    ax.set_title(f"all-API {c['api_model']} vs self-hosted on {c['machine']}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)


def write_report(path: str | Path, r: CostResult, plot: str) -> None:
    """The Markdown page: notes (shutdowns first), inputs, monthly table, prices used."""
    i, c, t = r.inputs, r.config, r.config["traffic"]
    machine_row = next(iter(r.prices["machine"].values()))
    profile = "params (cost.traffic)"
    rows = [
        ["throughput of one machine", f"{i.throughput_rps:g} requests/s", i.throughput_source],
        [
            "tier shares",
            ", ".join(f"{k} {v:.3f}" for k, v in i.shares.items())
            + (" (oracle API tiers)" if i.oracle else ""),
            i.shares_source,
        ],
        ["semantic cache hit rate", f"{i.cache_hit_rate:.3f}", i.cache_source],
        ["requests", f"{t['requests_per_day']:,.0f}/day, {r.monthly_requests:,.0f}/month", profile],
        [
            "tokens per request",
            f"{t['input_tokens']:g} in ({t['cacheable_share']:.0%} a shared prefix), "
            f"{t['output_tokens']:g} out",
            profile,
        ],
        [
            "machine",
            f"{c['machine']} at {machine_row['usd_per_hour']:g} USD/hour, utilisation "
            f"{c['utilisation']:.0%}, at least {c['min_machines']} running",
            machine_row["source"],
        ],
        ["all-API model; hybrid tiers", f"{c['api_model']}; {c['tier_models']}", "params"],
    ]
    options = md_table(
        ["option", "USD/month", "API", "machines", "machine-hours", "machines on average"],
        [
            [
                OPTIONS[k],
                f"**{usd(o.monthly_usd)}**",
                usd(o.api_usd),
                usd(o.machine_usd),
                f"{o.machine_hours:,.0f}",
                f"{o.machines:.2f}",
            ]
            for k, o in r.options.items()
        ],
    )
    prices = [
        [m, f"in {p['input']}, cached in {p['cached_input']}, out {p['output']}", p["source"]]
        + [p["date"], _shutdown_cell(p)]
        for m, p in r.prices["models"].items()
    ]
    held = [k for k, v in r.triggers.items() if v]
    lines = [
        "# Cost: all-API vs self-hosted vs hybrid",
        "",
        *[f"> {n}\n" for n in r.notes],
        "## Inputs",
        "",
        md_table(["input", "value", "from"], rows),
        "",
        "## Monthly cost",
        "",
        options,
        "",
        f"Cheapest for this profile: **{OPTIONS[r.cheapest]}**. Break-even (self-hosted = "
        f"all-API): **{volume_text(r.break_even_requests_per_month)}**; hybrid = all-API: "
        f"{volume_text(r.hybrid_break_even_requests_per_month)}.",
        "",
        f"Triggers that hold: {', '.join(held) if held else 'none'} (API spend over "
        f"{usd(c['triggers']['api_spend_usd'])}/month: {r.triggers['api_spend']}; latency "
        f"target: {r.triggers['latency_target']}; regulated data: {r.triggers['regulated_data']}).",
        "",
        f"![cost vs volume]({plot})",
        "",
        f"## Prices used ({r.prices['table']}, as of {r.prices['as_of']})",
        "",
        md_table(["model", "USD per 1M tokens", "source", "date", "shutdown"], prices),
        "",
        "Formulae and assumptions: docs/cost.md.",
    ]
    with atomic_open(path) as handle:
        handle.write("\n".join(lines) + "\n")


def _shutdown_cell(row: dict) -> str:
    """The row's shutdown date and successor ('-' when the vendor announced none)."""
    # Results written before the table had shutdown dates lack the key.
    if not row.get("shutdown"):
        return "-"
    after = f", successor {row['successor']}" if row.get("successor") else ""
    return f"{row['shutdown']}{after}"


def summary(r: CostResult) -> str:
    """A few lines for the terminal, with a warning line per priced model being shut down."""
    costs = ", ".join(f"{OPTIONS[k]} {usd(o.monthly_usd)}" for k, o in r.options.items())
    held = [k for k, v in r.triggers.items() if v] or ["none"]
    warnings = [f"WARNING: {n[len(SHUTDOWN) :]}" for n in r.notes if n.startswith(SHUTDOWN)]
    return "\n".join(
        [
            f"{r.monthly_requests:,.0f} requests/month: {costs} (cheapest: {OPTIONS[r.cheapest]})",
            f"break-even self-hosted vs all-API: {volume_text(r.break_even_requests_per_month)}",
            f"triggers that hold: {', '.join(held)}",
            *warnings,
        ]
    )
