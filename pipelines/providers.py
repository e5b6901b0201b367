"""The one LLM provider layer: teacher (distil) and judge (evaluate) calls go through here.

    from pipelines.providers import ProviderConfig, open_provider
    provider = open_provider(ProviderConfig(kind="openai", model="gpt-4o-mini",
                                            base_url="http://127.0.0.1:8000/v1"))
    done = provider.complete([{"role": "user", "content": "Say hi"}])         # sync
    done.text, done.input_tokens, done.output_tokens, done.usd, done.latency_ms, done.cached
    results = provider.complete_many([msgs1, msgs2], desc="judge")             # bounded, with bar
    # or, inside your own event loop: await provider.acomplete(msgs, json_schema=...)

Every call goes: redact -> cache lookup -> privacy-checked endpoint -> concurrency semaphore
-> budget reservation -> requests/tokens-per-minute limiter -> SDK request -> retries -> cache.

Kinds: `openai` (official SDK, any OpenAI-compatible `base_url`), `anthropic` (official SDK; its
base_url is the server root, no /v1), `replay` (answers only from the cache; a miss is an error).
The `gold` kind answers from a record's gold fields, so it lives in `distil.py`, not here.

Design choices (the why):
- Retries: tenacity around one SDK attempt, with the SDKs' own retry switched off
  (`max_retries=0`). One policy for both SDKs; every attempt passes through the rate limiter
  and the budget (an SDK-internal retry would bypass both and be invisible in the metrics);
  `retry-after` / `retry-after-ms` are honoured and also pause the whole limiter (one 429
  means every worker should slow down); malformed bodies are retried too (the SDKs do not).
- Cache: sqlite in WAL mode, one row per content-addressed key, committed per answer. A
  commit is atomic and survives `kill -9` (WAL + synchronous=NORMAL loses at most the last
  commits on power loss, never on a process crash); many processes may read and write at once
  (busy timeout). One file per key would also work, but costs a file per answer and a directory
  scan for counts; sqlite gives both and atomic upserts for free.
- Budget: before each attempt the worst case (estimated input tokens at a conservative
  3 chars/token plus `max_tokens` of output) is reserved; the reservation is settled with the
  reported usage afterwards. A request that could cross `max_usd` or `max_requests` is never
  sent, so spend stays within the cap up to the error of the input-token estimate. The cap
  holds whatever a server sends: a reply is read up to `max_reply_bytes` only, a reply whose
  usage exceeds the requested output limit is rejected (`OverLimitReply`) and charged the
  worst case, not the claimed usage (recorded apart), and a request abandoned after it may have
  reached the server (a read timeout, a cut or unreadable body) is charged its worst case too,
  because the server may well have finished and billed it.
- Privacy: with `allow_external: false` an endpoint must be provably on this machine without
  asking DNS: a literal loopback address, or `localhost` as the hosts file maps it (every
  address loopback). The client is then pinned to that literal address, so nothing resolves
  the name again later, and redirects are not followed.
- The limiter is a 60-second sliding window written by hand (about 30 lines): no maintained
  async limiter is installed here, and it must also take the 429 pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlparse

from pydantic import Field

from .config import ConfigError, Section
from .io import stable_hash

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
T = TypeVar("T")

DEFAULT_BASE_URL = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
CHARS_PER_TOKEN = 3.0  # conservative for English (about 4): the budget over-, never under-estimates


class Price(Section):
    """USD per one million tokens."""

    input: float = Field(ge=0, description="USD per 1M input tokens.")
    output: float = Field(ge=0, description="USD per 1M output tokens.")

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input + output_tokens * self.output) / 1e6


class ProviderConfig(Section):
    """One LLM endpoint with its cache, limits and budget (`distil.provider`, the judge's too)."""

    kind: Literal["gold", "openai", "anthropic", "replay"] = Field(
        "gold", description="gold (offline: answers from gold fields), openai, anthropic, or "
        "replay (cache only; a miss is an error).")
    model: str = Field("gold", description="Model name sent to the API (part of cache keys).")
    base_url: str | None = Field(
        None, description="Endpoint. openai: includes /v1 (OpenAI, Azure, vLLM, Ollama, LiteLLM); "
        "anthropic: the server root. null: the vendor's public API.")
    api_key_env: str | None = Field(
        None, description="Name of the env var holding the API key (default OPENAI_API_KEY / "
        "ANTHROPIC_API_KEY). The key itself never goes in a file.")
    replay_kind: Literal["openai", "anthropic"] = Field(
        "openai", description="For kind=replay: whose cache entries to answer from.")
    allow_external: bool = Field(
        False, description="Allow an endpoint that is not on this machine (loopback is local). "
        "false: such a provider refuses before sending anything.")
    redact: list[Literal["email", "phone", "ip", "card"]] = Field(
        default_factory=list, description="Mask these in outgoing messages (counts reported).")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature.")
    max_tokens: int = Field(256, gt=0, description="Output token limit per request.")
    token_limit_param: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens", description="openai: the request field for the output limit (OpenAI's "
        "reasoning models need max_completion_tokens; most compatible servers max_tokens).")
    json_mode: Literal["schema", "object", "off"] = Field(
        "schema", description="Structured output when a JSON schema is given: schema (OpenAI "
        "json_schema / Anthropic output_config), object (OpenAI json_object only), off.")
    concurrency: int = Field(8, gt=0, description="Requests in flight at most.")
    rpm: int | None = Field(None, gt=0, description="Requests per minute (null: no limit).")
    tpm: int | None = Field(None, gt=0, description="Tokens per minute, estimated (null: none).")
    max_retries: int = Field(4, ge=0, description="Retries of a failed request (429, 5xx, "
                             "timeouts, connection errors, malformed bodies).")
    backoff_s: float = Field(0.5, ge=0, description="Initial backoff (exponential, jittered).")
    backoff_max_s: float = Field(30.0, ge=0, description="Longest backoff between retries.")
    max_retry_after_s: float = Field(120.0, ge=0, description="Longest retry-after honoured.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout in seconds.")
    max_reply_bytes: int | None = Field(
        None, gt=0, description="Bytes read of one reply at most; a longer one is a fault, "
        "charged its worst case (null: 64 KiB + 64 bytes per requested output token).")
    cache: str = Field(".cache/llm-cache.sqlite", description="The persistent response cache.")
    prices: dict[str, Price] = Field(
        default_factory=dict, description="USD per 1M input/output tokens, per model name.")
    max_usd: float = Field(5.0, ge=0, description="Hard cap on new spend in one run.")
    max_requests: int = Field(10000, ge=0, description="Hard cap on HTTP requests in one run.")


# ----------------------------------------------------------------------------- results, errors

@dataclass(frozen=True)
class Completion:
    """One answer. `usd` is what it cost when first made (0 spend now if `cached`)."""

    text: str
    input_tokens: int
    output_tokens: int
    usd: float
    latency_ms: float
    cached: bool
    finish_reason: str | None = None
    model: str = ""


class ProviderError(RuntimeError):
    """A request failed for good (after retries) or cannot be made."""


class BudgetExceeded(ProviderError):
    """The next request would cross `max_usd` or `max_requests`: nothing was sent."""


class CacheMiss(ProviderError):
    """`replay` found no cached answer for a request."""


class OverLimitReply(ProviderError):
    """The server answered past the limits the request set (bytes or output tokens).

    Not retried (a server that ignores `max_tokens` does it again, at our expense); charged
    the request's worst case, never the usage the server claims.
    """


class PrivacyError(ConfigError):
    """The endpoint is not on this machine and `allow_external` is false."""


# ----------------------------------------------------------------------------- privacy

# Applied in this order (most specific first), whatever order the config lists them in.
REDACTIONS: dict[str, re.Pattern[str]] = {
    "email": re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),
    "card": re.compile(r"\b(?:\d[ -]?){13,19}\b"),
    "ip": re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b"),
    # 10+ digits with phone punctuation, optionally +country: leaves section numbers alone.
    "phone": re.compile(r"(?<![\w.])\+?\(?\d{1,4}\)?(?:[\s.-]?\(?\d{2,4}\)?){2,4}(?![\w])"),
}


