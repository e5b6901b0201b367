"""The router on its own: the policy's bands, and the walk over real API tiers.

The API tiers are real providers (the openai and anthropic SDKs) talking to fake vendor servers
on loopback (tests/fake_api.py); the self tier is a stand-in coroutine here, because what is
tested is the router's walk (tests/test_serve_route.py runs the real model behind it).
"""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from fake_api import FakeAPI, Faults

from temper.online.route import (
    SELF,
    ApiTier,
    NoTierAnswered,
    Policy,
    RouteConfig,
    Router,
    RouteRefused,
    SelfAnswer,
    decisive_confidence,
)
from temper.task import load_task

TASK = load_task("configs/tasks/clause_review.yaml")
CLAUSE = "This Agreement is governed by the laws of the State of Delaware."
ANSWER = {"clause_type": "Governing Law", "key_term": "Delaware"}


def answering(messages):
    return json.dumps(ANSWER)


RUN = itertools.count()


def tier_cfg(tmp_path, name: str, api: FakeAPI, kind: str = "openai", **kw) -> dict:
    """A tier on its fake vendor, with a cache of its own per router (no answer carries over)."""
    url = api.openai_url if kind == "openai" else api.anthropic_url
    return {
        "name": name,
        "provider": {
            "kind": kind,
            "model": f"{name}-model",
            "base_url": url,
            "prices": {f"{name}-model": {"input": 1.0, "output": 4.0}},
            "cache": str(tmp_path / f"{name}-{next(RUN)}.sqlite"),
            "max_retries": 0,
        },
        **kw,
    }


def router(tmp_path, mid: FakeAPI, frontier: FakeAPI, clock=None, **kw) -> Router:
    mid_kw = kw.pop("mid_tier", {})
    cfg = RouteConfig.model_validate(
        {
            "enabled": True,
            "self_threshold": 0.9,
            "tiers": [
                tier_cfg(tmp_path, "mid", mid, min_confidence=0.5, **mid_kw),
                tier_cfg(tmp_path, "frontier", frontier, kind="anthropic"),
            ],
            **kw,
        }
    )
    tiers = [ApiTier(t, clock=clock) if clock else ApiTier(t) for t in cfg.api_tiers()]
    return Router(cfg, tiers)


def mine(confidence: float | None, error: str | None = None):
    calls = []

    async def answer() -> SelfAnswer:
        calls.append(1)
        return SelfAnswer(
            text='{"clause_type": "Notices", "key_term": null}',
            confidence=confidence,
            usd=1e-6,
            error=error,
        )

    answer.calls = calls
    return answer


@pytest.fixture
def apis():
    with FakeAPI(answering) as mid, FakeAPI(answering) as frontier:
        yield mid, frontier


def run(r: Router, answer, **kw):
    async def go():
        try:
            return await r.route(TASK, CLAUSE, answer, **kw)
        finally:
            await r.aclose()

    return asyncio.run(go())


def test_policy_bands_and_fallback_order():
    p = Policy(0.9, (("mid", 0.5), ("frontier", 0.0)))
    assert [p.pick(c) for c in (0.95, 0.9, 0.89, 0.5, 0.49, 0.0, None)] == [
        SELF,
        SELF,
        "mid",
        "mid",
        "frontier",
        "frontier",
        "frontier",
    ]
    assert p.fallbacks("mid") == ["mid", "frontier"]
    assert p.fallbacks("frontier") == ["frontier", "mid"]  # a cheaper answer beats none
    assert Policy(0.9).pick(0.1) == SELF  # no API tier: the self tier answers everything
    assert decisive_confidence({"a": 0.7, "b": 0.4}, None) == 0.4
    assert decisive_confidence({"a": 0.7, "b": None}, None) is None
    assert decisive_confidence({"a": 0.7, "b": None}, "a") == 0.7


def test_config_refuses_bad_tiers():
    with pytest.raises(ValueError, match="unique and not 'self'"):
        RouteConfig.model_validate({"tiers": [{"name": "self"}]})
    with pytest.raises(ValueError, match="must not increase"):
        RouteConfig.model_validate(
            {"tiers": [{"name": "a", "min_confidence": 0.1}, {"name": "b", "min_confidence": 0.5}]}
        )
    with pytest.raises(ValueError, match="gold labels"):
        RouteConfig.model_validate({"tiers": [{"name": "mid"}]}).api_tiers()


def test_confident_self_answer_stays_home(tmp_path, apis):
    mid, frontier = apis
    routed = run(router(tmp_path, mid, frontier), mine(0.97))
    assert routed.tier == SELF and not routed.attempts and routed.deferred_to is None
    assert mid.requests == frontier.requests == 0


def test_bands_pick_the_tier_and_report_its_cost(tmp_path, apis):
    mid, frontier = apis
    routed = run(router(tmp_path, mid, frontier), mine(0.7))
    assert (routed.tier, routed.deferred_to) == ("mid", "mid")
    assert json.loads(routed.text) == ANSWER and routed.confidence == 0.7
    # Its usage, at the tier's price: 1 and 4 USD per 1M input / output tokens.
    assert routed.usd == pytest.approx((routed.input_tokens * 1 + routed.output_tokens * 4) / 1e6)
    assert routed.usd > 0 and mid.requests == 1 and frontier.requests == 0
    routed = run(router(tmp_path, mid, frontier), mine(0.2))
    assert routed.tier == "frontier" and frontier.requests == 1  # the Anthropic SDK's tier


