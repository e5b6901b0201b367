"""The provider layer's vocabulary: its config, one answer (`Completion`) and its errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from pydantic import Field, model_validator

from ..config import ConfigError, Section
from ..errors import TemperError

DEFAULT_BASE_URL = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}

Messages = list[dict[str, str]]


class Price(Section):
    """USD per one million tokens."""

    input: float = Field(ge=0, description="USD per 1M input tokens.")
    output: float = Field(ge=0, description="USD per 1M output tokens.")
    cached_input: float | None = Field(
        None,
        ge=0,
        description="USD per 1M input tokens read from the vendor's prompt cache "
        "(null: the input price).",
    )
    cache_write: float | None = Field(
        None,
        ge=0,
        description="USD per 1M input tokens written to the prompt cache (Anthropic: 1.25x "
        "input for the 5-minute cache; OpenAI charges none; null: the input price).",
    )
    batch_input: float | None = Field(
        None,
        ge=0,
        description="USD per 1M input tokens through the vendor's batch API (OpenAI Batch, "
        "Anthropic Message Batches: half the input price; null: no batch price known, "
        "batch mode refuses to start).",
    )
    batch_output: float | None = Field(
        None, ge=0, description="USD per 1M output tokens through the batch API."
    )

    def cost(
        self,
        input_tokens: float,
        output_tokens: float,
        cached_input_tokens: float = 0,
        cache_write_tokens: float = 0,
    ) -> float:
        """USD of one request; `input_tokens` counts all input, the cached and written too."""
        cached = self.input if self.cached_input is None else self.cached_input
        write = self.input if self.cache_write is None else self.cache_write
        fresh = input_tokens - cached_input_tokens - cache_write_tokens
        usd = fresh * self.input + cached_input_tokens * cached + cache_write_tokens * write
        return (usd + output_tokens * self.output) / 1e6

    def batch(self) -> Price:
        """The price of a request sent through the batch API.

        Both vendors apply the batch discount on top of the prompt-cache rates, so every
        input rate is scaled by batch_input/input and output is batch_output. Raises
        ValueError when the row has no batch price (no guessing at a discount).
        """
        if self.batch_input is None or self.batch_output is None:
            raise ValueError("no batch_input/batch_output price")
        scale = self.batch_input / self.input if self.input else 0.0

        def scaled(rate: float | None) -> float | None:
            return None if rate is None else rate * scale

        return Price(
            input=self.batch_input,
            output=self.batch_output,
            cached_input=scaled(self.cached_input),
            cache_write=scaled(self.cache_write),
        )

    def worst_case(self, input_tokens: float, output_tokens: float) -> float:
        """The most a request can cost: every input token at the dearest input rate."""
        rates = (self.input, self.cached_input or 0.0, self.cache_write or 0.0)
        return (input_tokens * max(rates) + output_tokens * self.output) / 1e6


class BatchConfig(Section):
    """`distil.provider.batch`: how batch mode submits, waits and resumes (mode: batch)."""

    state: str | None = Field(
        None,
        description="The state file of submitted batches (ids, custom_ids, results seen). "
        "null: beside the cache, `<cache>.batches/<kind>-<model>-<endpoint hash>.json`, so a "
        "re-run against the same endpoint finds its batches.",
    )
    max_requests: int | None = Field(
        None,
        gt=0,
        description="Requests per batch at most (null: the vendor's limit, OpenAI 50,000, "
        "Anthropic 100,000).",
    )
    max_bytes: int | None = Field(
        None,
        gt=0,
        description="Bytes of JSONL per batch at most (null: the vendor's limit, OpenAI "
        "200 MB per input file, Anthropic 256 MB per batch), with 5% to spare.",
    )
    poll_s: float = Field(5.0, gt=0, description="First wait between status polls (seconds).")
    poll_max_s: float = Field(300.0, gt=0, description="Longest wait between polls (backoff).")
    max_wait_s: float = Field(
        90000.0,
        gt=0,
        description="Stop waiting after this long (the batches go on; re-run to collect). "
        "Default 25 h: the vendors' 24 h window plus an hour.",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        description="Submissions of one request at most: an expired request or a retryable "
        "error (5xx, 429, timeout) is resubmitted in a later batch; a 4xx is final.",
    )


class ProviderConfig(Section):
    """One LLM endpoint with its cache, limits and budget (`distil.provider`, the judge's too)."""

    kind: Literal["gold", "openai", "anthropic", "replay"] = Field(
        "gold",
        description="gold (offline: answers from gold fields), openai, anthropic, or "
        "replay (cache only; a miss is an error).",
    )
    model: str = Field("gold", description="Model name sent to the API (part of cache keys).")
    base_url: str | None = Field(
        None,
        description="Endpoint. openai: includes /v1 (OpenAI, Azure, vLLM, Ollama, LiteLLM); "
        "anthropic: the server root. null: the vendor's public API.",
    )
    api_key_env: str | None = Field(
        None,
        description="Name of the env var holding the API key (default OPENAI_API_KEY / "
        "ANTHROPIC_API_KEY). The key itself never goes in a file.",
    )
    replay_kind: Literal["openai", "anthropic"] = Field(
        "openai", description="For kind=replay: whose cache entries to answer from."
    )
    allow_external: bool = Field(
        False,
        description="Allow an endpoint that is not on this machine (loopback is local). "
        "false: such a provider refuses before sending anything.",
    )
    redact: list[Literal["email", "phone", "ip", "card"]] = Field(
        default_factory=list, description="Mask these in outgoing messages (counts reported)."
    )
    temperature: float = Field(0.0, ge=0, description="Sampling temperature.")
    max_tokens: int = Field(256, gt=0, description="Output token limit per request.")
    token_limit_param: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens",
        description="openai: the request field for the output limit (OpenAI's "
        "reasoning models need max_completion_tokens; most compatible servers max_tokens).",
    )
    json_mode: Literal["schema", "object", "off"] = Field(
        "schema",
        description="Structured output when a JSON schema is given: schema (OpenAI "
        "json_schema / Anthropic output_config), object (OpenAI json_object only), off.",
    )
    concurrency: int = Field(8, gt=0, description="Requests in flight at most.")
    rpm: int | None = Field(None, gt=0, description="Requests per minute (null: no limit).")
    tpm: int | None = Field(None, gt=0, description="Tokens per minute, estimated (null: none).")
    max_retries: int = Field(
        4,
        ge=0,
        description="Retries of a failed request (429, 5xx, "
        "timeouts, connection errors, malformed bodies).",
    )
    down_after: int = Field(
        8,
        ge=1,
        description="A teacher that refused this many connections in a row, over at least "
        "down_after_s, is down: every request left fails at once (distil exits 6 in seconds, "
        "not after every request's retries).",
    )
    down_after_s: float = Field(
        5.0, ge=0, description="... and for at least this long (a restart is not an outage)."
    )
    backoff_s: float = Field(0.5, ge=0, description="Initial backoff (exponential, jittered).")
    backoff_max_s: float = Field(30.0, ge=0, description="Longest backoff between retries.")
    max_retry_after_s: float = Field(120.0, ge=0, description="Longest retry-after honoured.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout in seconds.")
    max_reply_bytes: int | None = Field(
        None,
        gt=0,
        description="Bytes read of one reply at most; a longer one is a fault, "
        "charged its worst case (null: 64 KiB + 64 bytes per requested output token).",
    )
    cache: str = Field(".cache/llm-cache.sqlite", description="The persistent response cache.")
    prices: dict[str, Price] = Field(
        default_factory=dict,
        description="USD per 1M input/output tokens, per model name (optional: cached_input, "
        "cache_write; configs/prices.yaml has dated figures).",
    )
    max_usd: float = Field(5.0, ge=0, description="Hard cap on new spend in one run.")
    max_requests: int = Field(10000, ge=0, description="Hard cap on HTTP requests in one run.")
    mode: Literal["sync", "batch"] = Field(
        "sync",
        description="distil only: sync (one HTTP request per answer) or batch (the vendor's "
        "batch API: about half the price, answers within 24 h; resumable). Needs kind "
        "openai or anthropic.",
    )
    batch: BatchConfig = Field(
        default_factory=BatchConfig, description="Batch-mode settings (mode: batch)."
    )
    prompt_caching: bool = Field(
        True,
        description="anthropic: mark the shared prefix (system prompt, few-shot turns) with "
        "cache_control breakpoints so repeats read it from the vendor's cache. OpenAI caches "
        "prefixes by itself; cached tokens are priced at prices.<model>.cached_input.",
    )

    @model_validator(mode="after")
    def _batch_needs_an_api(self) -> ProviderConfig:
        # gold and replay send nothing, so there is nothing to batch: say so, do not ignore it.
        if self.mode == "batch" and self.kind not in ("openai", "anthropic"):
            raise ValueError(
                f"mode: batch needs kind openai or anthropic (kind {self.kind!r} sends no "
                "requests); use mode: sync"
            )
        return self


class Reply(NamedTuple):
    """What one SDK call (`_send`) reports; a plain 4-tuple (no cache fields) also works."""

    text: str
    input_tokens: int | None  # all input: fresh, read from and written to the prompt cache
    output_tokens: int | None
    finish_reason: str | None
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0


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
    cached_input_tokens: int = 0  # of input_tokens, read from the vendor's prompt cache


class ProviderError(TemperError, RuntimeError):
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


class EndpointDown(ProviderError):
    """The endpoint refused `down_after` connections in a row: nothing more is sent."""


class PrivacyError(ConfigError):
    """The endpoint is not on this machine and `allow_external` is false."""


class MalformedResponse(ProviderError):
    """The server answered 200 with a body that is not a completion."""
