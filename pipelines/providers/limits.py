"""Spend and traffic limits: the budget, the rate limiter, the per-reply byte cap, the counts.

- Budget: before each attempt the worst case (estimated input tokens at a conservative 3
  chars/token plus `max_tokens` of output) is reserved; the reservation is settled with the
  reported usage afterwards, so a request that could cross `max_usd` or `max_requests` is
  never sent, even under concurrency.
- The limiter is a 60-second sliding window written by hand (about 30 lines): no maintained
  async limiter is installed here, and it must also take the pause a 429 asks for.
- The breaker stops a run against a teacher that is down: without it every request of a
  1,088-record run was retried 5 times against a closed port (524 s before distil gave up).
- The byte cap is an httpx2 transport (the SDKs' HTTP layer): neither SDK nor httpx2 limits
  a reply's size, and without a limit a server can make us hold, and pay for, any length.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

from ..stats import percentile
from .base import BudgetExceeded, Messages, OverLimitReply, ProviderConfig

CHARS_PER_TOKEN = 3.0  # conservative for English (about 4): the budget over-, never under-estimates


class Budget:
    """Hard caps on new spend and requests; reservations make them hold under concurrency."""

    def __init__(self, max_usd: float, max_requests: int):
        self.max_usd, self.max_requests = max_usd, max_requests
        self.spent_usd = 0.0
        self.requests = 0
        self.reserved_usd = 0.0
        self._lock = threading.Lock()

    def reserve(self, usd: float) -> None:
        with self._lock:
            if self.requests + 1 > self.max_requests:
                raise BudgetExceeded(
                    f"request cap reached: {self.requests} of max_requests {self.max_requests}"
                )
            if self.spent_usd + self.reserved_usd + usd > self.max_usd:
                raise BudgetExceeded(
                    f"spend cap reached: ${self.spent_usd:.4f} spent + ${self.reserved_usd:.4f} "
                    f"in flight + ${usd:.4f} for the next request > max_usd ${self.max_usd:.2f}"
                )
            self.requests += 1
            self.reserved_usd += usd

    def settle(self, reserved: float, actual: float) -> None:
        with self._lock:
            self.reserved_usd = max(0.0, self.reserved_usd - reserved)
            self.spent_usd += actual


class RateLimiter:
    """Requests- and tokens-per-minute over a sliding 60 s window, plus a shared 429 pause."""

    def __init__(self, rpm: int | None, tpm: int | None, window_s: float = 60.0):
        self.rpm, self.tpm, self.window_s = rpm, tpm, window_s
        self._events: deque[tuple[float, int]] = deque()
        self._tokens = 0
        self._paused_until = 0.0

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def acquire(self, tokens: int) -> None:
        while True:
            now = time.monotonic()
            wait = self._paused_until - now
            if wait <= 0:
                while self._events and self._events[0][0] <= now - self.window_s:
                    self._tokens -= self._events.popleft()[1]
                rpm_ok = self.rpm is None or len(self._events) < self.rpm
                # A request bigger than the whole tpm still goes, alone in its window.
                tpm_ok = self.tpm is None or not self._events or self._tokens + tokens <= self.tpm
                if rpm_ok and tpm_ok:
                    self._events.append((now, tokens))
                    self._tokens += tokens
                    return
                wait = self._events[0][0] + self.window_s - now
            await asyncio.sleep(max(wait, 0.005))


class Breaker:
    """Opens when `after` attempts in a row could not connect over at least `window_s`
    seconds (a restarting server refuses a few connections for a moment, a stopped one every
    one); while open every call fails at once, with one more try allowed per `window_s`, and
    a connection that succeeds closes it."""

    def __init__(self, after: int, window_s: float):
        self.after, self.window_s = after, window_s
        self.refused, self.since, self.opened = 0, 0.0, 0.0
        self.reason: str | None = None  # set while the endpoint looks down

    @property
    def is_open(self) -> bool:
        wait = max(self.window_s, 1.0)
        return self.reason is not None and time.monotonic() - self.opened < wait

    def connected(self) -> None:
        self.refused, self.reason = 0, None

    def refused_once(self, err: BaseException) -> None:
        now = time.monotonic()
        if self.refused == 0:
            self.since = now
        self.refused += 1
        if self.refused >= self.after and now - self.since >= self.window_s:
            self.opened = now
            self.reason = (
                f"{self.refused} connections in a row refused over {now - self.since:.0f} s "
                f"({type(err).__name__}: {str(err)[:120]})"
            )


@dataclass
class Stats:
    """What one provider did in this process (written to metrics by its callers)."""

    calls: int = 0  # completions asked for
    cache_hits: int = 0
    requests: int = 0  # HTTP attempts sent (retries and repairs included)
    retries: int = 0
    failures: int = 0  # calls that failed for good
    budget_refusals: int = 0  # calls not sent because of a cap
    input_tokens: int = 0  # new (uncached) tokens only
    output_tokens: int = 0
    cached_input_tokens: int = 0  # of input_tokens, read from the vendor's prompt cache
    cache_write_tokens: int = 0  # of input_tokens, written to it (Anthropic bills 1.25x)
    usd: float = 0.0  # all new spend, the charges below included
    over_limit: int = 0  # replies past the requested bytes/tokens: rejected
    refused_down: int = 0  # calls failed at once because the breaker found the teacher down
    abandoned: int = 0  # requests given up after they may have reached the server
    usd_charged_worst_case: float = 0.0  # what those two kinds were charged (their worst case)
    usd_claimed_over_limit: float = 0.0  # what over-limit replies claimed beyond it (not paid)
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    redactions: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        lat = sorted(out.pop("latencies_ms"))
        for key in ("usd", "usd_charged_worst_case", "usd_claimed_over_limit"):
            out[key] = round(out[key], 6)
        for q in (50, 95):  # `stats.percentile`: an observed latency, never interpolated
            out[f"latency_ms_p{q}"] = round(float(percentile(lat, q)), 1) if lat else None
        out["errors"] = dict(self.errors)
        out["redactions"] = dict(self.redactions)
        return out


def estimate_tokens(messages: Messages) -> int:
    """Conservative input-token count without the vendor's tokenizer (none is available offline)."""
    return sum(math.ceil(len(m.get("content") or "") / CHARS_PER_TOKEN) + 4 for m in messages)


