"""`temper cost`: monthly cost of all-API, self-hosted and hybrid serving, and the break-even."""

from __future__ import annotations

import typer

from .common import PARAMS, ParamsOpt, SetOpt, load


def cost_cmd(params: ParamsOpt = PARAMS, set_: SetOpt = None) -> None:
    """Price a traffic profile three ways from the price table and the measured throughput,
    tier shares and cache hit rate; write reports/cost.{md,json,png}. Warns about each priced
    model the vendor shuts down (its date, days left, the table's successor)."""
    from ..reports.cost import summary
    from ..stages import cost

    result = cost.run(load(params, set_).cost)
    typer.echo(summary(result))
