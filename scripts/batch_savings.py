"""What batch mode saves: the sync and batch cost of labelling N clauses, per model.

The cost table in docs/distil.md ("Batch mode") comes from this script. Per request it takes
the distil stage's own estimate: the teacher prompt the stage builds (system prompt with the
label list, the few-shot turns it picks, the clause) counted by `estimate_tokens` (3
characters per token, the budget's conservative rule), averaged over the prepared train
split, and the task's `max_new_tokens` as the answer (what `usd_estimate` assumes). Prices
are configs/prices.yaml's; repairs and prompt caching are left out.

    dvc repro prepare                      # once: data/prepared (about a minute)
    python scripts/batch_savings.py        # 100,000 clauses of the default task
    python scripts/batch_savings.py --clauses 20000 --task configs/tasks/contract_nli.yaml

Ends with: RESULT batch_saved_share <the mean share of the sync cost saved>
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from temper.config import ConfigError, load_params
from temper.io import read_jsonl
from temper.params import TemperParams
from temper.providers.base import Price
from temper.providers.limits import estimate_tokens
from temper.providers.prices import load_prices
from temper.records.sampling import pick_few_shot
from temper.task import load_task

ROOT = Path(__file__).resolve().parents[1]


def request_tokens(task: Any, train: list[dict[str, Any]], few_shot: int, seed: str) -> int:
    """Mean input tokens of one teacher request, as the stage's estimate counts them (rounded
    to a whole token, so the table can be recomputed from the figure the docs quote)."""
    shots = pick_few_shot(task, train, few_shot, seed)
    return round(
        statistics.fmean(estimate_tokens(task.teacher_messages(shots, r["text"])) for r in train)
    )


def savings_rows(
    prices: dict[str, Price], input_tokens: float, output_tokens: float, clauses: int
) -> list[dict[str, Any]]:
    """One row per model with a batch price: sync and batch USD for `clauses` requests."""
    rows = []
    for name, price in prices.items():
        if price.batch_input is None or price.batch_output is None:
            continue
        sync = clauses * price.cost(input_tokens, output_tokens)
        batch = clauses * price.batch().cost(input_tokens, output_tokens)
        rows.append({"model": name, "price": price, "sync": sync, "batch": batch})
    return rows


def markdown(rows: list[dict[str, Any]], clauses: int) -> str:
    """The table as docs/distil.md shows it."""
    lines = [
        f"| model | sync USD per 1M in / out | batch USD per 1M in / out | {clauses // 1000}k "
        "clauses, sync | batch | saved |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        p = row["price"]
        lines.append(
            f"| `{row['model']}` | {p.input:.3f} / {p.output:.2f} | {p.batch_input:.3f} / "
            f"{p.batch_output:.2f} | ${row['sync']:.2f} | ${row['batch']:.2f} | "
            f"${row['sync'] - row['batch']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--prices", default=str(ROOT / "configs" / "prices.yaml"))
    ap.add_argument("--task", help="a task config (default: params.yaml's task)")
    ap.add_argument("--prepared", default=str(ROOT / "data" / "prepared"))
    ap.add_argument("--clauses", type=int, default=100_000)
    ap.add_argument("--input-tokens", type=float, help="per request, instead of measuring")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    task = load_task(args.task or ROOT / params["task"])
    distil = TemperParams.of(params).distil
    if args.input_tokens is None:
        train_path = Path(args.prepared) / "train.jsonl"
        if not train_path.exists():
            print(f"error: {train_path} not found: run `dvc repro prepare` first", file=sys.stderr)
            return 1
        train = list(read_jsonl(train_path))
        args.input_tokens = request_tokens(task, train, distil.few_shot, distil.few_shot_seed)
        print(f"{len(train)} train clauses: {args.input_tokens:.0f} input tokens per request")
    output_tokens = task.max_new_tokens
    print(f"{output_tokens} output tokens per answer (the task's max_new_tokens)")
    table = load_prices(args.prices)
    rows = savings_rows(table.models, args.input_tokens, output_tokens, args.clauses)
    if not rows:
        print(f"error: {args.prices}: no model has batch_input/batch_output", file=sys.stderr)
        return 1
    print(f"prices: {args.prices} as of {table.as_of} (verified: {table.verified})\n")
    print(markdown(rows, args.clauses))
    saved = statistics.fmean(1 - r["batch"] / r["sync"] for r in rows)
    print(f"\nRESULT batch_saved_share {saved:.3f}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
