"""Micro-batching: requests that arrive together are generated together.

One worker thread owns the model (generation is compute-bound: two at once on the same cores
only slow each other down). It takes the oldest queued job and waits at most `max_wait_ms`
(counted from the job's arrival, or from the end of the previous batch if that is later, so
the clients just answered can join) for more jobs that may share its batch (same served
version, same schema, same sampling), then runs up to `max_batch_size` of them in one
`engine.run_batch`. A full queue refuses new jobs (the server answers 429 with retry-after); a
job cancelled while queued (client gone, timeout) is dropped before it costs anything, one
cancelled while running ends at its next token.

Hand-written rather than a library: the batching policy is a dozen lines around a condition
variable, and what it batches (rows of `model.generate` with their own stops) is ours.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...errors import TemperError
from .engine import Job

log = logging.getLogger(__name__)


class QueueFull(TemperError):
    """The queue holds `max_queue` jobs already."""


@dataclass
class Batch:
    """What the worker hands the runner: jobs sharing one key, and the key's context."""

    jobs: list[Job]
    context: Any


class Scheduler:
    """The queue and its worker: `submit` jobs, `runner(batch)` generates them."""

    def __init__(
        self,
        runner: Callable[[Batch], None],
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int, int], None] | None = None,
    ):
        self.runner, self.max_batch, self.max_wait = runner, max_batch_size, max_wait_s
        self.max_queue, self.on_batch = max_queue, on_batch
        self.queue: list[tuple[Job, Any, Callable[[Job], None]]] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.running = 0
        self.free_since = 0.0  # perf_counter() when the last batch ended
        self.thread = threading.Thread(target=self._work, name="temper-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def depth(self) -> int:
        return len(self.queue)

    def submit(self, job: Job, context: Any, done: Callable[[Job], None]) -> None:
        """Queue `job`; `done(job)` is called from the worker thread when it has ended."""
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests queued")
            self.queue.append((job, context, done))
            self.cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Stop `job`: dropped if still queued (its `done` is called), else ends at its next token."""
        job.cancelled.set()
        with self.cond:
            hit = [q for q in self.queue if q[0] is job]
            self.queue = [q for q in self.queue if q[0] is not job]
        for queued, _, done in hit:
            queued.finish_reason = "cancelled"
            done(queued)

    def _take(self) -> list[tuple[Job, Any, Callable[[Job], None]]]:
        """Wait for work, then the oldest job and the queued jobs that may join it."""
        with self.cond:
            while not self.queue and not self.stopping:
                self.cond.wait()
            if not self.queue:
                return []
            first = self.queue[0][0]
            # Wait from when the worker became free too: the clients of the batch just answered
            # are sending their next requests, which should join this batch, not the next.
            deadline = max(first.enqueued, self.free_since) + self.max_wait
            while True:
                mates = [q for q in self.queue if q[0].key == first.key][: self.max_batch]
                left = deadline - time.perf_counter()
                if len(mates) >= self.max_batch or left <= 0 or self.stopping:
                    break
                self.cond.wait(timeout=left)
            taken = {id(q[0]) for q in mates}
            self.queue = [q for q in self.queue if id(q[0]) not in taken]
            self.running = len(mates)
            return mates

    def _work(self) -> None:
        while True:
            items = self._take()
            if not items:
                return  # stopping, queue empty
            jobs = [j for j, _, _ in items]
            if self.on_batch is not None:
                self.on_batch(len(jobs), len(self.queue))
            try:
                self.runner(Batch(jobs, items[0][1]))
            except Exception as err:  # noqa: BLE001 - a failed batch fails its requests only
                log.exception("batch of %d failed", len(jobs))
                for job in jobs:
                    job.error = err
            for job, _, done in items:
                done(job)
            with self.cond:
                self.running = 0
                self.free_since = time.perf_counter()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued and running, then end the worker."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=timeout)
