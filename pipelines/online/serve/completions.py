"""POST /v1/chat/completions: a request becomes an engine job; its result an OpenAI body.

Prompt (`serve.prompt`): `task` takes the last user message as the record's text and asks the
registered task's question about it (`TaskConfig.messages`, the evaluated prompt), so an app
that sends a clause gets the answer the evaluation measured; `raw` renders the messages as
sent. Decoding: without `response_format`, the version's own settings (greedy; the task's
schema when it was evaluated constrained); `json_object` is the task's schema in task mode (any
JSON object in raw mode); `json_schema` the client's schema; `text` free text. Logprobs are the
raw model's (before the schema mask), as are the label confidences returned in the extra
`temper` field of the body, the router's input.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ...chat import render
from ...engines import EngineRejected, EngineUnavailable
from ...evaluation.confidence import label_confidences
from .adapters import Served
from .config import ServeConfig
from .engine import Job, Sampling, token_entry
from .logs import redacted
from .protocol import ApiError, ChatRequest, completion_id, now, usage
from .scheduler import QueueFull

log = logging.getLogger("temper.serve")


@dataclass
class Context:
    """What a batch's jobs share: the version, its grammar, the sampling."""

    served: Served
    constraint: Any
    sampling: Sampling


def prompt_messages(cfg: ServeConfig, served: Served, req: ChatRequest) -> list[dict[str, str]]:
    if cfg.prompt == "task":
        users = [m for m in req.messages if m.role == "user"]
        if not users or not users[-1].text().strip():
            raise ApiError(
                400, "messages: a user message with the record's text is required", param="messages"
            )
        return served.task.messages(users[-1].text())
    role = {"developer": "system"}
    return [{"role": role.get(m.role, m.role), "content": m.text()} for m in req.messages]


def schema_for(cfg: ServeConfig, served: Served, req: ChatRequest) -> dict[str, Any] | None:
    fmt = req.response_format
    task_schema = served.task.answer_schema()  # None for a text task: its reply is prose
    if fmt is None:
        return task_schema if cfg.prompt == "task" and served.generation.constrained else None
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return task_schema if cfg.prompt == "task" and task_schema else {"type": "object"}
    if fmt.json_schema is None or not isinstance(fmt.json_schema.schema_, dict):
        raise ApiError(
            400,
            "response_format.json_schema.schema: a JSON schema object is required",
            param="response_format.json_schema",
        )
    return fmt.json_schema.schema_


def make_job(cfg: ServeConfig, served: Served, req: ChatRequest) -> tuple[Job, Context, int]:
    """The engine job for a request, its batch context and its prompt's token count."""
    messages = prompt_messages(cfg, served, req)
    text = render(served.tokenizer, messages, tokenize=False, add_generation_prompt=True)
    ids = served.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) > cfg.max_prompt_tokens:
        raise ApiError(
            400,
            f"This prompt is {len(ids)} tokens; this server takes at most {cfg.max_prompt_tokens}",
            param="messages",
            code="context_length_exceeded",
        )
    schema = schema_for(cfg, served, req)
    constraint = None
    if schema is not None:
        try:
            constraint = served.constraint(schema)
        except (ValueError, TypeError) as err:
            raise ApiError(
                400, f"response_format: schema not usable: {err}", param="response_format"
            ) from None
    # A JSON answer ends when its object closes; free text (`response_format: text`) runs on.
    json_wanted = schema is not None or (cfg.prompt == "task" and req.response_format is None)
    budget = req.budget(cfg.max_tokens_limit)
    if budget is None:
        budget = served.generation.max_new_tokens if cfg.prompt == "task" else cfg.max_tokens_limit
    sampling = Sampling(req.temperature, req.top_p, req.seed)
    # A seeded sampled request runs alone: its draws must not depend on its batch mates.
    alone = (object(),) if not sampling.greedy and req.seed is not None else ()
    key = (id(served), json.dumps(schema, sort_keys=True), sampling.key(), *alone)
    job = Job(
        prompt_ids=ids,
        max_new_tokens=budget,
        key=key,
        stops=req.stop or [],
        stop_at_json=served.generation.stop_at_json and json_wanted,
        strip=cfg.prompt == "task",
        want_logprobs=req.logprobs,
        top_logprobs=(req.top_logprobs or 0) if req.logprobs else 0,
    )
    return job, Context(served, constraint, sampling), len(ids)


def extras(served: Served, job: Job) -> dict[str, Any]:
    """The non-OpenAI part of a body: which version answered, and the label confidences."""
    out: dict[str, Any] = {"model_version": served.version, "model_label": served.label}
    answer = served.task.parse(job.text)
    if answer is not None and not served.task.is_text:
        logprobs = [job.rescored.get(i, lp) for i, lp in enumerate(job.logprobs)]
        out["confidence"] = label_confidences(
            served.task, served.tokenizer, job.token_ids, logprobs, answer
        )
    return out