def reply_limit(cfg: ProviderConfig, max_tokens: int) -> int:
    """Bytes read of one reply at most: room for the envelope plus generous bytes per token."""
    return cfg.max_reply_bytes or 65536 + 64 * max_tokens


def capped_transport(max_bytes: int) -> Any:
    """An httpx2 transport (the SDKs' HTTP layer) that stops reading a reply at `max_bytes`.

    Written by hand: neither SDK nor httpx2 has a response-size limit, and without one a
    server can make us hold (and pay for) a reply of any length.
    """
    import httpx2

    class CappedStream(httpx2.AsyncByteStream):
        def __init__(self, stream: Any):
            self._stream = stream

        async def __aiter__(self) -> Any:
            seen = 0
            async for chunk in self._stream:
                seen += len(chunk)
                if seen > max_bytes:
                    raise OverLimitReply(f"reply longer than {max_bytes} bytes (max_reply_bytes)")
                yield chunk

        async def aclose(self) -> None:
            await self._stream.aclose()

    class CappedTransport(httpx2.AsyncBaseTransport):
        def __init__(self) -> None:
            self._inner = httpx2.AsyncHTTPTransport()

        async def handle_async_request(self, request: Any) -> Any:
            response = await self._inner.handle_async_request(request)
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > max_bytes:
                await response.aclose()
                raise OverLimitReply(f"reply of {length} bytes, over max_reply_bytes {max_bytes}")
            return httpx2.Response(
                response.status_code,
                headers=response.headers,
                stream=CappedStream(response.stream),
                extensions=response.extensions,
                request=request,
            )

        async def aclose(self) -> None:
            await self._inner.aclose()

    return CappedTransport()
