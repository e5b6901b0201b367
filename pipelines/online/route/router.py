"""The router: the self tier answers first; an unsure answer goes to an API tier; a tier that
is down, slow or over its cap hands over to the next; the self tier's answer, flagged, is the
last resort, so a request fails only when no tier at all can answer.

    router = Router.open(cfg)                       # cfg: RouteConfig (params.yaml `route:`)
    routed = await router.route(task, text, self_answer, tier=None, allow_external=None)
    routed.tier, routed.text, routed.usd, routed.attempts, routed.last_resort

`self_answer` is an async callable that runs the self-hosted model (serve passes its batcher);
it is awaited at most once, and not at all when a request forces an API tier that answers.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ...errors import TemperError
from ...task import TaskConfig
from .config import SELF, RouteConfig
from .policy import Policy
from .tiers import ApiTier, TierFailure

log = logging.getLogger("temper.route")


@dataclass
class SelfAnswer:
    """What the self-hosted model said, how sure it was, what its machine time cost."""

    text: str = ""
    confidence: float | None = None
    usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None  # it could not answer (overloaded, timed out, failed)
    extra: dict[str, Any] = field(default_factory=dict)  # the serve body's `temper` part


@dataclass
class Routed:
    """The answer a client gets, and how it was reached."""

    tier: str
    text: str
    usd: float
    input_tokens: int
    output_tokens: int
    confidence: float | None = None  # the self tier's, when it answered first
    deferred_to: str | None = None  # the policy's choice when that was not the self tier
    attempts: list[dict[str, str]] = field(default_factory=list)  # tiers that failed, why
    last_resort: bool = False  # the self tier's answer because no API tier could answer
    external_blocked: bool = False  # deferral wanted, but API tiers were not allowed
    self_answer: SelfAnswer | None = None
    self_threshold: float | None = None  # the threshold the decision used

    def summary(self) -> dict[str, Any]:
        """The `route` part of a response body (and of the request log line)."""
        return {
            "tier": self.tier,
            "cost_usd": round(self.usd, 8),
            "self_confidence": self.confidence,
            "self_threshold": self.self_threshold,
            "deferred_to": self.deferred_to,
            "attempts": self.attempts,
            "last_resort": self.last_resort,
            "external_blocked": self.external_blocked,
        }


class RouteRefused(TemperError, ValueError):
    """A request's routing options are impossible (unknown tier, or an API tier forced
    while external tiers are forbidden)."""


class NoTierAnswered(TemperError, RuntimeError):
    """Every tier failed, the self tier included."""

    def __init__(self, attempts: list[dict[str, str]]):
        super().__init__(
            "no tier could answer: " + "; ".join(f"{a['tier']}: {a['reason']}" for a in attempts)
        )
        self.attempts = attempts


class Router:
    """The tiers, the policy, and the walk from one to the next."""

    def __init__(self, cfg: RouteConfig, tiers: list[ApiTier], policy: Policy | None = None):
        self.cfg = cfg
        self.tiers = {t.name: t for t in tiers}
        self.policy = policy or Policy.from_config(cfg)

    @classmethod
    def open(cls, cfg: RouteConfig) -> Router:
        """Open every API tier (privacy guard and prices checked now, not at the first call)."""
        return cls(cfg, [ApiTier(t) for t in cfg.api_tiers()])

    def names(self) -> list[str]:
        return [SELF, *self.tiers]

    async def route(
        self,
        task: TaskConfig,
        text: str,
        self_answer: Callable[[], Awaitable[SelfAnswer]],
        *,
        tier: str | None = None,
        allow_external: bool | None = None,
        self_threshold: float | None = None,
    ) -> Routed:
        """Answer one record's text (`self_threshold`: the served version's own, if it has
        one). Raises RouteRefused (bad options) or NoTierAnswered."""
        policy = self.policy
        if self_threshold is not None:
            policy = Policy(self_threshold, policy.bands)
        routed = await self._walk(policy, task, text, self_answer, tier, allow_external)
        routed.self_threshold = policy.self_threshold
        return routed

    async def _walk(
        self,
        policy: Policy,
        task: TaskConfig,
        text: str,
        self_answer: Callable[[], Awaitable[SelfAnswer]],
        tier: str | None,
        allow_external: bool | None,
    ) -> Routed:
        external = self.cfg.allow_external and allow_external is not False and bool(self.tiers)
        if tier is not None and tier not in self.names():
            raise RouteRefused(f"unknown tier {tier!r} (tiers: {', '.join(self.names())})")
        if tier not in (None, SELF) and not external:
            raise RouteRefused(
                f"tier {tier!r} is an API tier, and external tiers are not allowed "
                + ("by this request" if self.cfg.allow_external else "by the server")
            )
        mine: SelfAnswer | None = None
        if tier in (None, SELF):
            mine = await self_answer()
            first = policy.pick(None if mine.error else mine.confidence)
            if tier == SELF or (mine.error is None and first == SELF):
                return self._from_self(mine)
            if not external:
                return self._from_self(mine, deferred_to=first, external_blocked=True)
        else:
            first = tier
        attempts = [{"tier": SELF, "reason": mine.error}] if mine and mine.error else []
        for name in policy.fallbacks(first):
            try:
                got = await self.tiers[name].ask(task, text)
            except TierFailure as failure:
                log.warning("tier failed", extra={"tier": name, "reason": failure.reason})
                attempts.append({"tier": name, "reason": failure.reason})
                continue
            return Routed(
                tier=name,
                text=got.text,
                usd=got.usd,
                input_tokens=got.input_tokens,
                output_tokens=got.output_tokens,
                confidence=mine.confidence if mine else None,
                deferred_to=first,
                attempts=attempts,
                self_answer=mine,
            )
        if mine is None:
            mine = await self_answer()
        return self._from_self(mine, deferred_to=first, attempts=attempts, last_resort=True)

    @staticmethod
    def _from_self(mine: SelfAnswer, attempts: list[dict[str, str]] | None = None, **kw: Any):
        """The self tier's answer; NoTierAnswered when it has none (every tier failed)."""
        attempts = attempts or []
        if mine.error is not None:
            failed = [a for a in attempts if a["tier"] != SELF]
            raise NoTierAnswered([*failed, {"tier": SELF, "reason": mine.error}])
        return Routed(
            attempts=attempts,
            tier=SELF,
            text=mine.text,
            usd=mine.usd,
            input_tokens=mine.input_tokens,
            output_tokens=mine.output_tokens,
            confidence=mine.confidence,
            self_answer=mine,
            **kw,
        )

    async def aclose(self) -> None:
        for t in self.tiers.values():
            await t.aclose()