def test_a_failing_tier_hands_over_and_the_self_answer_is_the_last_resort(tmp_path, apis):
    mid, frontier = apis
    mid.faults = Faults(rate_500=1.0)
    routed = run(router(tmp_path, mid, frontier), mine(0.7))
    assert routed.tier == "frontier" and routed.attempts == [{"tier": "mid", "reason": "error"}]
    frontier.faults = Faults(rate_500=1.0)
    answer = mine(0.7)
    routed = run(router(tmp_path, mid, frontier), answer)
    assert routed.tier == SELF and routed.last_resort and len(routed.attempts) == 2
    assert len(answer.calls) == 1  # the self tier ran once, first


def test_slow_tier_times_out_and_the_next_answers(tmp_path, apis):
    mid, frontier = apis
    mid.faults = Faults(rate_slow=1.0, slow_s=3.0)
    routed = run(router(tmp_path, mid, frontier, mid_tier={"timeout_s": 0.5}), mine(0.7))
    assert routed.tier == "frontier" and routed.attempts == [{"tier": "mid", "reason": "timeout"}]


def test_allow_external_false_sends_nothing(tmp_path, apis):
    mid, frontier = apis
    routed = run(router(tmp_path, mid, frontier), mine(0.1), allow_external=False)
    assert routed.tier == SELF and routed.external_blocked and routed.deferred_to == "frontier"
    with pytest.raises(RouteRefused, match="not allowed by this request"):
        run(router(tmp_path, mid, frontier), mine(0.1), tier="mid", allow_external=False)
    # The server's config is the ceiling: a request cannot allow what it forbids.
    r = router(tmp_path, mid, frontier, allow_external=False)
    routed = run(r, mine(0.1), allow_external=True)
    assert routed.tier == SELF and routed.external_blocked
    assert mid.requests == frontier.requests == 0


def test_forced_tiers(tmp_path, apis):
    mid, frontier = apis
    answer = mine(0.99)
    routed = run(router(tmp_path, mid, frontier), answer, tier="frontier")
    assert routed.tier == "frontier" and not answer.calls  # the self tier never ran
    routed = run(router(tmp_path, mid, frontier), mine(0.1), tier=SELF)
    assert routed.tier == SELF and mid.requests == 0
    with pytest.raises(RouteRefused, match="unknown tier"):
        run(router(tmp_path, mid, frontier), mine(0.1), tier="gpt-5")


def test_daily_cap_is_never_crossed_and_a_new_day_resets_it(tmp_path, apis):
    mid, frontier = apis
    now = [1_800_000_000.0]  # 2027-01-15 08:00 UTC
    r = router(tmp_path, mid, frontier, clock=lambda: now[0], mid_tier={"daily_requests": 2})

    async def go():
        try:
            first = [await r.route(TASK, f"{CLAUSE} {i}.", mine(0.7)) for i in range(4)]
            spent = r.tiers["mid"].spent()
            now[0] += 86_400  # the next UTC day
            later = await r.route(TASK, f"{CLAUSE} Annex.", mine(0.7))
            return first, spent, later
        finally:
            await r.aclose()

    first, spent, later = asyncio.run(go())
    assert [x.tier for x in first] == ["mid", "mid", "frontier", "frontier"]
    assert first[2].attempts == [{"tier": "mid", "reason": "over_budget"}]
    assert spent[1] == 2 and later.tier == "mid" and mid.requests == 3


def test_breaker_skips_a_failing_tier_for_its_cooldown(tmp_path, apis):
    mid, frontier = apis
    mid.faults = Faults(rate_500=1.0)
    now = [1_800_000_000.0]
    r = router(
        tmp_path, mid, frontier, clock=lambda: now[0], mid_tier={"down_after": 2, "cooldown_s": 60}
    )

    async def go():
        try:
            first = [await r.route(TASK, f"{CLAUSE} {i}", mine(0.7)) for i in range(3)]
            now[0] += 61
            mid.faults = Faults()
            return first, await r.route(TASK, f"{CLAUSE} again", mine(0.7))
        finally:
            await r.aclose()

    first, later = asyncio.run(go())
    assert [x.attempts[0]["reason"] for x in first] == ["error", "error", "down"]
    assert mid.requests == 3 and later.tier == "mid"  # 2 failures, none while down, 1 after


def test_nothing_answers_only_when_every_tier_fails(tmp_path, apis):
    mid, frontier = apis
    mid.faults = frontier.faults = Faults(rate_500=1.0)
    with pytest.raises(NoTierAnswered, match="self: overloaded"):
        run(router(tmp_path, mid, frontier), mine(None, error="overloaded"))
    mid.faults = Faults()
    routed = run(router(tmp_path, mid, frontier), mine(None, error="timeout"))
    assert routed.tier == "mid" and routed.attempts[0] == {"tier": SELF, "reason": "timeout"}
