"""The provider classes: one `_send` per SDK around the shared cache, budget, limits, retries.

from temper.providers import ProviderConfig, open_provider
provider = open_provider(ProviderConfig(kind="openai", model="gpt-6-luna",
                                        base_url="http://127.0.0.1:8000/v1"))
done = provider.complete([{"role": "user", "content": "Say hi"}])         # sync
results = provider.complete_many([msgs1, msgs2], desc="judge")             # bounded, with bar
# or, inside your own event loop: await provider.acomplete(msgs, json_schema=...)
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from ..io import stable_hash
from .base import (
    BudgetExceeded,
    Completion,
    EndpointDown,
    Messages,
    OverLimitReply,
    Price,
    ProviderConfig,
    ProviderError,
    Reply,
)
from .cache import Cache
from .limits import (
    CHARS_PER_TOKEN,
    Breaker,
    Budget,
    RateLimiter,
    Stats,
    estimate_tokens,
)
from .privacy import redact
from .retries import is_retryable, may_have_been_billed, never_connected, over_limit, retry_after_s

if TYPE_CHECKING:
    from tenacity import AsyncRetrying

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Attempt(NamedTuple):
    """A successful try: the reply and what it counted and cost."""

    reply: Reply
    input_tokens: int
    output_tokens: int
    usd: float
    latency_ms: float


class Provider:
    """Base: cache, budget, limits, retries and stats around one `_send` per SDK.

    Safe to share between coroutines of one event loop; the sync helpers start their own loop.
    """

    kind = "base"
    batch_report: dict[str, Any] | None = None  # set by batch mode (`providers.batch`)

    def __init__(self, cfg: ProviderConfig, cache: Cache | None = None):
        self.cfg = cfg
        self.cache = cache if cache is not None else Cache(cfg.cache)
        self.budget = Budget(cfg.max_usd, cfg.max_requests)
        self.stats = Stats()
        self.limiter = RateLimiter(cfg.rpm, cfg.tpm)
        self.breaker = Breaker(cfg.down_after, cfg.down_after_s)
        self._loop_state: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore, Any] | None = None

    # -- what callers use

    def cache_key(
        self,
        messages: Messages,
        *,
        json_schema: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        prompt_version: str = "",
    ) -> str:
        """The content address: provider kind, model, prompt version, generation params, input.

        The endpoint URL is left out on purpose: the model name identifies the model, and a
        loopback port or a proxy in front must not invalidate finished work.
        """
        return stable_hash(
            {
                "kind": self.cache_kind,
                "model": self.cfg.model,
                "prompt_version": prompt_version,
                "temperature": self.cfg.temperature,
                "max_tokens": max_tokens or self.cfg.max_tokens,
                "json_mode": self.cfg.json_mode if json_schema else "off",
                "json_schema": json_schema,
                "messages": messages,
            },
            length=64,
        )

    @property
    def cache_kind(self) -> str:
        return self.kind

    def prepare(self, messages: Messages) -> Messages:
        """The messages as they will be sent (redacted); the cache key is built on these."""
        if not self.cfg.redact:
            return messages
        return [
            {**m, "content": redact(m["content"], self.cfg.redact, self.stats.redactions)}
            for m in messages
        ]

    def request_key(self, messages: Messages, **kw: Any) -> str:
        """The cache key of `messages` as they would be sent (redacted; nothing counted)."""
        kinds = self.cfg.redact
        sent = (
            [{**m, "content": redact(m["content"], kinds)} for m in messages] if kinds else messages
        )
        return self.cache_key(sent, **kw)

    def is_cached(self, messages: Messages, **kw: Any) -> bool:
        return self.cache.get(self.request_key(messages, **kw)) is not None

    def estimate_usd(
        self,
        batch: Sequence[Messages],
        *,
        max_tokens: int | None = None,
        expected_output_tokens: int | None = None,
        price: Price | None = None,
        **kw: Any,
    ) -> tuple[int, float, float]:
        """(uncached requests, expected USD, worst-case USD) for a batch, before running it.

        Expected: `expected_output_tokens` per answer; worst case: every answer as long as
        `max_tokens` allows (what the budget reserves per request). `price`: another rate
        than the sync one (batch mode's).
        """
        price = price or self.price()
        limit = max_tokens or self.cfg.max_tokens
        out_tokens = expected_output_tokens or limit
        todo = [m for m in batch if not self.is_cached(m, max_tokens=max_tokens, **kw)]
        usd = sum(price.cost(estimate_tokens(m), out_tokens) for m in todo)
        worst = sum(price.cost(estimate_tokens(m), limit) for m in todo)
        return len(todo), usd, worst

    def price(self) -> Price:
        return Price(input=0, output=0)

    async def acomplete(
        self,
        messages: Messages,
        *,
        json_schema: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        prompt_version: str = "",
    ) -> Completion:
        """One completion: from the cache, or from the API (bounded, budgeted, retried).

        Raises BudgetExceeded (nothing sent), CacheMiss (replay), ProviderError (gave up).
        """
        self.stats.calls += 1
        sent = self.prepare(messages)
        max_tokens = max_tokens or self.cfg.max_tokens
        key = self.cache_key(
            sent, json_schema=json_schema, max_tokens=max_tokens, prompt_version=prompt_version
        )
        if (hit := self.cache.get(key)) is not None:
            self.stats.cache_hits += 1
            return hit
        _, semaphore, _ = self._state()
        async with semaphore:
            done = await self._call(sent, json_schema, max_tokens)
        self.cache.put(
            key,
            self.cache_kind,
            {"messages": sent, "json_schema": json_schema, "max_tokens": max_tokens},
            done,
        )
        return done

    def complete(self, messages: Messages, **kw: Any) -> Completion:
        """Sync `acomplete` (starts and closes its own event loop)."""
        return self._run_sync(self.acomplete(messages, **kw))

    async def amap(
        self, batch: Sequence[Messages], *, desc: str | None = None, **kw: Any
    ) -> list[Completion | Exception]:
        """Complete many message lists concurrently; results in order, failures as exceptions."""
        return await gather_bounded(
            [self.acomplete(m, **kw) for m in batch], desc=desc, provider=self
        )

    def complete_many(self, batch: Sequence[Messages], **kw: Any) -> list[Completion | Exception]:
        """Sync `amap`."""
        return self._run_sync(self.amap(batch, **kw))

    async def aclose(self) -> None:
        if self._loop_state is not None:
            client = self._loop_state[2]
            self._loop_state = None
            if client is not None:
                await client.close()

    def close(self) -> None:
        self.cache.close()

    # -- internals

    def _run_sync(self, coro: Awaitable[T]) -> T:
        async def main() -> T:
            try:
                return await coro
            finally:
                await self.aclose()

        return asyncio.run(main())

    def _state(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Semaphore, Any]:
        """Semaphore and SDK client bound to the running loop (recreated for a new loop)."""
        loop = asyncio.get_running_loop()
        if self._loop_state is None or self._loop_state[0] is not loop:
            self._loop_state = (loop, asyncio.Semaphore(self.cfg.concurrency), self._client())
        return self._loop_state

    def _client(self) -> Any:
        return None

    async def _send(
        self, client: Any, messages: Messages, json_schema: dict[str, Any] | None, max_tokens: int
    ) -> Reply | tuple[str, int | None, int | None, str | None]:
        raise NotImplementedError

    async def _call(
        self, messages: Messages, json_schema: dict[str, Any] | None, max_tokens: int
    ) -> Completion:
        """One request through the budget, rate limits and retries; stats counted once."""
        price = self.price()
        est_in = estimate_tokens(messages)
        reserve = price.worst_case(est_in, max_tokens)
        retrying = self._retrying()
        client = self._state()[2]
        try:
            async for attempt in retrying:
                with attempt:
                    done = await self._attempt(
                        client, messages, json_schema, max_tokens, price, est_in, reserve
                    )
        except BudgetExceeded:
            raise
        except OverLimitReply as err:
            self.stats.failures += 1
            raise OverLimitReply(str(err)) from None
        except Exception as err:
            self.stats.failures += 1
            raise self._gave_up(err, attempt.retry_state.attempt_number) from None
        return self._count(done)

    def _retrying(self) -> AsyncRetrying:
        """Tenacity's retry loop: a server's Retry-After (capped) wins over our backoff."""
        from tenacity import (
            AsyncRetrying,
            retry_if_exception,
            stop_after_attempt,
            wait_random_exponential,
        )

        cfg = self.cfg
        backoff = wait_random_exponential(multiplier=cfg.backoff_s, max=cfg.backoff_max_s)

        def wait(state: Any) -> float:
            seconds = retry_after_s(state.outcome.exception())
            if seconds is None:
                return backoff(state)
            return min(seconds, cfg.max_retry_after_s)

        async def sleep(seconds: float) -> None:
            # Cut short when the breaker opens: the next try then fails at once.
            end = time.monotonic() + seconds
            while not self.breaker.is_open and (left := end - time.monotonic()) > 0:
                await asyncio.sleep(min(left, 0.25))

        def before_sleep(state: Any) -> None:
            self.stats.retries += 1
            err = state.outcome.exception()
            log.debug("retry %d after %s", state.attempt_number, type(err).__name__)

        return AsyncRetrying(
            stop=stop_after_attempt(cfg.max_retries + 1),
            wait=wait,
            retry=retry_if_exception(is_retryable),
            reraise=True,
            before_sleep=before_sleep,
            sleep=sleep,
        )

    async def _attempt(
        self,
        client: Any,
        messages: Messages,
        json_schema: dict[str, Any] | None,
        max_tokens: int,
        price: Price,
        est_in: int,
        reserve: float,
    ) -> _Attempt:
        """One try: reserve its worst case, send it, settle the budget at what it cost."""
        if self.breaker.is_open:
            self.stats.refused_down += 1
            raise EndpointDown(self.breaker.reason)
        try:
            self.budget.reserve(reserve)
        except BudgetExceeded:
            self.stats.budget_refusals += 1
            raise
        sent = False
        try:
            await self.limiter.acquire(est_in + max_tokens)
            t0 = time.perf_counter()
            self.stats.requests += 1
            sent = True
            reply = Reply(*await self._send(client, messages, json_schema, max_tokens))
            self.breaker.connected()
            tin, tout = self._reply_tokens(reply, est_in, max_tokens, price)
        except BaseException as err:
            cause = over_limit(err)  # the anthropic SDK wraps it; the openai SDK does not
            self._settle_failed(cause or err, reserve, sent)
            if never_connected(err):
                self.breaker.refused_once(err)
            if cause is not None and cause is not err:
                raise OverLimitReply(str(cause)) from None  # the same for both SDKs
            raise
        latency = (time.perf_counter() - t0) * 1000
        usd = price.cost(tin, tout, reply.cached_input_tokens, reply.cache_write_tokens)
        self.budget.settle(reserve, usd)
        return _Attempt(reply, tin, tout, usd, latency)

    def _reply_tokens(
        self, reply: Reply, est_in: int, max_tokens: int, price: Price
    ) -> tuple[int, int]:
        """The reply's token counts (estimated where the server reports none); a reply over
        `max_tokens` raises OverLimitReply, its extra cost counted as claimed over the limit."""
        text, tin, tout = reply.text, reply.input_tokens, reply.output_tokens
        # Servers that report no usage (some local ones): the estimate, but
        # never more than the limit unless the text cannot fit in it.
        tin = est_in if tin is None else tin
        if tout is None:
            tout = min(math.ceil(len(text) / CHARS_PER_TOKEN), max_tokens)
            if len(text) > 16 * max_tokens:  # no tokenizer is that coarse
                tout = max_tokens + 1
        if tout > max_tokens:
            claimed = price.cost(tin, tout) - price.cost(tin, max_tokens)
            self.stats.usd_claimed_over_limit += max(claimed, 0.0)
            raise OverLimitReply(
                f"reply of {tout} output tokens, over the requested limit of {max_tokens}"
            )
        return tin, tout

    def _settle_failed(self, err: BaseException, reserve: float, sent: bool) -> None:
        """Release a failed try's reservation; one the server may have finished is charged
        its worst case. A Retry-After pauses the limiter for every request."""
        charge = reserve if sent and may_have_been_billed(err) else 0.0
        self.budget.settle(reserve, charge)
        if charge:
            self.stats.usd += charge
            self.stats.usd_charged_worst_case += charge
            if isinstance(err, OverLimitReply):
                self.stats.over_limit += 1
            else:
                self.stats.abandoned += 1
        self.stats.errors[type(err).__name__] += 1
        if (seconds := retry_after_s(err)) is not None:
            self.limiter.pause(min(seconds, self.cfg.max_retry_after_s))

    def _gave_up(self, err: Exception, attempts: int) -> ProviderError:
        """The ProviderError for a request that failed for good, the API key masked: error
        texts end up in rejects.jsonl and logs, and a server may echo the key."""
        text = str(err)
        if secret := getattr(self, "_api_key", None):
            text = text.replace(secret, "***")
        return ProviderError(f"{type(err).__name__} after {attempts} attempt(s): {text[:300]}")

    def _count(self, done: _Attempt) -> Completion:
        """Add a finished request to the stats; its Completion."""
        reply = done.reply
        self.stats.input_tokens += done.input_tokens
        self.stats.output_tokens += done.output_tokens
        self.stats.cached_input_tokens += reply.cached_input_tokens
        self.stats.cache_write_tokens += reply.cache_write_tokens
        self.stats.usd += done.usd
        self.stats.latencies_ms.append(done.latency_ms)
        return Completion(
            reply.text,
            done.input_tokens,
            done.output_tokens,
            done.usd,
            done.latency_ms,
            False,
            reply.finish_reason,
            self.cfg.model,
            reply.cached_input_tokens,
        )


async def gather_bounded(
    coros: Sequence[Awaitable[T]],
    *,
    desc: str | None = None,
    provider: Provider | None = None,
    on_done: Callable[[int, Any], None] | None = None,
) -> list[T | Exception]:
    """Run coroutines (each bounded by the provider's semaphore), in order, errors as values.

    With `desc`, shows a tqdm bar: done/total, ETA, and the provider's spend and cache hits.
    """
    from tqdm.auto import tqdm

    results: list[Any] = [None] * len(coros)
    bar = tqdm(total=len(coros), desc=desc, unit="req", disable=desc is None, dynamic_ncols=True)

    async def one(i: int, coro: Awaitable[T]) -> None:
        try:
            results[i] = await coro
        except Exception as err:  # returned, not raised: the caller counts and reports each
            results[i] = err
        if on_done is not None:
            on_done(i, results[i])
        bar.update(1)
        if provider is not None and (bar.n % 10 == 0 or bar.n == bar.total):
            s = provider.stats
            bar.set_postfix_str(
                f"${s.usd:.4f} hits {s.cache_hits} retries {s.retries}", refresh=False
            )

    try:
        await asyncio.gather(*(one(i, c) for i, c in enumerate(coros)))
    finally:
        bar.close()
    return results
