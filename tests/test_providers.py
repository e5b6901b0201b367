"""The provider layer against a real HTTP server on loopback, through the real SDKs."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import sqlite3
import time
from email.utils import formatdate

import pytest
from fake_api import FakeAPI, Faults, messages_key

from temper.providers import (
    Budget,
    BudgetExceeded,
    Cache,
    CacheMiss,
    Completion,
    OverLimitReply,
    PrivacyError,
    ProviderConfig,
    ProviderError,
    RateLimiter,
    check_endpoint,
    estimate_tokens,
    is_local,
    open_provider,
    redact,
    retry_after_s,
)

FAST = {"backoff_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 2.0}


def config(tmp_path, api: FakeAPI, kind: str = "openai", **kw) -> ProviderConfig:
    url = api.openai_url if kind in ("openai", "replay") else api.anthropic_url
    values = {
        "kind": kind,
        "model": "teacher-x",
        "base_url": url,
        "prices": {"teacher-x": {"input": 1.0, "output": 2.0}},
        "cache": str(tmp_path / "cache.sqlite"),
        **FAST,
        **kw,
    }
    return ProviderConfig(**values)


def chat(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": f"q{i}"}]


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_round_trip_json_mode_usage_and_cache(tmp_path, kind):
    schema = {"type": "object", "properties": {"echo": {"type": "string"}}}
    with FakeAPI() as api:
        provider = open_provider(config(tmp_path, api, kind))
        done = provider.complete(chat(1), json_schema=schema)
        assert json.loads(done.text) == {"echo": "q1"}
        assert not done.cached and done.input_tokens > 0 and done.output_tokens > 0
        assert done.usd == pytest.approx((done.input_tokens * 1.0 + done.output_tokens * 2.0) / 1e6)
        sent = api.log[0]
        # Structured output reached the server in each vendor's own format.
        if kind == "openai":
            assert sent["response_format"]["json_schema"]["schema"] == schema
        else:
            assert sent["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
            assert sent["messages"][0] == {"role": "system", "content": "Answer in JSON."}
        assert sent["limits"] == {"max_tokens": 256}
        again = provider.complete(chat(1), json_schema=schema)
        assert again.cached and again.text == done.text and api.requests == 1
        # A different generation setting is a different cache key.
        provider.complete(chat(1))
        assert api.requests == 2
        assert provider.stats.cache_hits == 1 and provider.stats.requests == 2


def test_judge_style_batch_in_order_with_errors_as_values(tmp_path):
    """The evaluate judge's use: arbitrary messages, raw text back, order kept."""

    def fail_q0(messages):  # q0 fails for good (1 + 4 retries), the rest answer
        return "500" if messages[-1]["content"] == "q0" else None

    with FakeAPI(responder=lambda m: "score: " + m[-1]["content"], fault_fn=fail_q0) as api:
        provider = open_provider(config(tmp_path, api, concurrency=4))
        results = provider.complete_many([chat(0)] + [chat(i) for i in range(1, 20)])
        assert isinstance(results[0], ProviderError)
        assert [r.text for r in results[1:]] == [f"score: q{i}" for i in range(1, 20)]
        assert provider.stats.failures == 1 and provider.stats.retries >= 4


def test_each_fault_is_retried_and_retry_after_is_honoured(tmp_path):
    faults = Faults(retry_after=0.4, slow_s=1.0)
    with FakeAPI(faults=faults) as api:
        provider = open_provider(config(tmp_path, api, timeout_s=0.3))
        api.queue_faults(["429", "500", "malformed", "slow"])
        t0 = time.perf_counter()
        done = provider.complete(chat(1))
        elapsed = time.perf_counter() - t0
        assert json.loads(done.text) == {"echo": "q1"}
        assert api.requests == 5 and provider.stats.retries == 4
        assert elapsed >= 0.4 + 0.3  # waited out retry-after and the timeout
        assert set(provider.stats.errors) == {
            "RateLimitError",
            "InternalServerError",
            "JSONDecodeError",
            "APITimeoutError",
        }


def test_gives_up_after_max_retries_and_caches_nothing(tmp_path):
    with FakeAPI(faults=Faults(rate_500=1.0)) as api:
        provider = open_provider(config(tmp_path, api, max_retries=2))
        with pytest.raises(ProviderError, match="InternalServerError after 3 attempt"):
            provider.complete(chat(1))
        assert api.requests == 3 and len(provider.cache) == 0