def redact(text: str, kinds: Sequence[str], counts: Counter[str] | None = None) -> str:
    """Replace each match of the chosen kinds by `[KIND]`, counting replacements."""
    for kind in (k for k in REDACTIONS if k in kinds):
        def sub(match: re.Match[str], kind: str = kind) -> str:
            digits = sum(ch.isdigit() for ch in match.group())
            if kind == "phone" and digits < 10:
                return match.group()  # too short for a phone number: dates, amounts, sections
            if counts is not None:
                counts[kind] += 1
            return f"[{kind.upper()}]"

        text = REDACTIONS[kind].sub(sub, text)
    return text


HOSTS_FILE = Path("/etc/hosts")


def hosts_addresses(name: str, hosts_file: Path = HOSTS_FILE) -> list[str]:
    """The addresses the hosts file gives `name` (no DNS query); [] when it lists none."""
    try:
        lines = hosts_file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) > 1 and name in (n.lower() for n in fields[1:]):
            found.append(fields[0])
    return found


def loopback_address(host: str, hosts_file: Path | None = None) -> str | None:
    """The literal loopback address to connect to for `host`, or None when `host` is not
    provably this machine: a literal loopback address, or `localhost` as the hosts file maps it.

    No other name counts, `*.localhost` included: deciding would mean asking a resolver, which
    may forward the name to an external DNS server, and whatever address came back would
    receive the data. Nothing here touches the network.
    """
    host = host.lower().strip("[]")
    with contextlib.suppress(ValueError):
        return host if ipaddress.ip_address(host).is_loopback else None
    if host != "localhost":
        return None
    addresses = hosts_addresses("localhost", hosts_file or HOSTS_FILE) or ["127.0.0.1"]  # RFC 6761
    try:
        loopback = [a for a in addresses if ipaddress.ip_address(a.split("%")[0]).is_loopback]
    except ValueError:
        return None
    return addresses[0] if len(loopback) == len(addresses) else None


