"""One API tier: a provider of the provider layer asked the teacher's way, with per-day caps,
a deadline and a breaker that skips it a while after repeated failures.

The question is the distil stage's (`teacher.label_one`: the task's teacher prompt, the answer
schema as structured output, one repair turn, schema-checked), so an API tier answers exactly
as the labels the self tier learned from were made. The day's caps reuse the provider layer's
`Budget` (reservations of the worst case before each request, so concurrency cannot cross a
cap); a new UTC day gets a fresh one. Spend is counted in this process: a restart starts the
day's count again (the provider cache makes repeats free either way).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass

from ...errors import TemperError
from ...providers import Budget, Provider, open_provider
from ...task import TaskConfig
from ...teacher import label_one
from .config import TierConfig


@dataclass(frozen=True)
class TierAnswer:
    """A schema-valid answer from one tier and what it cost."""

    tier: str
    text: str
    answer: dict
    usd: float
    input_tokens: int
    output_tokens: int
    latency_ms: float
    cached: bool


class TierFailure(TemperError):
    """A tier gave no usable answer; `reason` is one of: over_budget, timeout, error,
    invalid, down."""

    def __init__(self, tier: str, reason: str, detail: str = ""):
        super().__init__(f"{tier}: {reason}" + (f" ({detail})" if detail else ""))
        self.tier, self.reason, self.detail = tier, reason, detail


def utc_day(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d")


class ApiTier:
    """A mid-tier or frontier API behind the router."""

    def __init__(
        self,
        cfg: TierConfig,
        provider: Provider | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.cfg, self.clock = cfg, clock
        pcfg = cfg.provider.model_copy(
            update={"timeout_s": min(cfg.provider.timeout_s, cfg.timeout_s)}
        )
        # Opening checks the privacy guard and the price list: a bad tier fails at start-up.
        self.provider = provider if provider is not None else open_provider(pcfg)
        self.day = utc_day(clock())
        self.provider.budget = self._budget()
        self.failures = 0
        self.down_until = 0.0

    @property
    def name(self) -> str:
        return self.cfg.name

    def _budget(self) -> Budget:
        p = self.cfg.provider
        usd = p.max_usd if self.cfg.daily_usd is None else self.cfg.daily_usd
        requests = p.max_requests if self.cfg.daily_requests is None else self.cfg.daily_requests
        return Budget(usd, requests)

    def spent(self) -> tuple[float, int]:
        """Today's spend and requests (including the reservations in flight)."""
        self._roll()
        b = self.provider.budget
        return b.spent_usd + b.reserved_usd, b.requests

    def _roll(self) -> None:
        today = utc_day(self.clock())
        if today != self.day:
            self.day = today
            self.provider.budget = self._budget()
            self.provider.stats.latencies_ms.clear()  # bounded memory in a long-lived server

    def available(self) -> bool:
        return self.clock() >= self.down_until

    async def ask(self, task: TaskConfig, text: str) -> TierAnswer:
        """The tier's answer for one record's text, or TierFailure (nothing half-done)."""
        self._roll()
        if not self.available():
            raise TierFailure(self.name, "down", f"skipped for {self.cfg.cooldown_s:.0f} s")
        t0 = time.perf_counter()
        messages = task.teacher_messages([], text)
        try:
            out = await asyncio.wait_for(
                label_one(self.provider, task, {"text": text}, messages, True, task.prompt_hash),
                self.cfg.timeout_s,
            )
        except TimeoutError:
            raise self._failed("timeout", f"no answer in {self.cfg.timeout_s:g} s") from None
        if out.budget_stop:
            # Not the tier's fault: no breaker, the next day (or tier) goes on.
            raise TierFailure(self.name, "over_budget", "daily cap reached")
        if out.answer is None:
            reason = "invalid" if (out.reason or "").startswith("invalid") else "error"
            raise self._failed(reason, out.reason or "")
        self.failures = 0
        replies = out.replies
        return TierAnswer(
            tier=self.name,
            text=task.format_answer(out.answer),
            answer=out.answer,
            usd=sum(r.usd for r in replies if not r.cached),
            input_tokens=sum(r.input_tokens for r in replies),
            output_tokens=sum(r.output_tokens for r in replies),
            latency_ms=(time.perf_counter() - t0) * 1000,
            cached=all(r.cached for r in replies),
        )

    def _failed(self, reason: str, detail: str) -> TierFailure:
        self.failures += 1
        if self.failures >= self.cfg.down_after:
            self.down_until = self.clock() + self.cfg.cooldown_s
            self.failures = 0
        return TierFailure(self.name, reason, detail[:300])

    async def aclose(self) -> None:
        await self.provider.aclose()
        self.provider.close()