def test_client_errors_are_not_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_KEY", "right")
    with FakeAPI(api_key="other") as api:
        provider = open_provider(config(tmp_path, api, api_key_env="TEST_KEY"))
        with pytest.raises(ProviderError, match="AuthenticationError after 1 attempt") as err:
            provider.complete(chat(1))
        assert api.requests == 1 and api.auth_failures == 1
        # The server echoed the key it got; the error we raise (rejects, logs) has it scrubbed.
        assert "'***'" in str(err.value) and "right" not in str(err.value)
        assert "right" not in repr(provider)


def test_truncated_output_comes_back_with_its_finish_reason(tmp_path):
    with FakeAPI(responder=lambda m: '{"echo": "a long answer"}') as api:
        for kind, reason in (("openai", "length"), ("anthropic", "max_tokens")):
            provider = open_provider(config(tmp_path, api, kind))
            api.queue_faults(["truncated"])
            done = provider.complete(chat(7))
            assert done.finish_reason == reason and done.text == '{"echo": "a '


def test_request_cap_stops_before_sending(tmp_path):
    with FakeAPI() as api:
        provider = open_provider(config(tmp_path, api, max_requests=3, concurrency=8))
        results = provider.complete_many([chat(i) for i in range(10)])
        assert sum(isinstance(r, Completion) for r in results) == 3
        assert sum(isinstance(r, BudgetExceeded) for r in results) == 7
        assert api.requests == 3 and provider.stats.budget_refusals == 7


def test_spend_cap_holds_under_concurrency(tmp_path):
    # Each request reserves about (input + max_tokens) * price; the cap fits a handful.
    prices = {"teacher-x": {"input": 1000.0, "output": 1000.0}}
    with FakeAPI(latency_s=0.02) as api:
        cfg = config(tmp_path, api, prices=prices, max_usd=0.5, max_tokens=50, concurrency=16)
        provider = open_provider(cfg)
        results = provider.complete_many([chat(i) for i in range(50)])
        ok = [r for r in results if isinstance(r, Completion)]
        assert 0 < len(ok) < 50
        assert provider.budget.spent_usd <= cfg.max_usd
        assert provider.budget.spent_usd == pytest.approx(sum(r.usd for r in ok))
        assert api.requests == len(ok)


def test_budget_reservation_arithmetic():
    budget = Budget(max_usd=1.0, max_requests=100)
    budget.reserve(0.6)
    with pytest.raises(BudgetExceeded, match="spend cap"):
        budget.reserve(0.5)  # 0.6 in flight + 0.5 > 1.0
    budget.settle(0.6, 0.1)  # the answer cost less than reserved
    budget.reserve(0.5)
    assert budget.spent_usd == pytest.approx(0.1) and budget.reserved_usd == pytest.approx(0.5)


@pytest.mark.parametrize(
    "url",
    [
        "https://api.openai.com/v1",
        "http://10.1.2.3:8000/v1",
        "http://example.org",
        "http://127.0.0.1.nip.io/v1",
    ],
)
def test_external_endpoints_refused_by_default(tmp_path, url):
    cfg = ProviderConfig(
        kind="openai",
        model="m",
        base_url=url,
        prices={"m": {"input": 0, "output": 0}},
        cache=str(tmp_path / "c.sqlite"),
    )
    with pytest.raises(PrivacyError, match="allow_external is false"):
        open_provider(cfg)
    # Vendor default endpoints too (base_url null), whatever OPENAI_BASE_URL says.
    with pytest.raises(PrivacyError):
        open_provider(cfg.model_copy(update={"base_url": None, "kind": "anthropic"}))


def test_loopback_is_local():
    for url in (
        "http://127.0.0.1:1/v1",
        "http://localhost:8000",
        "http://[::1]:9/v1",
        "http://127.8.0.1",
    ):
        assert is_local(url), url
    # `*.localhost` is not provably local: deciding would ask a resolver, which may forward
    # the name to an external DNS server (before the fix it counted as loopback).
    for url in (
        "http://192.0.2.2:8000",
        "https://api.anthropic.com",
        "http://localhost.evil.com",
        "http://evil.localhost/v1",
        "http://a.b.localhost:8000",
    ):
        assert not is_local(url), url