def is_local(url: str, hosts_file: Path | None = None) -> bool:
    """True when the URL's host is provably this machine's loopback (see `loopback_address`)."""
    return loopback_address(urlparse(url).hostname or "", hosts_file) is not None


def pin_url(url: str, address: str) -> str:
    """`url` with its host replaced by the literal `address` (IPv6 in brackets)."""
    parts = urlparse(url)
    host = f"[{address}]" if ":" in address else address
    netloc = host + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def check_endpoint(cfg: ProviderConfig, hosts_file: Path | None = None) -> str:
    """The endpoint to use; raises PrivacyError before anything is sent if it is not allowed.

    With `allow_external: false` the URL comes back pinned to the literal loopback address,
    so the SDK never resolves a name.
    """
    url = cfg.base_url or DEFAULT_BASE_URL[cfg.kind]
    if cfg.allow_external:
        return url
    address = loopback_address(urlparse(url).hostname or "", hosts_file)
    if address is None:
        raise PrivacyError(
            f"provider {cfg.kind} endpoint {url} is not on this machine and allow_external is "
            "false: nothing was sent (only literal loopback addresses and `localhost` from the "
            "hosts file count as local). Set allow_external: true to send data to it.")
    return pin_url(url, address)


# ----------------------------------------------------------------------------- cache

