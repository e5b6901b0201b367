"""`temper serve` with the router: a real server process, the real base model with a registered
LoRA version, and two API tiers that are fake vendor servers on loopback spoken to by the real
openai and anthropic SDKs (tests/fake_api.py). The mid tier always fails (500); the frontier
answers, up to its daily request cap. The self threshold is 1.0, so every answer the model is
not certain of is deferred: what is tested is that every request is still answered, each says
which tier answered and what it cost, the cap holds, and nothing leaves the machine when a
request forbids it.

The router, the semantic cache and the request log are the gateway's, above the engine
boundary: the same code whichever engine answers. So they are tested over vLLM (the engine
teams deploy; the gateway attaches to the session's vLLM, `serve.engine_url`,
conftest.shared_vllm; the gateway that starts its own is test_serve's), and what an engine
does change, the self tier's answers and label confidences and so the tier decisions, is
compared on both engines (`test_same_answers_confidences_and_tiers_on_both_engines`). Until
December 2026 every test here also ran on the built-in engine: 49 s of CI proving the
engine-independent layer a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3

import openai
import pytest
from fake_api import FakeAPI, Faults
from registry_fixtures import make_project
from test_serve import ENGINES, KEY, engine_args, serve_champion, stop

pytestmark = pytest.mark.slow
FRONTIER_CAP = 3
CLAUSES = [
    "This Agreement shall be governed by the laws of the State of New York.",
    "Either party may terminate this Agreement upon ninety (90) days written notice.",
    "Licensee shall not assign this Agreement without the prior written consent of Licensor.",
    "This Agreement shall automatically renew for successive one (1) year terms.",
    "Neither party shall solicit the employees of the other party during the Term.",
    "The Effective Date of this Agreement is January 1, 2020.",
]
ANSWER = {"clause_type": "Governing Law", "key_term": "New York"}
# `routed`'s engine: vLLM for the engine-independent layer, both for the engine parity.
OVER_VLLM = pytest.mark.parametrize("routed", ENGINES[1:], indirect=True)
ON_BOTH = pytest.mark.parametrize("routed", ENGINES, indirect=True)


def tier(name: str, kind: str, api: FakeAPI, **kw) -> dict:
    return {
        "name": name,
        "provider": {
            "kind": kind,
            "model": f"{name}-model",
            "base_url": api.openai_url if kind == "openai" else api.anthropic_url,
            "prices": {f"{name}-model": {"input": 0.5, "output": 2.0}},
            "max_retries": 0,
        },
        **kw,
    }


@pytest.fixture(scope="session")
def decisions() -> dict[str, list[tuple]]:
    """What each engine answered to the same forced-self requests (engine -> rows)."""
    return {}


@pytest.fixture(scope="module")
def routed(request, tmp_path_factory, base_model_dir):
    extra, env = engine_args(request.param), pytest.MonkeyPatch()
    if request.param == "vllm":  # the gateway attached to the session's vLLM (serve.engine_url)
        vllm = request.getfixturevalue("shared_vllm")
        extra += ["-S", f"serve.engine_url={vllm.url}"]
        env.setenv("VLLM_API_KEY", vllm.key)
    mid = FakeAPI(lambda m: json.dumps(ANSWER), faults=Faults(rate_500=1.0)).start()
    frontier = FakeAPI(lambda m: json.dumps(ANSWER)).start()
    project = tmp_path_factory.mktemp(f"route-project-{request.param}")
    route = {
        "enabled": True,
        "self_threshold": 1.0,
        "tiers": [
            tier("mid", "openai", mid, min_confidence=0.0, down_after=3, cooldown_s=600),
            tier("frontier", "anthropic", frontier, daily_requests=FRONTIER_CAP),
        ],
    }
    make_project(project, base_model_dir, {"route": route})
    try:
        s = serve_champion(project, base_model_dir, "-S", "serve.semantic_cache=true", *extra)
    finally:
        env.undo()  # the server has its environment
    s.engine = request.param
    with contextlib.chdir(project):
        yield s, mid, frontier
    stop(s)
    mid.stop()
    frontier.stop()


def ask(client: openai.OpenAI, text: str, **route):
    raw = client.chat.completions.with_raw_response.create(
        model="champion",
        messages=[{"role": "user", "content": text}],
        extra_body={"route": route} if route else None,
    )
    return raw.headers, raw.parse()


@OVER_VLLM
def test_every_request_answered_tiers_reported_caps_respected(routed):
    server, mid, frontier = routed
    client = server.client()
    answers = [ask(client, text) for text in CLAUSES]
    routes = [body.model_extra["temper"]["route"] for _, body in answers]
    for (headers, body), route in zip(answers, routes, strict=True):
        assert headers["x-temper-tier"] == route["tier"]
        assert float(headers["x-temper-cost-usd"]) == pytest.approx(route["cost_usd"], abs=1e-8)
        assert json.loads(body.choices[0].message.content)  # an answer, whichever tier
        if route["tier"] == "self":
            assert route["self_confidence"] == 1.0 or route["last_resort"]
    deferred = [r for r in routes if r["deferred_to"] is not None]
    assert len(deferred) >= FRONTIER_CAP + 1, routes  # the model is rarely certain
    by_frontier = [r for r in routes if r["tier"] == "frontier"]
    assert len(by_frontier) == FRONTIER_CAP == frontier.requests  # the daily cap holds
    assert all(r["cost_usd"] > 0 for r in by_frontier)
    # The failing mid tier was tried first each time until its breaker opened.
    assert mid.requests == 3
    assert deferred[3]["attempts"][0] == {"tier": "mid", "reason": "down"}
    last = [r for r in deferred if r["tier"] == "self"]
    assert last and all(r["last_resort"] for r in last)
    assert {"tier": "frontier", "reason": "over_budget"} in last[0]["attempts"]
    metrics = server.metrics()
    assert (
        f'temper_route_answers_total{{last_resort="false",tier="frontier"}} {FRONTIER_CAP}.0'
        in (metrics)
    )
    assert 'temper_route_tier_failures_total{reason="error",tier="mid"} 3.0' in metrics


@OVER_VLLM
def test_repeats_come_from_the_semantic_cache_and_changed_numbers_do_not(routed):
    server, mid, frontier = routed
    client = server.client()
    before = (mid.requests, frontier.requests)
    first = ask(client, CLAUSES[0])[1].model_extra["temper"]["route"]
    # Stored by the first test unless it was a last-resort answer (those are never stored).
    headers, body = ask(client, "  " + CLAUSES[0].upper())  # the same text, normalised
    extra = body.model_extra["temper"]
    assert headers["x-temper-tier"] == "cache" and extra["cache"]["kind"] == "exact", first
    assert float(headers["x-temper-cost-usd"]) == 0.0
    changed = CLAUSES[1].replace("ninety (90)", "sixty (60)")
    headers, _ = ask(client, changed)
    assert headers["x-temper-tier"] != "cache"  # other numbers: never a similarity hit
    assert frontier.requests == before[1]  # the frontier is over its cap; the hit cost nothing
    assert 'temper_cache_hits_total{kind="exact"}' in server.metrics()


@OVER_VLLM
def test_allow_external_false_sends_nothing_out(routed):
    server, mid, frontier = routed
    client = server.client()
    before = (mid.requests, frontier.requests)
    for text in CLAUSES[:3]:
        headers, body = ask(client, f"{text} (internal)", allow_external=False)
        route = body.model_extra["temper"]["route"]
        assert headers["x-temper-tier"] == "self" and route["tier"] == "self"
        assert route["external_blocked"] or route["deferred_to"] is None
    assert (mid.requests, frontier.requests) == before
    with pytest.raises(openai.BadRequestError, match="external tiers are not allowed"):
        ask(client, CLAUSES[0], tier="frontier", allow_external=False)
    with pytest.raises(openai.BadRequestError, match="unknown tier"):
        ask(client, CLAUSES[0], tier="gpt-5")
    assert (mid.requests, frontier.requests) == before


@OVER_VLLM
def test_streamed_routed_answer_matches_and_says_its_tier(routed):
    server, *_ = routed
    client = server.client()
    _, body = ask(client, CLAUSES[0], tier="self")
    parts, tail = [], None
    for chunk in client.chat.completions.create(
        model="champion",
        messages=[{"role": "user", "content": CLAUSES[0]}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"route": {"tier": "self"}},
    ):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        else:
            tail = chunk
    assert "".join(parts) == body.choices[0].message.content
    assert tail.usage.completion_tokens == body.usage.completion_tokens
    assert tail.model_extra["temper"]["route"]["tier"] == "self"


@OVER_VLLM
def test_16_requests_at_concurrency_8_without_a_failure(routed):
    """Routed, cached and logged requests at once: more than a batch at a time, so they queue;
    none fails, and the request log holds each with its tier and the confidence that decided
    it. (Until December 2026: 64 at 16, six minutes of CI for the same proof.)"""
    server, *_ = routed
    store = server.project / ".cache" / "monitor.sqlite"

    def logged() -> list[tuple]:
        if not store.exists():
            return []
        with contextlib.closing(sqlite3.connect(store)) as db:
            query = "select id, tier, confidence from requests where tier = 'self'"
            return db.execute(query).fetchall()

    before = {row[0] for row in logged()}

    async def run() -> list:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        gate = asyncio.Semaphore(8)

        async def one(i: int):
            async with gate:
                return await client.chat.completions.with_raw_response.create(
                    model="champion",
                    messages=[{"role": "user", "content": f"{CLAUSES[i % 6]} (clause {i})"}],
                    extra_body={"route": {"tier": "self"}},
                    timeout=300,
                )

        try:
            return await asyncio.gather(*(one(i) for i in range(16)), return_exceptions=True)
        finally:
            await client.close()

    got = asyncio.run(run())
    assert [g for g in got if isinstance(g, Exception)] == []
    bodies = [g.parse() for g in got]
    assert all(json.loads(b.choices[0].message.content) for b in bodies)
    assert {b.model_extra["temper"]["route"]["tier"] for b in bodies} == {"self"}
    ids = {g.headers["x-request-id"] for g in got}
    assert len(ids) == 16

    from test_serve import wait_until

    wait_until(lambda: ids <= {row[0] for row in logged()} - before, 60, "the request log")
    rows = [row for row in logged() if row[0] in ids]
    assert all(row[2] is not None and 0.0 <= row[2] <= 1.0 for row in rows), rows
    assert 'gen_ai_server_token_usage_total{gen_ai_operation_name="chat"' in server.metrics()


@ON_BOTH
def test_same_answers_confidences_and_tiers_on_both_engines(routed, decisions):
    """The router's registered threshold keeps its meaning on vLLM: the self tier's answers
    and label confidences (vLLM rescored to the raw model's, float32) match the built-in's,
    so the tier decisions do too."""
    server, *_ = routed
    client = server.client()
    rows = []
    for text in CLAUSES:
        _, body = ask(client, f"{text} (parity)", tier="self")
        route = body.model_extra["temper"]["route"]
        rows.append((body.choices[0].message.content, route["self_confidence"]))
    decisions[server.engine] = rows
    if len(decisions) < len(ENGINES):
        pytest.skip("compared when the last engine's module runs")
    from temper.online.route.policy import Policy

    builtin, vllm = decisions["builtin"], decisions["vllm"]
    assert [r[0] for r in vllm] == [r[0] for r in builtin]
    assert [r[1] for r in vllm] == pytest.approx([r[1] for r in builtin], rel=1e-3, abs=1e-6)
    # The policy the route stage fits and the router applies, over a sweep of thresholds
    # (the route stage's replay uses the same `Policy`): the same tier for every answer.
    for t in (0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99):
        policy = Policy(t, (("mid", t / 2), ("frontier", 0.0)))
        assert [policy.pick(r[1]) for r in vllm] == [policy.pick(r[1]) for r in builtin], t