def test_localhost_is_decided_by_the_hosts_file_and_pinned(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# comment\n\n127.0.0.1 localhost me\n::1 localhost ip6-localhost\n")
    cfg = ProviderConfig(kind="openai", model="m", base_url="http://localhost:8000/v1")
    # Pinned to the literal address: the SDK never resolves the name again.
    assert check_endpoint(cfg, hosts) == "http://127.0.0.1:8000/v1"
    assert (
        check_endpoint(cfg.model_copy(update={"base_url": "http://[::1]:9/v1"}), hosts)
        == "http://[::1]:9/v1"
    )
    hosts.write_text("127.0.0.1 localhost\n10.0.0.7 localhost\n")  # one address is not loopback
    assert not is_local("http://localhost:8000/v1", hosts)
    with pytest.raises(PrivacyError, match="not on this machine"):
        check_endpoint(cfg, hosts)
    # Allowed external endpoints are used as configured.
    external = cfg.model_copy(update={"allow_external": True, "base_url": "http://x.org/v1"})
    assert check_endpoint(external, hosts) == "http://x.org/v1"


def test_redaction_masks_before_sending_and_counts(tmp_path):
    text = (
        "Notices to jane.doe@acme.com or +1 (415) 555-0199, server 10.0.0.12, card "
        "4111 1111 1111 1111. Section 12.3.4 applies from 12/31/2006; fee $1,000,000."
    )
    with FakeAPI() as api:
        provider = open_provider(config(tmp_path, api, redact=["email", "phone", "ip", "card"]))
        provider.complete([{"role": "user", "content": text}])
        sent = api.log[0]["messages"][0]["content"]
    assert "jane.doe" not in sent and "555-0199" not in sent and "10.0.0.12" not in sent
    assert "4111" not in sent
    assert "Section 12.3.4" in sent and "12/31/2006" in sent and "$1,000,000" in sent
    assert dict(provider.stats.redactions) == {"email": 1, "phone": 1, "ip": 1, "card": 1}
    assert redact("call 555-0199", ["phone"]) == "call 555-0199"  # too short to be a number


def test_replay_answers_from_cache_and_errors_on_a_miss(tmp_path):
    with FakeAPI() as api:
        first = open_provider(config(tmp_path, api)).complete(chat(1))
        replay = open_provider(config(tmp_path, api, kind="replay"))
        assert replay.complete(chat(1)).text == first.text
        with pytest.raises(CacheMiss):
            replay.complete(chat(2))
        assert api.requests == 1


def test_rate_limiter_window():
    async def go() -> float:
        limiter = RateLimiter(rpm=2, tpm=None, window_s=0.3)
        t0 = time.perf_counter()
        for _ in range(5):  # 2 + 2 + 1: two full windows of waiting
            await limiter.acquire(1)
        return time.perf_counter() - t0

    assert 0.6 <= asyncio.run(go()) < 1.5

    async def tokens() -> float:
        limiter = RateLimiter(rpm=None, tpm=100, window_s=0.3)
        t0 = time.perf_counter()
        for _ in range(3):  # 60 + 60 > 100: each waits for the window
            await limiter.acquire(60)
        return time.perf_counter() - t0

    assert 0.6 <= asyncio.run(tokens()) < 1.5


def test_retry_after_parsing():
    class Err(Exception):
        def __init__(self, headers):
            self.response = type("R", (), {"headers": headers})()

    assert retry_after_s(Err({"retry-after": "2"})) == 2.0
    assert retry_after_s(Err({"retry-after-ms": "150", "retry-after": "9"})) == 0.15
    assert 5 <= retry_after_s(Err({"retry-after": formatdate(time.time() + 8, usegmt=True)})) <= 8
    assert retry_after_s(Err({})) is None and retry_after_s(ValueError()) is None


def _writer(path: str, start: int) -> None:
    cache = Cache(path)
    for i in range(start, start + 200):
        cache.put(f"k{i}", "openai", {"i": i}, Completion(f"t{i}", 1, 1, 0.0, 1.0, False))


def test_cache_survives_concurrent_writer_processes(tmp_path):
    path = str(tmp_path / "cache.sqlite")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, n * 200)) for n in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cache = Cache(path)
    assert len(cache) == 600
    assert cache.get("k599").text == "t599" and cache.get("k599").cached
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_cache_key_is_content_addressed(tmp_path):
    with FakeAPI() as api:
        provider = open_provider(config(tmp_path, api))
        key = provider.cache_key(chat(1))
        assert key == provider.cache_key(chat(1))
        assert key != provider.cache_key(chat(2))
        assert key != provider.cache_key(chat(1), prompt_version="v2")
        assert key != provider.cache_key(chat(1), max_tokens=7)
        other = open_provider(
            config(
                tmp_path, api, model="teacher-y", prices={"teacher-y": {"input": 0, "output": 0}}
            )
        )
        assert key != other.cache_key(chat(1))
        # The endpoint is not part of the key: a new loopback port keeps the finished work.
        moved = open_provider(config(tmp_path, api, base_url="http://localhost:1/v1"))
        assert key == moved.cache_key(chat(1))
        assert messages_key(chat(1)) != messages_key(chat(2))


