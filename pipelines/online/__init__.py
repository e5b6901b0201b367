"""The online wing: what meets traffic (serving now; routing, cache and monitoring to come).

- `serve/`: `temper serve`, registered versions behind an OpenAI-compatible API
  (micro-batching, hot swap on promotion, keys, metrics; docs/serve.md).
- `cache/`: the semantic cache in front of the router (exact and similarity layers, keyed by
  model and task version, sqlite, LRU; docs/cache.md).
- `pyfunc`: the loader module that makes a registered version an MLflow pyfunc model.

It reads what the offline wing wrote (registered versions in the MLflow registry, reports,
configs) and uses the shared floor (`evaluation` for generation, constrained decoding, label
confidence and bundles, `tracking` for the registry and pulls); it never imports a stage or
the release wing (tests/test_layout.py). The router, the cache and the monitor arrive with
issues 15-16.
"""