class Cache:
    """Content-addressed response cache in sqlite (WAL): crash-safe, multi-process."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, kind TEXT, model TEXT,"
            " text TEXT, input_tokens INT, output_tokens INT, usd REAL, latency_ms REAL,"
            " finish_reason TEXT, request TEXT, created REAL)")

    def get(self, key: str) -> Completion | None:
        with self._lock:
            row = self._db.execute(
                "SELECT text, input_tokens, output_tokens, usd, latency_ms, finish_reason, model"
                " FROM completions WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        text, tin, tout, usd, latency, finish, model = row
        return Completion(text, tin, tout, usd, latency, True, finish, model)

    def put(self, key: str, kind: str, request: dict[str, Any], done: Completion) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO completions VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (key, kind, done.model, done.text, done.input_tokens, done.output_tokens,
                 done.usd, done.latency_ms, done.finish_reason,
                 json.dumps(request, ensure_ascii=False), time.time()))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM completions").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ----------------------------------------------------------------------------- budget, limits

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
                    f"request cap reached: {self.requests} of max_requests {self.max_requests}")
            if self.spent_usd + self.reserved_usd + usd > self.max_usd:
                raise BudgetExceeded(
                    f"spend cap reached: ${self.spent_usd:.4f} spent + ${self.reserved_usd:.4f} "
                    f"in flight + ${usd:.4f} for the next request > max_usd ${self.max_usd:.2f}")
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


# ----------------------------------------------------------------------------- stats

@dataclass
class Stats:
    """What one provider did in this process (written to metrics by its callers)."""

    calls: int = 0            # completions asked for
    cache_hits: int = 0
    requests: int = 0         # HTTP attempts sent (retries and repairs included)
    retries: int = 0
    failures: int = 0         # calls that failed for good
    budget_refusals: int = 0  # calls not sent because of a cap
    input_tokens: int = 0     # new (uncached) tokens only
    output_tokens: int = 0
    usd: float = 0.0          # all new spend, the charges below included
    over_limit: int = 0       # replies past the requested bytes/tokens: rejected
    abandoned: int = 0        # requests given up after they may have reached the server
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
        out["latency_ms_p50"] = round(percentile(lat, 50), 1) if lat else None
        out["latency_ms_p95"] = round(percentile(lat, 95), 1) if lat else None
        out["errors"] = dict(self.errors)
        out["redactions"] = dict(self.redactions)
        return out


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def estimate_tokens(messages: Messages) -> int:
    """Conservative input-token count without the vendor's tokenizer (none is available offline)."""
    return sum(math.ceil(len(m.get("content") or "") / CHARS_PER_TOKEN) + 4 for m in messages)