def test_openai_output_limit_field_is_configurable(tmp_path):
    with FakeAPI() as api:
        provider = open_provider(config(tmp_path, api, token_limit_param="max_completion_tokens"))
        provider.complete(chat(1), max_tokens=20)
        assert api.log[0]["limits"] == {"max_completion_tokens": 20}


# --- the spend cap against a server that ignores the limits -----------------------------------


def worst_case(cfg: ProviderConfig, messages) -> float:
    price = cfg.prices[cfg.model]
    return price.cost(estimate_tokens(messages), cfg.max_tokens)


@pytest.mark.parametrize("fault", ["huge", "overbill"])
def test_reply_past_the_limits_is_rejected_not_retried_and_charged_its_worst_case(tmp_path, fault):
    """Before the fix a 2 MB reply (or a usage claim of 500k output tokens) was accepted as a
    valid answer and charged what the server claimed, far past max_usd."""
    with FakeAPI() as api:
        cfg = config(tmp_path, api)
        provider = open_provider(cfg)
        api.queue_faults([fault])
        with pytest.raises(OverLimitReply, match="bytes|over the requested limit"):
            provider.complete(chat(1))
        assert api.requests == 1  # not retried: it would happen again, at our expense
        assert provider.stats.over_limit == 1 and len(provider.cache) == 0
        assert provider.budget.spent_usd == pytest.approx(worst_case(cfg, chat(1)))
        assert provider.stats.usd == pytest.approx(provider.budget.spent_usd)
        if fault == "overbill":  # the claim beyond the limit is recorded, not paid
            assert provider.stats.usd_claimed_over_limit > 0.9
        # The next request is served normally.
        assert json.loads(provider.complete(chat(2)).text) == {"echo": "q2"}


def test_spend_cap_holds_whatever_the_server_sends(tmp_path):
    prices = {"teacher-x": {"input": 100.0, "output": 100.0}}
    faults = Faults(rate_huge=0.4, rate_overbill=0.4, seed=3)
    with FakeAPI(faults=faults, latency_s=0.01) as api:
        cfg = config(tmp_path, api, prices=prices, max_usd=0.5, concurrency=8)
        provider = open_provider(cfg)
        results = provider.complete_many([chat(i) for i in range(60)])
        refused = sum(isinstance(r, BudgetExceeded) for r in results)
        assert refused > 0 and provider.stats.over_limit > 0
        # Every charge is at most its reservation, and reservations never pass the cap.
        assert provider.budget.spent_usd <= cfg.max_usd
        # The server would have billed far more: its claims were not believed.
        assert api.billed_usd(100.0, 100.0) > 10 * cfg.max_usd


def test_abandoned_requests_are_charged_their_worst_case(tmp_path):
    """A request that times out on the client still completes, and bills, on the server."""
    with FakeAPI(faults=Faults(slow_s=0.6)) as api:
        cfg = config(tmp_path, api, timeout_s=0.2, max_retries=1)
        provider = open_provider(cfg)
        api.queue_faults(["slow", "slow"] * 3)
        results = provider.complete_many([chat(i) for i in range(3)])
        assert all(isinstance(r, ProviderError) for r in results)
        deadline = time.monotonic() + 10
        while api.in_flight and time.monotonic() < deadline:  # let the server finish billing
            time.sleep(0.05)
        assert provider.stats.abandoned == 6
        billed = api.billed_usd(1.0, 2.0)
        assert billed > 0
        # Before the fix the spend was 0: abandoned requests cost nothing in our books.
        assert provider.budget.spent_usd >= billed
        assert provider.budget.spent_usd == pytest.approx(
            2 * sum(worst_case(cfg, chat(i)) for i in range(3))
        )


def test_a_refused_connection_is_not_charged(tmp_path):
    import socket

    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = ProviderConfig(
        kind="openai",
        model="m",
        base_url=f"http://127.0.0.1:{port}/v1",
        prices={"m": {"input": 1.0, "output": 1.0}},
        max_retries=1,
        cache=str(tmp_path / "c.sqlite"),
        **FAST,
    )
    provider = open_provider(cfg)
    with pytest.raises(ProviderError, match="APIConnectionError"):
        provider.complete(chat(1))
    assert provider.budget.spent_usd == 0 and provider.stats.abandoned == 0
