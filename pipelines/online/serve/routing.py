"""Routed chat completions: the served version answers first, the router decides who answers.

Used for task prompts whose answer is the task's schema (no `response_format`, or
`json_object`): those are what an API tier can answer the same way. A request may carry
`route: {"tier": ..., "allow_external": false}` (the openai SDK's `extra_body`): force a tier,
or keep the text on this machine; neither can go beyond the server's `route:` config. The body
is the OpenAI one with the answering tier's text and token counts, plus `temper.route` (tier,
cost, the self tier's confidence, failed attempts, whether the self answer is a last resort);
the headers `x-temper-tier` and `x-temper-cost-usd` say the same for proxies and logs. A
streamed routed request is decided first, then sent as SSE chunks (a deferred answer cannot
stream tokens it does not have yet).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ... import bundle
from ...engines import EngineUnavailable
from ..cache import version_key
from ..route import NoTierAnswered, Routed, Router, RouteRefused, SelfAnswer, decisive_confidence
from ..route.config import RouteConfig
from .adapters import Served
from .completions import Completions, all_entries, chat_body, extras, make_job
from .protocol import ApiError, ChatRequest, usage

log = logging.getLogger("temper.serve")


def routable(prompt: str, req: ChatRequest) -> bool:
    fmt = req.response_format
    return prompt == "task" and (fmt is None or fmt.type == "json_object")


class RoutedCompletions:
    """A request through the router; the self tier is the server's own batcher."""

    def __init__(
        self, completions: Completions, router: Router, cfg: RouteConfig, cache: Any = None
    ):
        self.completions, self.router, self.cfg = completions, router, cfg
        self.cache = cache  # a cache.SemanticCache in front of the router, or None
        self._thresholds: dict[str, float | None] = {}

    def threshold(self, served: Served) -> float | None:
        """The served version's registered threshold (None: route.self_threshold)."""
        if not self.cfg.registered_threshold:
            return None
        key = str(served.path)
        if key not in self._thresholds:  # read once per pulled version
            self._thresholds[key] = bundle.route_threshold(served.path)
        return self._thresholds[key]

    async def answer(
        self, req: ChatRequest, served: Served, info: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """The body and headers of a routed answer (ApiError 400 / 503 otherwise)."""
        t0 = time.perf_counter()
        job, ctx, n_prompt = make_job(self.completions.cfg, served, req)  # a bad request fails here
        text = next(m.text() for m in reversed(req.messages) if m.role == "user")
        loop = asyncio.get_running_loop()

        async def self_answer() -> SelfAnswer:
            """The self tier, run only when the router asks for it."""
            return await self._self_answer(req, served, info, job, ctx, n_prompt, t0, loop)

        cacheable = self._cacheable(req)
        version = version_key(served.fingerprint, served.task.version, served.task.prompt_hash)
        if cacheable:
            hit = await asyncio.to_thread(self.cache.get, text, version)
            if hit is not None:
                return self._from_cache(req, served, info, hit, n_prompt)
        routed = await self._route(req, served, text, self_answer)
        self.completions.metrics.route(routed)
        if cacheable and not (routed.last_resort or routed.external_blocked):
            # Unsure answers kept only because no API tier could (or might) answer are not
            # stored: a later request must get its chance at a better one.
            await asyncio.to_thread(self.cache.put, text, version, routed.text)
        info.update(tier=routed.tier, cost_usd=round(routed.usd, 8), deferred_to=routed.deferred_to)
        # the monitor logs the answer given and the self tier's confidence that decided it
        info.update(
            _answer=routed.text,
            _served=served,
            _confidence=routed.confidence,
        )
        return self._body(req, served, job, routed), {
            "x-temper-tier": routed.tier,
            "x-temper-cost-usd": f"{routed.usd:.8f}",
        }

    async def _self_answer(
        self,
        req: ChatRequest,
        served: Served,
        info: dict[str, Any],
        job: Any,
        ctx: Any,
        n_prompt: int,
        t0: float,
        loop: asyncio.AbstractEventLoop,
    ) -> SelfAnswer:
        """The self tier: the server's own batcher. Overload, timeout and engine errors come
        back as a failed SelfAnswer (an API tier may still answer), never as an exception."""
        try:
            future = self.completions.submit(job, ctx, loop)
        except ApiError:  # the queue is full: an API tier may take it
            return SelfAnswer(error="overloaded")
        try:
            await asyncio.wait_for(asyncio.shield(future), self.completions.cfg.request_timeout_s)
        except TimeoutError:
            self.completions.engine.cancel(job)
            return SelfAnswer(error="timeout")
        except asyncio.CancelledError:
            self.completions.engine.cancel(job)
            raise
        if job.error is not None:
            # the reason goes in the route summary; the engine's words go in the server log
            log.warning("the self tier failed: %s", job.error)
            return SelfAnswer(
                error="unavailable" if isinstance(job.error, EngineUnavailable) else "error"
            )
        self.completions.record(req, served, job, n_prompt, t0, info)
        extra = extras(served, job)
        seconds = time.perf_counter() - t0
        return SelfAnswer(
            text=job.text,
            confidence=decisive_confidence(extra.get("confidence") or {}, self.cfg.field),
            usd=seconds * self.cfg.self_usd_per_hour / 3600,
            input_tokens=n_prompt,
            output_tokens=len(job.token_ids),
            extra=extra,
        )

    def _cacheable(self, req: ChatRequest) -> bool:
        """The cache holds plain deterministic answers only; a forced tier means that tier's."""
        opts = req.route
        greedy = req.temperature in (None, 0)
        plain = not (req.logprobs or req.stop or req.max_tokens or req.max_completion_tokens)
        return self.cache is not None and greedy and plain and not (opts and opts.tier)

    def _from_cache(
        self, req: ChatRequest, served: Served, info: dict[str, Any], hit: Any, n_prompt: int
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """A cache hit's body and headers (tier `cache`, no cost), noted for the log."""
        info.update(tier="cache", cache=hit.kind, _answer=hit.answer, _served=served)
        self.completions.metrics.cache_hit(hit.kind)
        return self._cached(req, served, hit, n_prompt), {
            "x-temper-tier": "cache",
            "x-temper-cost-usd": "0.00000000",
        }

    async def _route(
        self,
        req: ChatRequest,
        served: Served,
        text: str,
        self_answer: Callable[[], Awaitable[SelfAnswer]],
    ) -> Routed:
        """Ask the router, with the request's options; its refusals become OpenAI errors."""
        opts = req.route
        threshold = self.threshold(served)
        try:
            return await self.router.route(
                served.task,
                text,
                self_answer,
                tier=opts.tier if opts else None,
                allow_external=opts.allow_external if opts else None,
                self_threshold=threshold,
            )
        except RouteRefused as err:
            raise ApiError(400, str(err), param="route") from None
        except NoTierAnswered as err:
            raise ApiError(
                503, str(err), type_="service_unavailable", code="no_tier_available"
            ) from None

    def _cached(self, req: ChatRequest, served: Served, hit: Any, n_prompt: int) -> dict:
        temper = {
            "model_version": served.version,
            "route": {"tier": "cache", "cost_usd": 0.0},
            "cache": {"kind": hit.kind, "similarity": round(hit.similarity, 6)},
        }
        return chat_body(req, served, hit.answer, "stop", usage(n_prompt, 0), temper)

    def _body(self, req: ChatRequest, served: Served, job: Any, routed: Routed) -> dict[str, Any]:
        by_self = routed.tier == "self"
        mine = routed.self_answer
        temper = dict(mine.extra) if mine and mine.extra else {}
        if not by_self:
            temper.pop("confidence", None)  # those were the self tier's labels, not these
        temper.setdefault("model_version", served.version)
        temper["route"] = routed.summary()
        return chat_body(
            req,
            served,
            routed.text,
            (job.finish_reason or "stop") if by_self else "stop",
            usage(routed.input_tokens, routed.output_tokens),
            temper,
            {"content": all_entries(job, served)} if req.logprobs and by_self else None,
        )


async def as_events(body: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    """A finished chat.completion as the SSE chunks of a stream."""
    choice = body["choices"][0]

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        chunk = {
            "id": body["id"],
            "object": "chat.completion.chunk",
            "created": body["created"],
            "model": body["model"],
            "system_fingerprint": body["system_fingerprint"],
            "choices": choices,
            **({"usage": None} if include_usage else {}),
            **extra,
        }
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def delta(d: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
        return event([{"index": 0, "delta": d, "logprobs": logprobs, "finish_reason": finish}])

    yield delta({"role": "assistant", "content": ""})
    yield delta({"content": choice["message"]["content"]}, logprobs=choice["logprobs"])
    yield delta({}, finish=choice["finish_reason"])
    if include_usage:
        yield event([], usage=body["usage"], temper=body["temper"])
    yield "data: [DONE]\n\n"