class Completions:
    """Submits jobs to the engine and turns their results into responses."""

    def __init__(self, cfg: ServeConfig, engine: Any, metrics: Any):
        self.cfg, self.engine, self.metrics = cfg, engine, metrics  # engine: engines.Engine

    def submit(self, job: Job, ctx: Context, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        done: asyncio.Future = loop.create_future()

        def finished(j: Job) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(j))

        ctx.served.enter()
        try:
            self.engine.submit(job, ctx, finished)
        except EngineUnavailable as err:
            ctx.served.leave()
            raise unavailable(err) from None
        except QueueFull as err:
            ctx.served.leave()
            raise ApiError(
                429,
                f"The server is busy ({err}); retry shortly",
                type_="rate_limit_error",
                code="queue_full",
                headers={"retry-after": "1"},
            ) from None
        done.add_done_callback(lambda _: ctx.served.leave())
        return done

    async def complete(self, req: ChatRequest, served: Served, info: dict[str, Any]) -> dict:
        """A non-streaming answer."""
        t0 = time.perf_counter()
        job, ctx, n_prompt = make_job(self.cfg, served, req)
        future = self.submit(job, ctx, asyncio.get_running_loop())
        try:
            await asyncio.wait_for(asyncio.shield(future), self.cfg.request_timeout_s)
        except TimeoutError:
            self.engine.cancel(job)
            raise ApiError(504, "The request timed out", type_="timeout", code="timeout") from None
        except asyncio.CancelledError:
            self.engine.cancel(job)
            raise
        self._check(job)
        self.record(req, served, job, n_prompt, t0, info)
        return chat_body(
            req,
            served,
            job.text,
            job.finish_reason,
            usage(n_prompt, len(job.token_ids)),
            extras(served, job),
            {"content": all_entries(job, served)} if req.logprobs else None,
        )

    async def stream(
        self, req: ChatRequest, served: Served, info: dict[str, Any]
    ) -> AsyncIterator[str]:
        """Server-sent events: a role chunk, content chunks, the finish chunk, the usage chunk
        (with `stream_options.include_usage`), then `[DONE]`. Built before the first byte
        goes out, so a bad request still gets its 4xx status."""
        t0 = time.perf_counter()
        job, ctx, n_prompt = make_job(self.cfg, served, req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.emit = lambda delta, entries: loop.call_soon_threadsafe(
            events.put_nowait, (delta, entries)
        )
        future = self.submit(job, ctx, loop)
        future.add_done_callback(lambda _: events.put_nowait(None))
        return self._events(req, served, job, n_prompt, t0, info, events)

    async def _events(self, req, served, job, n_prompt, t0, info, events) -> AsyncIterator[str]:
        cid, created = completion_id(), now()
        with_usage = bool(req.stream_options and req.stream_options.include_usage)

        def event(choices: list[dict[str, Any]], **extra: Any) -> str:
            body = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": req.model,
                "system_fingerprint": served.fingerprint,
                "choices": choices,
                **({"usage": None} if with_usage else {}),
                **extra,
            }
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
            return event(
                [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
            )

        deadline = t0 + self.cfg.request_timeout_s
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                left = deadline - time.perf_counter()
                try:
                    item = await asyncio.wait_for(events.get(), max(left, 0.001))
                except TimeoutError:
                    self.engine.cancel(job)
                    err = ApiError(504, "The request timed out", type_="timeout", code="timeout")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    return
                if item is None:
                    break
                delta, entries = item
                logprobs = {"content": entries} if req.logprobs and entries else None
                if delta or logprobs:
                    yield chunk({"content": delta}, logprobs=logprobs)
            if job.error is not None:
                yield f"data: {json.dumps(failure(job.error).body())}\n\n"
                return
            yield chunk({}, finish=job.finish_reason)
            self.record(req, served, job, n_prompt, t0, info)
            if with_usage:
                yield event(
                    [],
                    usage=usage(n_prompt, len(job.token_ids)),
                    temper=extras(served, job),
                )
            yield "data: [DONE]\n\n"
        finally:
            if job.finish_reason is None:  # the client left (or we timed out): free the slot
                self.engine.cancel(job)
                info["cancelled"] = True

    def _check(self, job: Job) -> None:
        if job.error is not None:
            raise failure(job.error)

    def record(self, req, served, job, n_prompt, t0, info) -> None:
        self.metrics.answered(req.model, job, n_prompt, t0)
        self.metrics.duration.labels("chat", req.model, "").observe(time.perf_counter() - t0)
        info.update(
            model=req.model,
            version=served.version,
            prompt_tokens=n_prompt,
            completion_tokens=len(job.token_ids),
            finish_reason=job.finish_reason,
            ttft_ms=round((job.first_token - t0) * 1000, 1) if job.first_token else None,
        )
        # for the monitor's request log (never the log line): what was answered, and by whom
        info.update(_answer=job.text, _job=job, _served=served)
        if self.cfg.log_prompts:
            info["prompt"] = redacted(req.messages[-1].text())
            info["answer"] = redacted(job.text)


def unavailable(err: Exception) -> ApiError:
    return ApiError(
        503,
        f"The model engine is unavailable; retry shortly ({err})",
        type_="service_unavailable",
        code="engine_unavailable",
        headers={"retry-after": "5"},
    )


def failure(err: BaseException) -> ApiError:
    """The error a failed job answers with: 503 when the engine is down, 400 when it refused
    the request, 500 otherwise."""
    if isinstance(err, EngineUnavailable):
        return unavailable(err)
    if isinstance(err, EngineRejected):
        return ApiError(400, str(err), param="response_format")
    return ApiError(500, f"generation failed: {err}", type_="server_error")


def chat_body(
    req: ChatRequest,
    served: Served,
    content: str,
    finish_reason: str | None,
    counts: dict[str, int],
    temper: dict[str, Any],
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A `chat.completion` body with one choice (and the extra `temper` part)."""
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": now(),
        "model": req.model,
        "system_fingerprint": served.fingerprint,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        ],
        "usage": counts,
        "temper": temper,
    }


def all_entries(job: Job, served: Served) -> list[dict[str, Any]]:
    return [token_entry(served.tokenizer, job, i) for i in range(len(job.token_ids))]
