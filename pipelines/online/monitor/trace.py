"""Served requests as MLflow traces (MLflow Tracing), sampled, so a data scientist sees production
requests in the same UI as the training runs (the experiment `monitor.trace_experiment`).

Traces are written by the request log's thread after the row is stored, never on the request
path. A trace carries the answer, the tier, the version, tokens, latency and confidence; the
input text only under `monitor.log_inputs` (redacted), else its hash, as in the log itself.
The span's start and end are the request's own times, not the time of writing.
"""

from __future__ import annotations

import logging
from typing import Any

from ...tracking import MlflowConfig
from .config import MonitorConfig
from .store import LoggedRequest, sampled

log = logging.getLogger("temper.monitor")
SALT = "temper-trace-v1"
GIVE_UP_AFTER = 5


class Tracer:
    def __init__(self, cfg: MonitorConfig, mlflow_cfg: MlflowConfig) -> None:
        self.cfg = cfg
        self.mlflow_cfg = mlflow_cfg.model_copy(update={"experiment": cfg.trace_experiment})
        self._experiment: str | None = None
        self.failed = False  # after GIVE_UP_AFTER failures in a row (a store that is gone)
        self.failures = 0

    def wants(self, row: LoggedRequest) -> bool:
        return not self.failed and sampled(row.id, SALT, self.cfg.trace_share)

    def trace(self, row: LoggedRequest) -> None:
        """One request as a trace with one CHAT_MODEL span; an error stops tracing (logged)."""
        try:
            import mlflow

            from ...tracking.runs import setup

            if self._experiment is None:
                self._experiment = setup(self.mlflow_cfg)
            start = int(row.ts * 1e9 - (row.latency_ms or 0) * 1e6)
            inputs: dict[str, Any] = {"input_hash": row.input_hash}
            if self.cfg.log_inputs and row.input_text is not None:
                inputs["input"] = row.input_text
            span = mlflow.start_span_no_context(
                "chat.completions",
                span_type="CHAT_MODEL",
                inputs=inputs,
                attributes={
                    "temper.request_id": row.id,
                    "temper.model": row.model or "",
                    "temper.version": row.version or "",
                    "temper.tier": row.tier or "",
                    "temper.cache": row.cache or "",
                },
                tags={"temper.request_id": row.id, "temper.tier": row.tier or ""},
                experiment_id=self._experiment,
                start_time_ns=start,
            )
            span.end(
                outputs={"answer": row.answer, "labels": row.labels},
                attributes={
                    "temper.status": row.status,
                    "temper.latency_ms": row.latency_ms,
                    "temper.prompt_tokens": row.prompt_tokens,
                    "temper.completion_tokens": row.completion_tokens,
                    "temper.confidence": row.confidence,
                    "temper.cost_usd": row.cost_usd,
                },
                status="OK" if row.status == 200 else "ERROR",
                end_time_ns=int(row.ts * 1e9),
            )
        except Exception as err:  # noqa: BLE001 - tracing is best effort, the log goes on
            self.failures += 1
            self.failed = self.failures >= GIVE_UP_AFTER
            log.warning(
                "monitor: MLflow tracing failed%s: %s", ", turned off" if self.failed else "", err
            )
            return
        self.failures = 0

    def flush(self) -> None:
        """Wait for MLflow's asynchronous trace export (this thread is off the request path),
        so a batch's traces are stored once its rows are."""
        if self._experiment is None or self.failed:
            return
        try:
            import mlflow

            mlflow.flush_trace_async_logging()
        except Exception as err:  # noqa: BLE001 - as above
            log.warning("monitor: MLflow trace export failed: %s", err)
