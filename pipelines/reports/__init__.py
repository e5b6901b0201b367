"""The reports that stages other than evaluate write: route, cache_eval and cost.

Each module draws one stage's typed result (`temper.results`) into its Markdown page and PNG
under `reports/` (atomic writes, matplotlib's Agg backend); the CLI prints their summaries.
The evaluate stage's own report stays in `temper.evaluation.report`. Shared floor: no stage,
release, online or CLI import.
"""