def retry_after_s(err: BaseException) -> float | None:
    """Seconds asked for by a `retry-after-ms` / `retry-after` header, if any."""
    response = getattr(err, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        with contextlib.suppress(ValueError):
            return float(ms) / 1000
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        with contextlib.suppress(TypeError, ValueError):
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    return None


def is_retryable(err: BaseException) -> bool:
    """429, 408, 409, 5xx, timeouts, connection errors and unreadable bodies are worth a retry."""
    import anthropic
    import openai

    if isinstance(err, (openai.APIStatusError, anthropic.APIStatusError)):
        return err.status_code in (408, 409, 429) or err.status_code >= 500
    return isinstance(err, (openai.APIConnectionError, anthropic.APIConnectionError,
                            openai.APIResponseValidationError,
                            anthropic.APIResponseValidationError,
                            json.JSONDecodeError, MalformedResponse))


# OverLimitReply is a ProviderError, and is_retryable never names it: it is not retried.


class MalformedResponse(ProviderError):
    """The server answered 200 with a body that is not a completion."""


def may_have_been_billed(err: BaseException) -> bool:
    """Whether a failed attempt may still have been processed (and billed) by the server.

    Yes for a read timeout (the client left, the server went on) and for a 200 whose body was
    cut, unreadable or too long; no when the connection was never made or the server answered
    with an error status.
    """
    import httpx2

    chain = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    if any(isinstance(e, (httpx2.ConnectError, httpx2.ConnectTimeout)) for e in chain):
        return False
    import anthropic
    import openai

    billed = (openai.APITimeoutError, anthropic.APITimeoutError, openai.APIResponseValidationError,
              anthropic.APIResponseValidationError, httpx2.TimeoutException,
              httpx2.RemoteProtocolError, json.JSONDecodeError, MalformedResponse, OverLimitReply)
    return any(isinstance(e, billed) for e in chain)


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
            return httpx2.Response(response.status_code, headers=response.headers,
                                   stream=CappedStream(response.stream),
                                   extensions=response.extensions, request=request)

        async def aclose(self) -> None:
            await self._inner.aclose()

    return CappedTransport()


# ----------------------------------------------------------------------------- providers

class Provider:
    """Base: cache, budget, limits, retries and stats around one `_send` per SDK.

    Safe to share between coroutines of one event loop; the sync helpers start their own loop.
    """

    kind = "base"

    def __init__(self, cfg: ProviderConfig, cache: Cache | None = None):
        self.cfg = cfg
        self.cache = cache if cache is not None else Cache(cfg.cache)
        self.budget = Budget(cfg.max_usd, cfg.max_requests)
        self.stats = Stats()
        self.limiter = RateLimiter(cfg.rpm, cfg.tpm)
        self._loop_state: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore, Any] | None = None

    # -- what callers use

    def cache_key(self, messages: Messages, *, json_schema: dict[str, Any] | None = None,
                  max_tokens: int | None = None, prompt_version: str = "") -> str:
        """The content address: provider kind, model, prompt version, generation params, input.

        The endpoint URL is left out on purpose: the model name identifies the model, and a
        loopback port or a proxy in front must not invalidate finished work.
        """
        return stable_hash({
            "kind": self.cache_kind, "model": self.cfg.model, "prompt_version": prompt_version,
            "temperature": self.cfg.temperature, "max_tokens": max_tokens or self.cfg.max_tokens,
            "json_mode": self.cfg.json_mode if json_schema else "off", "json_schema": json_schema,
            "messages": messages,
        }, length=64)

    @property
    def cache_kind(self) -> str:
        return self.kind

    def prepare(self, messages: Messages) -> Messages:
        """The messages as they will be sent (redacted); the cache key is built on these."""
        if not self.cfg.redact:
            return messages
        return [{**m, "content": redact(m["content"], self.cfg.redact, self.stats.redactions)}
                for m in messages]

    def is_cached(self, messages: Messages, **kw: Any) -> bool:
        kinds = self.cfg.redact
        sent = [{**m, "content": redact(m["content"], kinds)} for m in messages] if kinds else messages
        return self.cache.get(self.cache_key(sent, **kw)) is not None

    def estimate_usd(self, batch: Sequence[Messages], *, max_tokens: int | None = None,
                     expected_output_tokens: int | None = None,
                     **kw: Any) -> tuple[int, float, float]:
        """(uncached requests, expected USD, worst-case USD) for a batch, before running it.

        Expected: `expected_output_tokens` per answer; worst case: every answer as long as
        `max_tokens` allows (what the budget reserves per request).
        """
        price = self.price()
        limit = max_tokens or self.cfg.max_tokens
        out_tokens = expected_output_tokens or limit
        todo = [m for m in batch if not self.is_cached(m, max_tokens=max_tokens, **kw)]
        usd = sum(price.cost(estimate_tokens(m), out_tokens) for m in todo)
        worst = sum(price.cost(estimate_tokens(m), limit) for m in todo)
        return len(todo), usd, worst

    def price(self) -> Price:
        return Price(input=0, output=0)

    async def acomplete(self, messages: Messages, *, json_schema: dict[str, Any] | None = None,
                        max_tokens: int | None = None, prompt_version: str = "") -> Completion:
        """One completion: from the cache, or from the API (bounded, budgeted, retried).

        Raises BudgetExceeded (nothing sent), CacheMiss (replay), ProviderError (gave up).
        """
        self.stats.calls += 1
        sent = self.prepare(messages)
        max_tokens = max_tokens or self.cfg.max_tokens
        key = self.cache_key(sent, json_schema=json_schema, max_tokens=max_tokens,
                             prompt_version=prompt_version)
        if (hit := self.cache.get(key)) is not None:
            self.stats.cache_hits += 1
            return hit
        _, semaphore, _ = self._state()
        async with semaphore:
            done = await self._call(sent, json_schema, max_tokens)
        self.cache.put(key, self.cache_kind, {"messages": sent, "json_schema": json_schema,
                                              "max_tokens": max_tokens}, done)
        return done

    def complete(self, messages: Messages, **kw: Any) -> Completion:
        """Sync `acomplete` (starts and closes its own event loop)."""
        return self._run_sync(self.acomplete(messages, **kw))

    async def amap(self, batch: Sequence[Messages], *, desc: str | None = None,
                   **kw: Any) -> list[Completion | Exception]:
        """Complete many message lists concurrently; results in order, failures as exceptions."""
        return await gather_bounded([self.acomplete(m, **kw) for m in batch], desc=desc,
                                    provider=self)

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

    async def _send(self, client: Any, messages: Messages, json_schema: dict[str, Any] | None,
                    max_tokens: int) -> tuple[str, int | None, int | None, str | None]:
        raise NotImplementedError

    async def _call(self, messages: Messages, json_schema: dict[str, Any] | None,
                    max_tokens: int) -> Completion:
        from tenacity import (
            AsyncRetrying,
            retry_if_exception,
            stop_after_attempt,
            wait_random_exponential,
        )

        cfg, price = self.cfg, self.price()
        est_in = estimate_tokens(messages)
        reserve = price.cost(est_in, max_tokens)
        backoff = wait_random_exponential(multiplier=cfg.backoff_s, max=cfg.backoff_max_s)

        def wait(state: Any) -> float:
            seconds = retry_after_s(state.outcome.exception())
            if seconds is None:
                return backoff(state)
            return min(seconds, cfg.max_retry_after_s)

        def before_sleep(state: Any) -> None:
            self.stats.retries += 1
            err = state.outcome.exception()
            log.debug("retry %d after %s", state.attempt_number, type(err).__name__)

        client = self._state()[2]
        retrying = AsyncRetrying(stop=stop_after_attempt(cfg.max_retries + 1), wait=wait,
                                 retry=retry_if_exception(is_retryable), reraise=True,
                                 before_sleep=before_sleep)
        try:
            async for attempt in retrying:
                with attempt:
                    try:
                        self.budget.reserve(reserve)
                    except BudgetExceeded:
                        self.stats.budget_refusals += 1
                        raise
                    t0 = time.perf_counter()
                    sent = False
                    try:
                        await self.limiter.acquire(est_in + max_tokens)
                        t0 = time.perf_counter()
                        self.stats.requests += 1
                        sent = True
                        text, tin, tout, finish = await self._send(client, messages, json_schema,
                                                                   max_tokens)
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
                            raise OverLimitReply(f"reply of {tout} output tokens, over the "
                                                 f"requested limit of {max_tokens}")
                    except BaseException as err:
                        # A request the server may have finished is charged its worst case.
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
                            self.limiter.pause(min(seconds, cfg.max_retry_after_s))
                        raise
                    latency = (time.perf_counter() - t0) * 1000
                    usd = price.cost(tin, tout)
                    self.budget.settle(reserve, usd)
        except BudgetExceeded:
            raise
        except OverLimitReply as err:
            self.stats.failures += 1
            raise OverLimitReply(str(err)) from None
        except Exception as err:
            self.stats.failures += 1
            # Error texts end up in rejects.jsonl and logs: never let a server echo the key.
            text = str(err)
            if secret := getattr(self, "_api_key", None):
                text = text.replace(secret, "***")
            raise ProviderError(f"{type(err).__name__} after {attempt.retry_state.attempt_number}"
                                f" attempt(s): {text[:300]}") from None
        self.stats.input_tokens += tin
        self.stats.output_tokens += tout
        self.stats.usd += usd
        self.stats.latencies_ms.append(latency)
        return Completion(text, tin, tout, usd, latency, False, finish, self.cfg.model)


