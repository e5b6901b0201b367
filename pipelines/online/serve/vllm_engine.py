"""The vLLM engine behind the gateway: a vLLM server Temper starts and supervises (or one it
attaches to by `serve.engine_url`), driven over HTTP on the server's event loop.

- One vLLM process serves one base model; every served version is a LoRA adapter loaded at
  runtime under its label (`<name>-v<version>`). Hot swap: the new version's adapter is
  loaded, the gateway's table switches in one assignment, in-flight requests finish on the
  old label, then it is unloaded (`close`). A version of another base needs its own engine.
- A job is one streamed `/v1/completions` request over the prompt's token ids (the gateway
  renders the prompt exactly as the built-in engine does); cancelling the job closes the
  connection, which aborts the request inside vLLM. The task schema goes as `response_format`
  json_schema, with the evaluation's compact separators (vLLM's `guidance` backend).
- Label confidences mean what the registered route threshold means: under a schema, the
  tokens that spell a label are rescored by the raw model (`vllm.confidence: rescore`, see
  engines.vllm_client); the `logprobs` a client asks for are vLLM's own (after the mask).
- Supervision: a thread watches the process; when it dies, requests get 503 at once (the
  router may send them to an API tier), and the engine is restarted with the adapters it had,
  without restarting the gateway. Attached engines are health-checked instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...engines import (
    EngineRejected,
    EngineUnavailable,
    VllmClient,
    VllmConfig,
    VllmIncompatible,
    VllmServer,
    check_adapter,
    lora_name,
)
from ...task import parse_answer
from .engine import Job
from .engines import OpenSpec
from .scheduler import QueueFull

log = logging.getLogger("temper.serve")
FINISH = {"stop": "stop", "length": "length"}


class VllmEngine:
    name = "vllm"

    def __init__(self, cfg: Any, vcfg: VllmConfig, metrics: Any, log_dir: Path):
        self.cfg, self.vcfg, self.metrics = cfg, vcfg, metrics
        self.log_path = Path(log_dir) / "vllm.log"
        self.server: VllmServer | None = None
        # an attached server's key, if it wants one, comes from the environment (never params)
        attached = (
            VllmClient(cfg.engine_url, os.environ.get("VLLM_API_KEY")) if cfg.engine_url else None
        )
        self.client: VllmClient | None = attached
        self.base_hash: str | None = None
        self.adapters: dict[str, str] = {}  # name in vLLM -> adapter folder (re-loaded on restart)
        self.tasks: dict[int, asyncio.Task] = {}
        self.up = threading.Event()
        self.stopping = threading.Event()
        self.lock = threading.Lock()  # opens, closes and restarts, one at a time
        self.restarts = 0
        self.thread = threading.Thread(target=self._supervise, name="temper-vllm", daemon=True)

    # -- lifecycle --

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        if self.server is not None:
            self.server.stop()
        self.up.clear()

    def healthy(self) -> bool:
        return self.up.is_set()

    def status(self) -> dict[str, Any]:
        proc = self.server.proc if self.server is not None else None
        return {
            "name": self.name,
            "url": self.cfg.engine_url or (self.server.url if self.server else None),
            "pid": proc.pid if proc is not None else None,
            "up": self.up.is_set(),
            "restarts": self.restarts,
            "adapters": sorted(self.adapters),
        }

    # -- versions --

    def open(self, spec: OpenSpec) -> str:
        """Load the version's adapter into vLLM (starting vLLM for its base first)."""
        rank = check_adapter(spec.adapter)
        with self.lock:
            if self.client is None:
                self._launch(spec, rank)
            elif self.base_hash not in (None, spec.manifest.base["hash"]):
                raise VllmIncompatible(
                    f"{spec.label}: a different base model than the versions already served; "
                    "one vLLM engine serves adapters of one base (run a second gateway)"
                )
            self.base_hash = spec.manifest.base["hash"]
            assert self.client is not None
            if self.cfg.engine_url and not self.up.is_set() and self.client.healthy():
                self.up.set()
            name = lora_name(spec.label, spec.manifest.adapter_sha256)
            self.client.load_adapter(name, str(spec.adapter.resolve()))
            self.adapters[name] = str(spec.adapter.resolve())
        log.info("vLLM loaded adapter %s", name)
        return name

    def _launch(self, spec: OpenSpec, rank: int) -> None:
        server = VllmServer(
            self.vcfg,
            spec.base_dir().resolve(),
            self.log_path,
            max_lora_rank=rank,
            max_num_seqs=self.cfg.max_batch_size,
            tokenizer=(spec.path / spec.manifest.tokenizer).resolve(),
        )
        server.start()  # supervised from here on: a failed first start is the loader's retry
        self.server = server
        self.client = VllmClient(server.url, server.key)
        self.up.set()
        self.metrics.engine_up(True)

    def close(self, served: Any) -> None:
        """Unload a retired version's adapter (its last request has finished)."""
        with self.lock:
            self.adapters.pop(served.model, None)
            if self.client is not None and self.up.is_set():
                try:
                    self.client.unload_adapter(served.model)
                except EngineUnavailable as err:
                    log.warning("could not unload %s: %s", served.model, err)
        log.info("vLLM unloaded adapter %s", served.model)

    # -- requests --

    def submit(self, job: Job, context: Any, done: Callable[[Job], None]) -> None:
        if not self.up.is_set():
            raise EngineUnavailable("the vLLM engine is not available (restarting or down)")
        if len(self.tasks) >= self.cfg.max_batch_size + self.cfg.max_queue:
            raise QueueFull(f"{len(self.tasks)} requests in the engine")
        job.enqueued = time.perf_counter()
        task = asyncio.get_running_loop().create_task(self._run(job, context, done))
        self.tasks[id(job)] = task

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        task = self.tasks.get(id(job))
        if task is not None:
            task.get_loop().call_soon_threadsafe(task.cancel)

    def depth(self) -> int:
        return max(0, len(self.tasks) - self.cfg.max_batch_size)

    async def _run(self, job: Job, ctx: Any, done: Callable[[Job], None]) -> None:
        try:
            try:
                await self._answer(job, ctx)
            except EngineUnavailable as err:
                if not self._retryable(job):
                    raise
                # A passing failure (a dropped connection, an aborted stream) while the process
                # lives, before the client saw a token: once more, as a client would retry.
                log.warning("vLLM request failed, trying it once more: %s", err)
                self._restart_job(job)
                await self._answer(job, ctx)
        except asyncio.CancelledError:
            job.finish_reason = job.finish_reason or "cancelled"
        except EngineRejected as err:
            job.error = err
        except EngineUnavailable as err:
            job.error = err
            self._lost(err)
        finally:
            job.finished = job.finished or time.perf_counter()
            self.tasks.pop(id(job), None)
            done(job)

    async def _answer(self, job: Job, ctx: Any) -> None:
        await self._generate(job, ctx)
        if self._rescore_needed(job, ctx):
            await self._rescore(job, ctx)

    def _retryable(self, job: Job) -> bool:
        alive = self.up.is_set() and (self.server is None or self.server.alive())
        return alive and not job.cancelled.is_set() and (job.emit is None or not job.token_ids)

    @staticmethod
    def _restart_job(job: Job) -> None:
        """Forget what a failed attempt produced (nothing of it reached the client)."""
        job.text, job.finish_reason, job.first_token = "", None, None
        job.token_ids, job.logprobs, job.top, job.rescored = [], [], [], {}

    def body(self, job: Job, ctx: Any) -> dict[str, Any]:
        """The vLLM `/v1/completions` request for a job."""
        sampling = ctx.sampling
        body: dict[str, Any] = {
            "model": ctx.served.model,
            "prompt": job.prompt_ids,
            "max_tokens": job.max_new_tokens,
            "temperature": sampling.temperature or 0.0,
            "logprobs": job.top_logprobs,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": True,
        }
        if sampling.top_p is not None:
            body["top_p"] = sampling.top_p
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if job.stops:
            body["stop"] = job.stops
        if ctx.constraint is not None:
            schema = {"name": "answer", "schema": ctx.constraint.schema}
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        return body

    async def _generate(self, job: Job, ctx: Any) -> None:
        """Stream the job's completion; with a schema, close the answer within its budget as
        the built-in engine does (`engines.closing`)."""
        from ...engines.closing import Closer

        tokenizer = ctx.served.tokenizer
        closer = Closer(ctx.constraint, job.max_new_tokens, tokenizer) if ctx.constraint else None
        job.started = time.perf_counter()
        closing, sent = await self._stream(job, ctx, closer)
        if closing and closer is not None:
            await self._close(job, ctx, closer, sent)
        job.finished = time.perf_counter()
        job.finish_reason = job.finish_reason or "length"
        if job.strip and job.emit is None:
            job.text = job.text.strip()

    async def _stream(self, job: Job, ctx: Any, closer: Any) -> tuple[bool, int]:
        """The streamed part: (whether the answer must now be closed, characters sent)."""
        assert self.client is not None
        tokenizer = ctx.served.tokenizer
        eos = tokenizer.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        raw, sent = "", 0
        async for chunk in self.client.stream(self.body(job, ctx)):
            if not chunk.get("choices"):
                continue
            choice = chunk["choices"][0]
            job.first_token = job.first_token or time.perf_counter()
            picked = [t for t in choice.get("token_ids") or [] if t not in eos_ids]
            if closer is not None and picked and not closer.keeps(job.token_ids, raw, picked[0]):
                return True, sent  # leaving the stream closes it: vLLM aborts the request
            entries = self._take_tokens(job, choice, eos_ids, tokenizer)
            piece = choice.get("text") or ""
            raw += piece
            sent = self._emit(job, raw, sent, entries)
            reason = choice.get("finish_reason")
            if job.stop_at_json and "}" in piece and parse_answer(job.text) is not None:
                reason = "stop"  # the answer is complete: as the built-in engine, stop here
            if reason is not None:
                job.finish_reason = FINISH.get(reason, "stop")
                return False, sent
        return False, sent

    async def _close(self, job: Job, ctx: Any, closer: Any, sent: int) -> None:
        """Finish the answer token by token within its budget (engines.closing)."""
        from ...engines.closing import close_answer
        from .engine import token_entry

        tokenizer = ctx.served.tokenizer
        added = await close_answer(
            self.client, ctx.served.model, job.prompt_ids, job.token_ids, job.logprobs, closer
        )
        job.first_token = job.first_token or time.perf_counter()
        first = len(job.token_ids) - len(added)
        if job.top_logprobs:  # the chosen token only: it was picked among closing tokens
            job.top += [[(t, job.logprobs[first + k])] for k, t in enumerate(added)]
        entries = []
        if job.emit is not None and job.want_logprobs:
            entries = [token_entry(tokenizer, job, i) for i in range(first, len(job.token_ids))]
        self._emit(job, tokenizer.decode(job.token_ids, skip_special_tokens=True), sent, entries)
        job.finish_reason = "stop" if parse_answer(job.text) is not None else "length"

    @staticmethod
    def _emit(job: Job, raw: str, sent: int, entries: list[dict[str, Any]]) -> int:
        """Set the job's text and stream what the client has not seen yet."""
        job.text = raw.lstrip() if job.strip else raw
        if job.emit is not None and (len(job.text) > sent or entries):
            job.emit(job.text[sent:], entries)
            return len(job.text)
        return sent

    def _take_tokens(
        self, job: Job, choice: dict[str, Any], eos_ids: set[int], tokenizer: Any
    ) -> list[dict[str, Any]]:
        """Append a chunk's tokens (EOS left out, as OpenAI's usage counts) to the job."""
        from .engine import token_entry

        logprobs = choice.get("logprobs") or {}
        values = logprobs.get("token_logprobs") or []
        tops = logprobs.get("top_logprobs") or []
        entries = []
        for k, token in enumerate(choice.get("token_ids") or []):
            if token in eos_ids:
                continue
            job.token_ids.append(token)
            job.logprobs.append(float(values[k]) if k < len(values) else 0.0)
            if job.top_logprobs:
                ranked = sorted((tops[k] or {}).items(), key=lambda kv: -kv[1])
                pairs = [(int(t.split(":", 1)[1]), float(v)) for t, v in ranked]
                job.top.append(pairs[: job.top_logprobs])
            if job.emit is not None and job.want_logprobs:
                entries.append(token_entry(tokenizer, job, len(job.token_ids) - 1))
        return entries

    def _rescore_needed(self, job: Job, ctx: Any) -> bool:
        return (
            ctx.constraint is not None
            and self.vcfg.confidence == "rescore"
            and bool(job.token_ids)
            and job.finish_reason != "cancelled"
        )

    async def _rescore(self, job: Job, ctx: Any) -> None:
        """The raw model's logprobs of the tokens that spell the labels (`job.rescored`)."""
        from ...evaluation.confidence import label_tokens

        assert self.client is not None
        served = ctx.served
        answer = parse_answer(job.text)
        spans = label_tokens(served.task, served.tokenizer, job.token_ids, answer)
        places = sorted({j for hits in spans.values() for j in hits})
        ids = job.prompt_ids + job.token_ids
        n = len(job.prompt_ids)
        values = await asyncio.gather(
            *(self.client.token_logprob(served.model, ids[: n + j], ids[n + j]) for j in places)
        )
        job.rescored = dict(zip(places, values, strict=True))

    # -- supervision --

    def _lost(self, err: Exception) -> None:
        """A request could not reach the engine: not available until it answers again."""
        if self.server is not None and self.server.alive():
            return  # the process lives: a passing error of one request
        if self.up.is_set():
            log.error("vLLM engine lost: %s", err)
        self.up.clear()
        self.metrics.engine_up(False)

    def _supervise(self) -> None:
        while not self.stopping.wait(0.5):
            if self.server is not None and self.up.is_set() and not self.server.alive():
                self._lost(EngineUnavailable("the process exited"))
            if self.server is not None and not self.server.alive() and self.vcfg.restart:
                self._restart()
            elif self.server is None and self.client is not None:
                self._check_attached()

    def _restart(self) -> None:
        with self.lock:
            if self.stopping.is_set() or self.server is None:
                return
            log.warning("restarting vLLM (restart %d)", self.restarts + 1)
            try:
                self.server.stop(timeout=5)  # what is left of the old process group
                self.server.start()
                assert self.client is not None
                for name, adapter in self.adapters.items():
                    self.client.load_adapter(name, adapter)
            except (EngineUnavailable, EngineRejected) as err:
                log.error("vLLM restart failed (retrying): %s", err)
                self.stopping.wait(5)
                return
            self.restarts += 1
            self.metrics.engine_restarted()
            self.up.set()
            self.metrics.engine_up(True)
            log.info("vLLM back after restart %d", self.restarts)

    def _check_attached(self) -> None:
        assert self.client is not None
        ok = self.client.healthy()
        if ok != self.up.is_set():
            log.warning("attached vLLM at %s is %s", self.cfg.engine_url, "up" if ok else "down")
            (self.up.set if ok else self.up.clear)()
            self.metrics.engine_up(ok)
        self.stopping.wait(2.0)
