"""Production monitoring (docs/monitor.md): what `temper serve` answered, and whether it still holds.

config (the `monitor:` section) -> store (sqlite: requests, verdicts, reviews, probes) -> log
(the server's non-blocking writer) -> judge (an LLM verdict on a sampled share) -> review
(human labels out and back, agreement, judge calibration) -> drift (inputs, outputs) and cusum
(quality) -> probe (silent vendor updates) -> report (markdown, plots, exit code, gauges) ->
gauges (exported by `temper serve`), dashboard (Grafana JSON from code), trace (MLflow).
"""

from __future__ import annotations

from typing import Any

from .config import MonitorConfig
from .log import RequestLog
from .store import LoggedRequest, MonitorStore, sampled

__all__ = [
    "LoggedRequest",
    "MonitorConfig",
    "MonitorStore",
    "RequestLog",
    "open_request_log",
    "sampled",
]


def open_request_log(cfg: MonitorConfig, metrics: Any = None, mlflow_cfg: Any = None) -> RequestLog:
    """The server's request log (started by the app), counting into `metrics` (ServeMetrics),
    tracing `monitor.trace_share` of the requests to MLflow (`mlflow_cfg`, an MlflowConfig)."""
    from ..cache.embedder import SentenceEmbedder
    from .trace import Tracer

    def embedder() -> SentenceEmbedder:
        return SentenceEmbedder(cfg.embedder)  # torch threads stay the server's

    return RequestLog(
        cfg,
        embedder_factory=embedder,
        on_written=metrics.log_rows.inc if metrics is not None else None,
        on_dropped=metrics.log_dropped.inc if metrics is not None else None,
        tracer=Tracer(cfg, mlflow_cfg) if mlflow_cfg is not None and cfg.trace_share > 0 else None,
    )
