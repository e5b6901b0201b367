"""`temper cache-eval`: replay real clauses through the semantic cache (docs/cache.md)."""

from __future__ import annotations

import typer

from .common import PARAMS, ParamsOpt, SetOpt, load


def cache_eval_cmd(params: ParamsOpt = PARAMS, set_: SetOpt = None) -> None:
    """Measure the cache's hit and wrong-hit rates per threshold; choose the default."""
    from ..reports.cache import pct
    from ..stages import cache_eval

    p = load(params, set_)
    cfg = p.cache_eval
    result = cache_eval.run(cfg, p.cache)
    d = result.default
    where = "exact layer only" if d.threshold is None else f"threshold {d.threshold:.2f}"
    met = "meets" if d.bound_met else "no threshold meets"
    typer.echo(
        f"cache: {result.exact.requests} requests; default {where} ({met} the bound): hit rate "
        f"{100 * d.hit_rate:.1f}%, wrong among hits {pct(d.wrong_among_hits)} "
        f"(report: {cfg.report})"
    )
