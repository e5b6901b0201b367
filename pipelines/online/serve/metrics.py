"""Prometheus metrics of `temper serve`, named after the OpenTelemetry GenAI conventions.

`gen_ai.server.request.duration`, `gen_ai.server.time_to_first_token` and
`gen_ai.server.time_per_output_token` become `gen_ai_server_*_seconds` histograms (OTel's
Prometheus naming: dots to underscores, the unit as a suffix) labelled by
`gen_ai_request_model`, and token counts `gen_ai_server_token_usage_total` by
`gen_ai_token_type` (input / output), so dashboards written for those names carry over. The
server's own state is `temper_*`. Each app has its own registry (no process-global state),
exposed at GET /metrics.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
PER_TOKEN = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2)


class ServeMetrics:
    def __init__(self, monitor_state: str | None = None) -> None:
        """`monitor_state`: the monitor's state file, whose gauges are exported too."""
        self.registry = CollectorRegistry()
        # defined in this order so that /metrics lists them in it
        self._define_gen_ai(self.registry)
        self._define_server(self.registry)
        self._define_route(self.registry)
        self._define_monitor_log(self.registry)
        self._define_engine(self.registry)
        self.engine_gauge.set(1)
        if monitor_state:
            from ..monitor.gauges import StateCollector

            self.registry.register(StateCollector(monitor_state))
        self.registry_gauge.set(1)

    def _define_gen_ai(self, r: CollectorRegistry) -> None:
        """The OpenTelemetry GenAI server metrics, so dashboards written for them carry over."""
        model = ["gen_ai_operation_name", "gen_ai_request_model"]
        self.duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Time from request to last byte of the answer.",
            [*model, "error_type"],
            buckets=LATENCY,
            registry=r,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from request to the first generated token.",
            model,
            buckets=LATENCY,
            registry=r,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per generated token after the first.",
            model,
            buckets=PER_TOKEN,
            registry=r,
        )
        self.tokens = Counter(
            "gen_ai_server_token_usage",
            "Tokens processed, by type (input: prompt, output: completion).",
            [*model, "gen_ai_token_type"],
            registry=r,
        )

    def _define_server(self, r: CollectorRegistry) -> None:
        """The server's own state: requests, queue and batches, loaded versions, registry."""
        self.requests = Counter(
            "temper_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.queue = Gauge("temper_queue_depth", "Requests waiting for a batch.", registry=r)
        self.batch = Histogram(
            "temper_batch_size",
            "Requests per generated batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.loaded = Gauge(
            "temper_adapter_loaded",
            "1 for each loaded adapter version (0 once freed).",
            ["model_id", "registered_model", "version"],
            registry=r,
        )
        self.registry_gauge = Gauge(
            "temper_registry_up", "1 when the last registry check succeeded.", registry=r
        )
        self.swaps_failed = Counter(
            "temper_swap_failures",
            "New versions that could not be loaded.",
            ["model_id"],
            registry=r,
        )

    def _define_route(self, r: CollectorRegistry) -> None:
        """Who answered (router tiers, semantic cache) and what the answers cost."""
        self.routed = Counter(
            "temper_route_answers",
            "Answers by the tier that gave them (last_resort: the self tier's, flagged).",
            ["tier", "last_resort"],
            registry=r,
        )
        self.tier_failures = Counter(
            "temper_route_tier_failures",
            "API tier attempts that gave no answer, by reason.",
            ["tier", "reason"],
            registry=r,
        )
        self.route_usd = Counter(
            "temper_route_cost_usd", "What the answers cost, by tier (USD).", ["tier"], registry=r
        )
        self.cache_hits = Counter(
            "temper_cache_hits",
            "Answers served by the semantic cache, by layer (exact / similar).",
            ["kind"],
            registry=r,
        )

    def _define_monitor_log(self, r: CollectorRegistry) -> None:
        """The monitor's request log: rows written, dropped and waiting."""
        self.log_rows = Counter(
            "temper_monitor_log_rows", "Request rows written to the monitor's log.", registry=r
        )
        self.log_dropped = Counter(
            "temper_monitor_log_dropped",
            "Request rows the monitor's log dropped (queue full, write error); never requests.",
            registry=r,
        )
        self.log_queue = Gauge(
            "temper_monitor_log_queue", "Request rows waiting to be written.", registry=r
        )

    def _define_engine(self, r: CollectorRegistry) -> None:
        """The model engine's health: up, and how often its supervisor restarted it."""
        self.engine_gauge = Gauge(
            "temper_engine_up", "1 while the model engine answers (vLLM: its process).", registry=r
        )
        self.engine_restarts = Counter(
            "temper_engine_restarts", "Times the supervised engine was restarted.", registry=r
        )

    def adapter_loaded(self, served: Any, on: bool) -> None:
        labels = (served.source.id, served.source.name or "", served.version or "")
        self.loaded.labels(*labels).set(1 if on else 0)

    def registry_up(self, ok: bool) -> None:
        self.registry_gauge.set(1 if ok else 0)

    def engine_up(self, ok: bool) -> None:
        self.engine_gauge.set(1 if ok else 0)

    def engine_restarted(self) -> None:
        self.engine_restarts.inc()

    def swap_failed(self, model_id: str) -> None:
        self.swaps_failed.labels(model_id).inc()

    def route(self, routed: Any) -> None:
        """Record one routed answer (`routed` a route.Routed)."""
        self.routed.labels(routed.tier, str(routed.last_resort).lower()).inc()
        self.route_usd.labels(routed.tier).inc(routed.usd)
        for attempt in routed.attempts:
            self.tier_failures.labels(attempt["tier"], attempt["reason"]).inc()

    def cache_hit(self, kind: str) -> None:
        self.cache_hits.labels(kind).inc()

    def on_batch(self, size: int, left: int) -> None:
        self.batch.observe(size)
        self.queue.set(left)

    def answered(self, model: str, job: Any, prompt_tokens: int, t0: float) -> None:
        """Record one finished generation (`job` an engine.Job, `t0` the request's start)."""
        labels = ("chat", model)
        if job.first_token is not None:
            self.ttft.labels(*labels).observe(job.first_token - t0)
        n = len(job.token_ids)
        if n > 1 and job.finished is not None and job.first_token is not None:
            self.tpot.labels(*labels).observe((job.finished - job.first_token) / (n - 1))
        self.tokens.labels(*labels, "input").inc(prompt_tokens)
        self.tokens.labels(*labels, "output").inc(n)
