"""The engine boundary: everything above it (auth, limits, errors, router, cache, request log,
metrics, traces, hot swap) is the same code whichever engine generates.

An engine, in the spirit of vLLM's `EngineClient`, does five things:

- `open(spec)` / `close(served)`: make a registered version servable (the built-in engine
  merges its adapter into a copy of the base; vLLM loads it at runtime under the version's
  label) and free it once no request uses it;
- `submit(job, context, done)` / `cancel(job)`: generate one `engine.Job` (its prompt ids,
  budget, stops, schema, sampling), filling in its text, token ids and logprobs, streaming
  through `job.emit`; `done(job)` is called once it has ended, well or not (`job.error`);
- `healthy()` and `status()`: for /readyz and the metrics; `start()` / `stop()`.

Two implementations: `BuiltinEngine` (the micro-batcher over `model.generate`, this module) and
`VllmEngine` (`vllm_engine.py`: a vLLM server Temper starts and supervises, or one it attaches
to by URL). `submit` raises `QueueFull` (the gateway answers 429) or `EngineUnavailable` (503).
"""

from __future__ import annotations

import copy
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ...engines import EngineUnavailable
from .engine import Job, run_batch
from .scheduler import Batch, QueueFull, Scheduler

log = logging.getLogger(__name__)

__all__ = ["BuiltinEngine", "Engine", "EngineUnavailable", "OpenSpec", "QueueFull"]


@dataclass
class OpenSpec:
    """What an engine needs to make one pulled version servable."""

    label: str  # <name>-v<version> or the folder's id: unique per version
    path: Path  # the pulled bundle
    manifest: Any  # bundle.Manifest
    adapter: Path
    base_dir: Callable[[], Path]  # the local base model (found on demand: it may hash files)


class Engine(Protocol):
    name: str

    def start(self) -> None: ...
    def stop(self, timeout: float) -> None: ...
    def open(self, spec: OpenSpec) -> Any: ...
    def close(self, served: Any) -> None: ...
    def submit(self, job: Job, context: Any, done: Callable[[Job], None]) -> None: ...
    def cancel(self, job: Job) -> None: ...
    def depth(self) -> int: ...
    def healthy(self) -> bool: ...
    def status(self) -> dict[str, Any]: ...


class BuiltinEngine:
    """Temper's own engine: micro-batches (`scheduler`) through `model.generate` (`engine`)."""

    name = "builtin"

    def __init__(self, cfg: Any, metrics: Any):
        self.device = cfg.device
        self.scheduler = Scheduler(
            self._run, cfg.max_batch_size, cfg.max_wait_ms / 1000, cfg.max_queue, metrics.on_batch
        )
        self.bases: dict[str, Any] = {}  # base hash -> the base model, read once, unmerged

    def start(self) -> None:
        self.scheduler.start()

    def stop(self, timeout: float) -> None:
        self.scheduler.stop(timeout)

    def open(self, spec: OpenSpec) -> Any:
        """The version's model: its adapter merged into a copy of the base (as evaluated)."""
        from peft import PeftModel

        from ... import bundle
        from ...evaluation.generation import load_model
        from ...model_source import adapter_method

        manifest = spec.manifest
        if adapter_method(spec.adapter) == "qlora":  # a 4-bit base is not copied: load it as is
            return bundle.load_bundle(spec.path, spec.base_dir(), device=self.device).model
        key = manifest.base["hash"]
        if key not in self.bases:
            dtype = manifest.generation.dtype
            self.bases[key], _ = load_model(spec.base_dir(), None, dtype, None, self.device)
        model = PeftModel.from_pretrained(copy.deepcopy(self.bases[key]), str(spec.adapter))
        return model.merge_and_unload().eval()

    def close(self, served: Any) -> None:
        served.model = None
        gc.collect()

    def submit(self, job: Job, context: Any, done: Callable[[Job], None]) -> None:
        self.scheduler.submit(job, context, done)

    def cancel(self, job: Job) -> None:
        self.scheduler.cancel(job)

    def depth(self) -> int:
        return self.scheduler.depth()

    def healthy(self) -> bool:
        return True

    def status(self) -> dict[str, Any]:
        return {"name": self.name}

    def _run(self, batch: Batch) -> None:
        ctx = batch.context
        served = ctx.served
        run_batch(
            served.model,
            served.tokenizer,
            batch.jobs,
            ctx.sampling,
            ctx.constraint,
            prefixes=served.prefixes,
        )


def make_engine(cfg: Any, metrics: Any, vllm_cfg: Any = None, log_dir: Path | None = None):
    """The engine `serve.engine` names."""
    if cfg.engine == "builtin":
        return BuiltinEngine(cfg, metrics)
    from ...engines import VllmConfig
    from .vllm_engine import VllmEngine

    return VllmEngine(cfg, vllm_cfg or VllmConfig(), metrics, log_dir or Path(cfg.cache_dir))
