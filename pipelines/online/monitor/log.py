"""The request log's writer: `temper serve` hands each finished request over; a thread writes.

The request path only puts a small dict on a bounded queue (`put_nowait`): it never waits for
sqlite, the embedder or the label confidences, and a full queue drops the row (counted as
`temper_monitor_log_dropped_total`) instead of slowing the request. The writer thread takes
rows in batches, computes what is expensive (confidences, one embedding batch), decides
whether the text is kept, and commits the batch in one transaction; an error there drops that
batch (counted, logged) and the thread goes on. Old rows are pruned every few minutes.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ...providers.privacy import REDACTIONS, redact
from ...task import parse_answer
from ..cache.embedder import text_key
from ..route.policy import decisive_confidence
from .config import MonitorConfig
from .store import LoggedRequest, MonitorStore, sampled

log = logging.getLogger("temper.monitor")
BATCH = 64
PRUNE_EVERY_S = 300.0


def keeps_text(cfg: MonitorConfig, request_id: str, confidence: float | None) -> bool:
    """Whether a row keeps its (redacted) input: always with `log_inputs`; otherwise only the
    rows the judge or the reviewers will read (sampled, or unsure answers)."""
    return (
        cfg.log_inputs
        or sampled(request_id, cfg.judge.salt, cfg.judge.share)
        or sampled(request_id, cfg.review.salt, cfg.review.share)
        or (confidence is not None and confidence < cfg.review.low_confidence)
    )


def build_row(cfg: MonitorConfig, item: dict[str, Any]) -> tuple[LoggedRequest, str | None]:
    """A request's row from what the server recorded about it (`item`: the gate's `info`
    plus id, status, latency), and the input text to embed (not stored unless kept)."""
    from ...evaluation.confidence import label_confidences

    info = item["info"]
    text, answer, served = info.get("_text"), info.get("_answer"), info.get("_served")
    parsed = parse_answer(answer) if answer else None
    labels: dict[str, Any] = {}
    confidence = info.get("_confidence")
    if served is not None and isinstance(parsed, dict):
        names = [f.name for f in served.task.fields if f.kind == "label"]
        labels = {n: parsed.get(n) for n in names}
        job = info.get("_job")
        if "_confidence" not in info and job is not None and job.token_ids:
            conf = label_confidences(
                served.task, served.tokenizer, job.token_ids, job.logprobs, parsed
            )
            confidence = decisive_confidence(conf, None)
    tier = info.get("tier") or ("self" if answer is not None else None)
    row = LoggedRequest(
        id=item["id"],
        ts=item["ts"],
        model=info.get("model"),
        version=info.get("version"),
        tier=tier,
        cache=info.get("cache"),
        status=item["status"],
        latency_ms=item["latency_ms"],
        prompt_tokens=info.get("prompt_tokens"),
        completion_tokens=info.get("completion_tokens"),
        cost_usd=info.get("cost_usd"),
        answer=answer,
        labels=labels,
        confidence=confidence,
        input_hash=text_key(text) if text else None,
    )
    if text and keeps_text(cfg, row.id, confidence):
        row.input_text = redact(text, list(REDACTIONS))
    return row, text


class RequestLog:
    """A bounded queue and the thread that empties it into a `MonitorStore`."""

    def __init__(
        self,
        cfg: MonitorConfig,
        embedder_factory: Callable[[], Any] | None = None,
        on_written: Callable[[int], None] | None = None,
        on_dropped: Callable[[int], None] | None = None,
        tracer: Any = None,
    ) -> None:
        self.cfg = cfg
        self.tracer = tracer  # a trace.Tracer (MLflow), or None
        self.queue: queue.Queue[dict[str, Any] | None] = queue.Queue(cfg.queue_size)
        self._embedder_factory = embedder_factory if cfg.embed else None
        self._embedder: Any = None
        self._on_written = on_written or (lambda n: None)
        self._on_dropped = on_dropped or (lambda n: None)
        self._thread = threading.Thread(target=self._run, name="temper-monitor-log", daemon=True)
        self.written = self.dropped = 0

    def start(self) -> RequestLog:
        self._thread.start()
        return self

    def submit(self, request_id: str, info: dict[str, Any], status: int, seconds: float) -> None:
        """Queue one finished request; never blocks, never raises."""
        item = {
            "id": request_id,
            "ts": time.time(),
            "status": status,
            "latency_ms": round(seconds * 1000, 1),
            "info": dict(info),
        }
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self._drop(1)

    def depth(self) -> int:
        return self.queue.qsize()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (up to `timeout`), then stop; what is left is counted dropped."""
        if self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self.queue.put(None, timeout=timeout)
            self._thread.join(timeout)
        if self._thread.is_alive():
            left = self.queue.qsize()
            log.warning("monitor: log not flushed in %.0f s; %d queued rows lost", timeout, left)
            self._drop(left)

    def _drop(self, n: int) -> None:
        self.dropped += n
        self._on_dropped(n)

    def _load_embedder(self) -> None:
        if self._embedder_factory is None or self._embedder is not None:
            return
        try:
            self._embedder = self._embedder_factory()
        except Exception as err:  # noqa: BLE001 - no embeddings, the log goes on
            log.warning("monitor: no embedder (%s); rows are logged without embeddings", err)
            self._embedder_factory = None

    def _embed(self, texts: list[str]) -> list[Any]:
        self._load_embedder()
        if self._embedder is None or not texts:
            return [None] * len(texts)
        return list(self._embedder.embed(texts))

    def _run(self) -> None:
        store = MonitorStore(self.cfg.path)
        last_prune = 0.0
        # Loaded now, beside the model load, rather than on the first request: a first
        # request just before shutdown would otherwise wait out the load (seconds on a CPU).
        self._load_embedder()
        try:
            while True:
                first = self.queue.get()
                items = [first]
                while len(items) < BATCH:
                    try:
                        items.append(self.queue.get_nowait())
                    except queue.Empty:
                        break
                stop = None in items
                items = [i for i in items if i is not None]
                if items:
                    self._write(store, items)
                if time.monotonic() - last_prune > PRUNE_EVERY_S:
                    last_prune = time.monotonic()
                    self._prune(store)
                if stop:
                    return
        finally:
            store.close()

    def _write(self, store: MonitorStore, items: list[dict[str, Any]]) -> None:
        try:
            built = [build_row(self.cfg, item) for item in items]
            rows = [row for row, _ in built]
            todo = [(row, text) for row, text in built if text]
            for (row, _), vector in zip(todo, self._embed([t for _, t in todo]), strict=True):
                row.embedding = vector
            store.add_requests(rows)
        except Exception:  # noqa: BLE001 - a bad batch is dropped and counted, never fatal
            log.exception("monitor: %d request rows could not be written", len(items))
            self._drop(len(items))
            return
        self.written += len(rows)
        self._on_written(len(rows))
        if self.tracer is not None:
            traced = [row for row in rows if self.tracer.wants(row)]
            for row in traced:
                self.tracer.trace(row)
            if traced:
                self.tracer.flush()

    def _prune(self, store: MonitorStore) -> None:
        try:
            gone = store.prune(self.cfg.retention_days * 86400, self.cfg.max_rows)
        except Exception:  # noqa: BLE001 - retried at the next prune
            log.exception("monitor: pruning failed")
            return
        if gone:
            log.info("monitor: pruned %d old request rows", gone)
