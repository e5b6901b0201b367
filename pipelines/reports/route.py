"""The route stage's report: `reports/route.md` and the accuracy-vs-self-share curve PNG."""

from __future__ import annotations

import math
from pathlib import Path

from ..io import atomic_open
from ..results import Estimate, RouteResult


def _missing(value: float | None) -> bool:
    return value is None or math.isnan(value)


def _ci(e: Estimate, scale: float = 1.0, digits: int = 3, none: str = "n/a") -> str:
    """`value [low, high]`; `none` when there is no value (e.g. no answer kept)."""
    if _missing(e.value):
        return none
    if _missing(e.ci_low) or _missing(e.ci_high):
        return f"{e.value * scale:.{digits}f}"
    if e.ci_low == e.ci_high:  # every resample agrees (e.g. equal per-answer batch times)
        return f"{e.value * scale:.{digits}f} (no spread over resamples)"
    return (
        f"{e.value * scale:.{digits}f} [{e.ci_low * scale:.{digits}f}, "
        f"{e.ci_high * scale:.{digits}f}]"
    )


def render(r: RouteResult) -> str:
    oracle = (
        " The API tiers are the **gold labels (an oracle)**: their answers count as right, so "
        "the routed accuracy is an upper bound, not a measurement of any API."
        if r.oracle
        else ""
    )
    target = (
        f"accuracy of the kept answers >= {r.target_value:.2f} (one-sided lower bound)"
        if r.target == "accuracy"
        else f"self share {r.target_value:.2f}"
    )
    chosen = (
        f"Winner `{r.winner}`."
        if r.passed_gates
        else f"**No candidate passed the gates** (nothing is released): routing shown for "
        f"`{r.winner}`, evaluate's choice on validation."
    )
    lines = [
        "# Routing: the self-hosted model first, API tiers for the unsure answers",
        "",
        f"{chosen} Threshold fitted on the {r.fitted_on} split ({r.n_fit} answers) "
        f"for {target}: **{r.threshold:.4f}**"
        + ("" if r.target_reached else " (target not reachable: only certain answers kept)")
        + f"; replayed on the test split ({r.n_test} answers) through the serving policy."
        + oracle,
        "",
        "| | value [95% CI] |",
        "| --- | --- |",
        f"| accuracy, routed | {_ci(r.accuracy)} |",
        f"| accuracy, self tier alone | {_ci(r.self_only_accuracy)} |",
        f"| accuracy of the answers the self tier kept | "
        f"{_ci(r.kept_accuracy, none='n/a (it kept none)')} |",
        f"| cost per 1,000 requests, routed (USD) | {_ci(r.usd_per_1k, digits=4)} |",
        f"| cost per 1,000 requests, self tier alone (USD) | {r.self_usd_per_1k:.4f} |",
    ]
    for tier, usd in r.all_api_usd_per_1k.items():
        lines.append(f"| cost per 1,000 requests, all to `{tier}` ({r.prices[tier]}) | {usd:.4f} |")
    if r.self_latency_ms_p50 is not None and r.self_latency_ms_p95 is not None:
        lines.append(
            f"| self tier latency p50 / p95 (ms per request, batched CPU evaluation) | "
            f"{_ci(r.self_latency_ms_p50, digits=0)} / {_ci(r.self_latency_ms_p95, digits=0)} |"
        )
    for tier, n in r.api_failures.items():
        lines.append(f"| `{tier}`: answers that failed (counted wrong) | {n} |")
    lines += ["", "| tier | share of requests [95% CI] |", "| --- | --- |"]
    for tier in r.tiers:
        lines.append(f"| {tier} | {_ci(r.share_estimates[tier])} |")
    lines += [
        "",
        "API answers are priced at the listed model's price-table row "
        f"(as of {r.prices_as_of}, {'verified' if r.prices_verified else 'NOT verified'}), "
        "chars/4 tokens for the teacher's prompt and the answer (a real tier: what it "
        "charged). API-tier latency is not part of this replay.",
        "",
        "![accuracy vs self share](route_curve.png)",
        "",
    ]
    return "\n".join(lines)


def write_route_reports(r: RouteResult, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    md = out / "route.md"
    with atomic_open(md) as handle:
        handle.write(render(r))
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label in ((r.curve_fit, r.fitted_on), (r.curve_test, "test")):
        ax.plot(
            [p["self_share"] for p in points],
            [p["accuracy"] for p in points],
            marker=".",
            label=f"{label}: routed (API = oracle)" if r.oracle else f"{label}: routed",
        )
    ax.axvline(r.shares["self"], color="grey", linestyle="--", label="calibrated threshold")
    ax.set_xlabel("share of requests the self tier keeps")
    ax.set_ylabel("accuracy")
    gated = "" if r.passed_gates else " (failed its gates)"
    ax.set_title(f"routing {r.winner}{gated}: accuracy vs self share")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = out / "route_curve.png"
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(png)
    return [md, png]
