"""The online wing: what meets traffic.

- `serve/`: `temper serve`, registered versions behind an OpenAI-compatible API
  (micro-batching, hot swap on promotion, keys, metrics; docs/serve.md).
- `route/`: the router behind it: the self tier first, API tiers by confidence band, with
  fallback, daily caps and a breaker; its policy is shared with the route stage's replay
  (docs/route.md).
- `cache/`: the semantic cache in front of the router (exact and similarity layers, keyed by
  model and task version, sqlite, LRU; docs/cache.md).
- `pyfunc`: the loader module that makes a registered version an MLflow pyfunc model.

It reads what the offline wing wrote (registered versions in the MLflow registry, reports,
configs) and uses the shared floor (`evaluation` for generation, constrained decoding, label
confidence and bundles, `tracking` for the registry and pulls, `providers` for the API
tiers); it never imports a stage or the release wing (tests/test_layout.py). The monitor
arrives with issue 16.
"""