class ApiProvider(Provider):
    """Shared set-up of the SDK-backed providers: endpoint check, key, price."""

    def __init__(self, cfg: ProviderConfig, cache: Cache | None = None):
        self.base_url = check_endpoint(cfg)  # before anything else: nothing is sent if refused
        if cfg.model not in cfg.prices:
            raise ConfigError(
                f"provider model {cfg.model!r} has no entry in prices (USD per 1M input/output "
                f"tokens); add prices: {{{cfg.model}: {{input: ..., output: ...}}}} (0 for a "
                "free local server)")
        env = cfg.api_key_env or DEFAULT_KEY_ENV[cfg.kind]
        key = os.environ.get(env)
        if not key:
            if not is_local(self.base_url):
                raise ConfigError(f"the API key env var {env} is not set")
            key = "not-needed"  # local servers (vLLM, Ollama, the test server) often need none
        self._api_key = key
        super().__init__(cfg, cache)

    def __repr__(self) -> str:  # never show the key
        return f"{type(self).__name__}(model={self.cfg.model!r}, base_url={self.base_url!r})"

    def price(self) -> Price:
        return self.cfg.prices[self.cfg.model]

    def _http_client(self, factory: Any) -> Any:
        """The SDK's own HTTP client class, reading at most `max_reply_bytes` per reply and,
        for a local-only endpoint, following no redirect (one could point off the machine)."""
        limit = reply_limit(self.cfg, self.cfg.max_tokens)
        return factory(transport=capped_transport(limit),
                       follow_redirects=self.cfg.allow_external)


