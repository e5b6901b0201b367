"""Vendor prompt caching in the provider layer: breakpoints sent, cached tokens priced.

Against the loopback fake API (tests/fake_api.py) with its prompt cache on, through the real
SDKs: the server, not the test, decides what was cached, and reports it in each vendor's own
usage fields.
"""

from __future__ import annotations

import sqlite3

import pytest
from fake_api import FakeAPI, tokens

from temper.providers import Cache, Completion, Price, ProviderConfig, open_provider

FAST = {"backoff_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 2.0}
# USD per 1M tokens: input 4, cache read 0.4 (0.1x), cache write 5 (1.25x), output 20.
PRICE = {"input": 4.0, "cached_input": 0.4, "cache_write": 5.0, "output": 20.0}
SYSTEM = "You review contract clauses. " * 20


def config(tmp_path, api: FakeAPI, kind: str, **kw) -> ProviderConfig:
    return ProviderConfig(
        kind=kind,
        model="m",
        base_url=api.openai_url if kind == "openai" else api.anthropic_url,
        prices={"m": PRICE},
        cache=str(tmp_path / "cache.sqlite"),
        **FAST,
        **kw,
    )


def few_shot(question: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "example clause"},
        {"role": "assistant", "content": '{"clause_type": "Governing Law"}'},
        {"role": "user", "content": question},
    ]


def usd(tin: int, tout: int, read: int = 0, written: int = 0) -> float:
    fresh = tin - read - written
    return (fresh * 4.0 + read * 0.4 + written * 5.0 + tout * 20.0) / 1e6


def test_price_counts_cached_and_written_tokens_at_their_rates():
    price = Price(**PRICE)
    # 1,000 input of which 600 read and 100 written, 50 output:
    # (300 * 4 + 600 * 0.4 + 100 * 5 + 50 * 20) / 1e6 = (1200 + 240 + 500 + 1000) / 1e6
    assert price.cost(1000, 50, 600, 100) == pytest.approx(2940 / 1e6)
    plain = Price(input=4.0, output=20.0)  # no cache prices: cached tokens cost full input
    assert plain.cost(1000, 50, 600, 100) == pytest.approx((4000 + 1000) / 1e6)
    assert price.worst_case(1000, 50) == pytest.approx((5000 + 1000) / 1e6)


def test_anthropic_marks_the_shared_prefix_and_prices_cache_reads(tmp_path):
    with FakeAPI(prompt_cache=True) as api:
        provider = open_provider(config(tmp_path, api, "anthropic"))
        first = provider.complete(few_shot("clause one"))
        second = provider.complete(few_shot("clause two"))
        # Breakpoints on the system prompt and on the last few-shot turn, not the question.
        assert api.log[0]["cache_control"] == ["system", "turn 2"]
        assert api.log[1]["cache_control"] == ["system", "turn 2"]
        # The text the server read is the same as without breakpoints.
        assert api.log[0]["messages"][0] == {"role": "system", "content": SYSTEM}
        prefix = sum(tokens(m["content"]) for m in api.log[0]["messages"][:3])
        assert first.cached_input_tokens == 0 and second.cached_input_tokens == prefix
        # input_tokens counts all input (Anthropic reports the cached part apart).
        total = sum(tokens(m["content"]) for m in api.log[1]["messages"])
        assert second.input_tokens == total
        assert first.usd == pytest.approx(usd(first.input_tokens, first.output_tokens, 0, prefix))
        assert second.usd == pytest.approx(usd(total, second.output_tokens, prefix, 0))
        assert second.usd < first.usd
        assert provider.stats.cached_input_tokens == prefix
        assert provider.stats.cache_write_tokens == prefix


def test_anthropic_caching_can_be_switched_off(tmp_path):
    with FakeAPI(prompt_cache=True) as api:
        provider = open_provider(config(tmp_path, api, "anthropic", prompt_caching=False))
        provider.complete(few_shot("clause one"))
        again = provider.complete(few_shot("clause two"))
        assert api.log[1]["cache_control"] == [] and again.cached_input_tokens == 0
        assert again.usd == pytest.approx(usd(again.input_tokens, again.output_tokens))


def test_openai_automatic_prefix_cache_is_priced_at_cached_input(tmp_path):
    with FakeAPI(prompt_cache=True) as api:
        provider = open_provider(config(tmp_path, api, "openai"))
        provider.complete(few_shot("clause one"))
        second = provider.complete(few_shot("clause two"))
        assert api.log[1]["cache_control"] == []  # nothing to mark: OpenAI caches by itself
        system = tokens(SYSTEM)
        assert second.cached_input_tokens == system
        assert second.usd == pytest.approx(usd(second.input_tokens, second.output_tokens, system))
        # The response cache keeps the count: a repeat answers from it at no new cost.
        repeat = provider.complete(few_shot("clause two"))
        assert repeat.cached and repeat.cached_input_tokens == system and api.requests == 2


def test_cache_files_from_before_the_cached_tokens_column_still_read(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute(  # the schema of the cache before cached_input_tokens existed
        "CREATE TABLE completions (key TEXT PRIMARY KEY, kind TEXT, model TEXT,"
        " text TEXT, input_tokens INT, output_tokens INT, usd REAL, latency_ms REAL,"
        " finish_reason TEXT, request TEXT, created REAL)"
    )
    db.execute(
        "INSERT INTO completions VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        ("old", "openai", "m", "hi", 10, 2, 0.5, 3.0, "stop", "{}", 0.0),
    )
    db.commit()
    db.close()
    cache = Cache(path)
    old = cache.get("old")
    assert old == Completion("hi", 10, 2, 0.5, 3.0, True, "stop", "m", 0)
    cache.put("new", "openai", {}, Completion("yo", 10, 2, 0.1, 3.0, False, "stop", "m", 7))
    assert cache.get("new").cached_input_tokens == 7
    cache.close()
    assert Cache(path).get("new").cached_input_tokens == 7  # reopening migrates nothing twice
