"""The online wing: what meets traffic (serving, routing, cache, monitoring).

It reads what the offline wing wrote (registered versions in the MLflow registry, reports,
configs) and uses the shared floor (`evaluation.generation` for constrained generation and
label confidence, `providers` for the API tiers, `tracking` for the registry); it never imports
a stage module (tests/test_layout.py). Nothing lives here yet: `temper serve`, the router, the
cache and the monitor arrive with issues 14-16.
"""