class OpenAIProvider(ApiProvider):
    kind = "openai"

    def _client(self) -> Any:
        import openai

        return openai.AsyncOpenAI(api_key=self._api_key, base_url=self.base_url,
                                  max_retries=0, timeout=self.cfg.timeout_s,
                                  http_client=self._http_client(openai.DefaultAsyncHttpxClient))

    async def _send(self, client: Any, messages: Messages, json_schema: dict[str, Any] | None,
                    max_tokens: int) -> tuple[str, int | None, int | None, str | None]:
        extra: dict[str, Any] = {}
        if json_schema is not None and self.cfg.json_mode == "schema":
            extra["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "answer", "schema": json_schema, "strict": False}}
        elif json_schema is not None and self.cfg.json_mode == "object":
            extra["response_format"] = {"type": "json_object"}
        extra[self.cfg.token_limit_param] = max_tokens
        response = await client.chat.completions.create(
            model=self.cfg.model, messages=messages, temperature=self.cfg.temperature, **extra)
        choices = getattr(response, "choices", None)
        if not choices or choices[0].message is None:
            raise MalformedResponse("response has no choices")
        usage = response.usage
        return (choices[0].message.content or "",
                usage.prompt_tokens if usage else None,
                usage.completion_tokens if usage else None,
                choices[0].finish_reason)


class AnthropicProvider(ApiProvider):
    kind = "anthropic"

    def _client(self) -> Any:
        import anthropic

        return anthropic.AsyncAnthropic(
            api_key=self._api_key, base_url=self.base_url, max_retries=0,
            timeout=self.cfg.timeout_s,
            http_client=self._http_client(anthropic.DefaultAsyncHttpxClient))

    async def _send(self, client: Any, messages: Messages, json_schema: dict[str, Any] | None,
                    max_tokens: int) -> tuple[str, int | None, int | None, str | None]:
        # The Messages API takes the system prompt apart from the turns.
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        turns = [m for m in messages if m["role"] != "system"]
        extra: dict[str, Any] = {"system": system} if system else {}
        if json_schema is not None and self.cfg.json_mode == "schema":
            extra["output_config"] = {"format": {"type": "json_schema", "schema": json_schema}}
        # No `temperature`: this SDK's Messages API no longer takes one (the model decides).
        response = await client.messages.create(
            model=self.cfg.model, messages=turns, max_tokens=max_tokens, **extra)
        content = getattr(response, "content", None)
        if content is None:
            raise MalformedResponse("response has no content")
        text = "".join(getattr(block, "text", "") for block in content)
        usage = response.usage
        return (text, usage.input_tokens if usage else None,
                usage.output_tokens if usage else None, response.stop_reason)


class ReplayProvider(Provider):
    """Answers only from the cache entries of `replay_kind`; sends nothing, ever."""

    kind = "replay"

    @property
    def cache_kind(self) -> str:
        return self.cfg.replay_kind

    async def _call(self, messages: Messages, json_schema: dict[str, Any] | None,
                    max_tokens: int) -> Completion:
        self.stats.failures += 1
        raise CacheMiss(f"replay: no cached {self.cfg.replay_kind} answer of model "
                        f"{self.cfg.model!r} for this request (prompt or params changed?)")


def open_provider(cfg: ProviderConfig, cache: Cache | None = None) -> Provider:
    """The provider for `cfg.kind`; raises PrivacyError/ConfigError before sending anything."""
    kinds: dict[str, type[Provider]] = {"openai": OpenAIProvider, "anthropic": AnthropicProvider,
                                         "replay": ReplayProvider}
    if cfg.kind not in kinds:
        raise ConfigError(f"provider kind {cfg.kind!r} answers from records, not messages "
                          "(distil handles it); use openai, anthropic or replay here")
    return kinds[cfg.kind](cfg, cache)


async def gather_bounded(coros: Sequence[Awaitable[T]], *, desc: str | None = None,
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
            bar.set_postfix_str(f"${s.usd:.4f} hits {s.cache_hits} retries {s.retries}",
                                refresh=False)

    try:
        await asyncio.gather(*(one(i, c) for i, c in enumerate(coros)))
    finally:
        bar.close()
    return results
