"""`temper serve`: registered versions behind an OpenAI-compatible HTTP API (docs/serve.md).

config (the `serve:` section) -> auth (keys, bind check) -> adapters (pull, open, hot swap)
-> engines (the boundary: builtin = scheduler's micro-batches through engine's
`model.generate`; vllm_engine = a supervised or attached vLLM server) -> completions
(request -> job -> OpenAI body / SSE) -> routing (router and cache) -> app (routes, the
request gate, start and stop); metrics and logs beside them; vllm prints the command of a
vLLM server for the same versions, for a platform team that runs its own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...config import ConfigError
from ..cache.config import CacheConfig
from ..monitor.config import MonitorConfig
from ..route.config import RouteConfig
from .config import ServeConfig

if TYPE_CHECKING:
    from ..cache import SemanticCache
    from ..monitor import RequestLog
    from ..route import Router
    from .adapters import Source
    from .metrics import ServeMetrics

log = logging.getLogger("temper.serve")

__all__ = ["ServeConfig", "serve"]


def serve(
    cfg: ServeConfig,
    keys: list[str],
    base_hint: str | None = None,
    route: RouteConfig | None = None,
    cache: CacheConfig | None = None,
    monitor: MonitorConfig | None = None,
    mlflow_cfg: Any = None,
    vllm_cfg: Any = None,
) -> None:
    """Run the server until SIGINT/SIGTERM (then: stop accepting, drain, exit).

    `keys`: the accepted API keys' digests (`auth.load_keys`; none: loopback only).
    `base_hint`: a local base model folder used when its hash is a bundle's (model.dir).
    `route`: with `enabled`, unsure answers go to its API tiers (temper.online.route).
    `cache`: with `serve.semantic_cache`, repeats are answered from it (temper.online.cache).
    `monitor`: with `log`, every chat request goes to its request log (temper.online.monitor);
    `mlflow_cfg` (an MlflowConfig) is where `monitor.trace_share` of them are traced.
    `vllm_cfg` (engines.VllmConfig): how `serve.engine: vllm` starts vLLM.
    """
    from . import auth, logs
    from .adapters import Loader, ModelTable, Source
    from .app import create_app
    from .engines import make_engine
    from .metrics import ServeMetrics

    logs.setup(cfg.log_file)
    auth.check_bind(cfg.host, keys)
    _check_vllm(cfg, vllm_cfg)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    router, semantic = _open_routing(cfg, route, cache)
    sources = [Source.parse(spec) for spec in cfg.models]
    metrics = ServeMetrics(monitor.state_file if monitor is not None else None)
    request_log = _open_request_log(monitor, metrics, mlflow_cfg)
    log_dir = Path(cfg.log_file).parent if cfg.log_file else Path(cfg.cache_dir)
    engine = make_engine(cfg, metrics, vllm_cfg, log_dir)
    table = ModelTable(
        sources,
        Loader(cfg.cache_dir, cfg.base_dir, engine, base_hint),
        cfg.watch_interval_s,
        metrics,
    )
    app = create_app(cfg, table, keys, metrics, router, semantic, request_log)
    _log_start(cfg, keys, sources, router, monitor, request_log)
    _run(app, cfg)


def _check_vllm(cfg: ServeConfig, vllm_cfg: Any) -> None:
    """Fail before anything loads when `serve.engine: vllm` has no vLLM environment to start."""
    if cfg.engine == "vllm" and not cfg.engine_url:
        from ...engines import VllmConfig

        python = Path((vllm_cfg or VllmConfig()).python)
        if not python.exists():
            raise ConfigError(
                f"serve.engine vllm: vllm.python {python} does not exist: build vLLM's "
                "environment with `make vllm`, or attach to a running vLLM (serve.engine_url)"
            )


def _open_routing(
    cfg: ServeConfig, route: RouteConfig | None, cache: CacheConfig | None
) -> tuple[Router | None, SemanticCache | None]:
    """The router and the semantic cache (either may be None), both checked before any
    model loads; the cache alone still needs a router, with the self tier only."""
    router = None
    if route is not None and route.enabled:
        from ..route import Router

        if cfg.prompt != "task":
            raise ConfigError("route.enabled needs serve.prompt=task (API tiers answer the task)")
        router = Router.open(route)  # privacy guard and prices checked before anything loads
    semantic = None
    if cfg.semantic_cache:
        from ..cache import SemanticCache
        from ..route import Router

        if cfg.prompt != "task":
            raise ConfigError("serve.semantic_cache needs serve.prompt=task (it keys on the text)")
        semantic = SemanticCache.from_config(cache or CacheConfig())
        router = router or Router(RouteConfig(), [])  # the self tier alone behind the cache
    return router, semantic


def _open_request_log(
    monitor: MonitorConfig | None, metrics: ServeMetrics, mlflow_cfg: Any
) -> RequestLog | None:
    """The monitor's request log when `monitor.log` asks for one, else None."""
    if monitor is not None and monitor.log:
        from ..monitor import open_request_log

        return open_request_log(monitor, metrics, mlflow_cfg)
    return None


def _log_start(
    cfg: ServeConfig,
    keys: list[str],
    sources: list[Source],
    router: Router | None,
    monitor: MonitorConfig | None,
    request_log: RequestLog | None,
) -> None:
    """The one `starting` log line: what is served, where, and how it is guarded."""
    log.info(
        "starting",
        extra={
            "host": cfg.host,
            "port": cfg.port,
            "models": [s.spec for s in sources],
            "engine": cfg.engine,
            "api_keys": len(keys),  # how many, never which
            "route_tiers": list(router.tiers) if router else [],
            "monitor_log": monitor.path if request_log is not None else None,
        },
    )


def _run(app: Any, cfg: ServeConfig) -> None:
    """Serve `app` with uvicorn until a signal; its own access log off (the gate logs)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(cfg.drain_timeout_s) or None,
        lifespan="on",
    )
    uvicorn.Server(config).run()
