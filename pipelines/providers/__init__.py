"""The one LLM provider layer: teacher (distil) and judge (evaluate) calls go through here.

    from temper.providers import ProviderConfig, open_provider
    provider = open_provider(ProviderConfig(kind="openai", model="gpt-6-luna",
                                            base_url="http://127.0.0.1:8000/v1"))
    done = provider.complete([{"role": "user", "content": "Say hi"}])         # sync
    done.text, done.input_tokens, done.output_tokens, done.usd, done.latency_ms, done.cached
    results = provider.complete_many([msgs1, msgs2], desc="judge")             # bounded, with bar
    # or, inside your own event loop: await provider.acomplete(msgs, json_schema=...)

Every call goes: redact -> cache lookup -> privacy-checked endpoint -> concurrency semaphore
-> budget reservation -> requests/tokens-per-minute limiter -> SDK request -> retries -> cache.

Kinds: `openai` (official SDK, any OpenAI-compatible `base_url`), `anthropic` (official SDK; its
base_url is the server root, no /v1), `replay` (answers only from the cache; a miss is an error).
The `gold` kind answers from a record's gold fields, so it lives in the distil stage, not here.

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
- Prompt caching: the shared prefix (system prompt, few-shot turns) goes first, unchanged.
  OpenAI caches it by itself; Anthropic gets `cache_control` breakpoints on it
  (`prompt_caching`). Tokens read from the vendor's cache are priced at `cached_input`,
  Anthropic's cache writes at `cache_write` (`Completion.cached_input_tokens`; docs/cost.md).
- The limiter is a 60-second sliding window written by hand (about 30 lines): no maintained
  async limiter is installed here, and it must also take the 429 pause.
"""

from .base import (
    DEFAULT_BASE_URL,
    DEFAULT_KEY_ENV,
    BudgetExceeded,
    CacheMiss,
    Completion,
    EndpointDown,
    MalformedResponse,
    Messages,
    OverLimitReply,
    Price,
    PrivacyError,
    ProviderConfig,
    ProviderError,
    Reply,
)
from .batch import BUDGET, BatchError, Collected, batch_price, collect
from .cache import Cache
from .clients import Provider, gather_bounded
from .limits import Budget, RateLimiter, Stats, capped_transport, estimate_tokens, reply_limit
from .prices import MachinePrice, ModelPrice, PriceTable, load_prices
from .privacy import check_endpoint, hosts_addresses, is_local, loopback_address, redact
from .retries import is_retryable, may_have_been_billed, retry_after_s
from .vendors import AnthropicProvider, ApiProvider, OpenAIProvider, ReplayProvider, open_provider

__all__ = [
    "BUDGET",
    "BatchError",
    "Collected",
    "batch_price",
    "collect",
    "DEFAULT_BASE_URL",
    "DEFAULT_KEY_ENV",
    "AnthropicProvider",
    "ApiProvider",
    "Budget",
    "BudgetExceeded",
    "Cache",
    "CacheMiss",
    "Completion",
    "MachinePrice",
    "MalformedResponse",
    "Messages",
    "ModelPrice",
    "OpenAIProvider",
    "OverLimitReply",
    "EndpointDown",
    "Price",
    "PriceTable",
    "PrivacyError",
    "Provider",
    "ProviderConfig",
    "ProviderError",
    "RateLimiter",
    "ReplayProvider",
    "Reply",
    "Stats",
    "capped_transport",
    "check_endpoint",
    "estimate_tokens",
    "gather_bounded",
    "hosts_addresses",
    "is_local",
    "is_retryable",
    "load_prices",
    "loopback_address",
    "may_have_been_billed",
    "open_provider",
    "redact",
    "reply_limit",
    "retry_after_s",
]
