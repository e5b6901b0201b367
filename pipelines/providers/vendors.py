"""The SDK-backed providers (OpenAI, Anthropic), the cache-only replay, and `open_provider`.

Each vendor class only turns one request into its SDK's call and its answer back into text,
token counts and a finish reason (`_send`); everything around it (cache, budget, limits,
retries, privacy) is `clients.Provider`'s.
"""

from __future__ import annotations

import os
from typing import Any

from ..config import ConfigError
from .base import (
    DEFAULT_KEY_ENV,
    CacheMiss,
    Completion,
    MalformedResponse,
    Messages,
    Price,
    ProviderConfig,
    Reply,
)
from .cache import Cache
from .clients import Provider
from .limits import capped_transport, reply_limit
from .privacy import check_endpoint, is_local


class ApiProvider(Provider):
    """Shared set-up of the SDK-backed providers: endpoint check, key, price."""

    def __init__(self, cfg: ProviderConfig, cache: Cache | None = None):
        self.base_url = check_endpoint(cfg)  # before anything else: nothing is sent if refused
        if cfg.model not in cfg.prices:
            raise ConfigError(
                f"provider model {cfg.model!r} has no entry in prices (USD per 1M input/output "
                f"tokens); add prices: {{{cfg.model}: {{input: ..., output: ...}}}} (0 for a "
                "free local server)"
            )
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

    def _http_client(self, factory: Any, max_bytes: int | None = None) -> Any:
        """The SDK's own HTTP client class, reading at most `max_reply_bytes` per reply (or
        `max_bytes`: a batch's results file holds many replies) and, for a local-only
        endpoint, following no redirect (one could point off the machine)."""
        limit = max_bytes or reply_limit(self.cfg, self.cfg.max_tokens)
        return factory(transport=capped_transport(limit), follow_redirects=self.cfg.allow_external)


class OpenAIProvider(ApiProvider):
    kind = "openai"

    def _client(self, max_bytes: int | None = None) -> Any:
        import openai

        return openai.AsyncOpenAI(
            api_key=self._api_key,
            base_url=self.base_url,
            max_retries=0,
            timeout=self.cfg.timeout_s,
            http_client=self._http_client(openai.DefaultAsyncHttpxClient, max_bytes),
        )

    def request_body(
        self, messages: Messages, json_schema: dict[str, Any] | None, max_tokens: int
    ) -> dict[str, Any]:
        """The body of one chat-completions request (the batch API sends the same body)."""
        # No request field for caching: OpenAI caches long shared prefixes (1,024+ tokens) by
        # itself, so the system prompt and few-shot turns go first and unchanged.
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": messages,
            "temperature": self.cfg.temperature,
        }
        if json_schema is not None and self.cfg.json_mode == "schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": json_schema, "strict": False},
            }
        elif json_schema is not None and self.cfg.json_mode == "object":
            body["response_format"] = {"type": "json_object"}
        body[self.cfg.token_limit_param] = max_tokens
        return body

    async def _send(
        self, client: Any, messages: Messages, json_schema: dict[str, Any] | None, max_tokens: int
    ) -> Reply:
        body = self.request_body(messages, json_schema, max_tokens)
        return openai_reply(await client.chat.completions.create(**body))


def openai_reply(response: Any) -> Reply:
    """A chat completion (the SDK's object) as text, token counts and finish reason."""
    choices = getattr(response, "choices", None)
    if not choices or choices[0].message is None:
        raise MalformedResponse("response has no choices")
    usage = response.usage
    details = getattr(usage, "prompt_tokens_details", None)
    return Reply(
        choices[0].message.content or "",
        usage.prompt_tokens if usage else None,  # includes the cached tokens
        usage.completion_tokens if usage else None,
        choices[0].finish_reason,
        cached_input_tokens=(getattr(details, "cached_tokens", None) or 0),
    )


class AnthropicProvider(ApiProvider):
    kind = "anthropic"

    def _client(self, max_bytes: int | None = None) -> Any:
        import anthropic

        return anthropic.AsyncAnthropic(
            api_key=self._api_key,
            base_url=self.base_url,
            max_retries=0,
            timeout=self.cfg.timeout_s,
            http_client=self._http_client(anthropic.DefaultAsyncHttpxClient, max_bytes),
        )

    def request_body(
        self, messages: Messages, json_schema: dict[str, Any] | None, max_tokens: int
    ) -> dict[str, Any]:
        """The params of one Messages request (a Message Batch sends the same params)."""
        system, turns = cache_breakpoints(messages, self.cfg.prompt_caching)
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": turns,
            "max_tokens": max_tokens,
        }
        if system:
            body["system"] = system
        if json_schema is not None and self.cfg.json_mode == "schema":
            body["output_config"] = {"format": {"type": "json_schema", "schema": json_schema}}
        # No `temperature`: this SDK's Messages API no longer takes one (the model decides).
        return body

    async def _send(
        self, client: Any, messages: Messages, json_schema: dict[str, Any] | None, max_tokens: int
    ) -> Reply:
        body = self.request_body(messages, json_schema, max_tokens)
        return anthropic_reply(await client.messages.create(**body))


def anthropic_reply(response: Any) -> Reply:
    """A Message (the SDK's object) as text, token counts and stop reason."""
    content = getattr(response, "content", None)
    if content is None:
        raise MalformedResponse("response has no content")
    text = "".join(getattr(block, "text", "") for block in content)
    usage = response.usage
    if usage is None:
        return Reply(text, None, None, response.stop_reason)
    # Anthropic's input_tokens leaves out what was read from or written to the cache.
    read = getattr(usage, "cache_read_input_tokens", None) or 0
    written = getattr(usage, "cache_creation_input_tokens", None) or 0
    return Reply(
        text,
        usage.input_tokens + read + written,
        usage.output_tokens,
        response.stop_reason,
        cached_input_tokens=read,
        cache_write_tokens=written,
    )


def cache_breakpoints(messages: Messages, caching: bool) -> tuple[Any, list[dict[str, Any]]]:
    """The Messages API's (system, turns), with `cache_control` on the shared prefix.

    Breakpoints go on the system prompt and on the last turn before the final user message
    (the end of the few-shot turns), so a request reads everything before its own question
    from the cache. Anthropic caches nothing shorter than its minimum (1,024-4,096 tokens by
    model) and ignores the mark then; a cache write costs 1.25x input, each read 0.1x.
    """
    mark = {"type": "ephemeral"}
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns: list[dict[str, Any]] = [dict(m) for m in messages if m["role"] != "system"]
    if not caching:
        return system, turns
    blocks = [{"type": "text", "text": system, "cache_control": mark}] if system else ""
    if len(turns) > 1:
        last = turns[-2]
        last["content"] = [{"type": "text", "text": last["content"], "cache_control": mark}]
    return blocks, turns


class ReplayProvider(Provider):
    """Answers only from the cache entries of `replay_kind`; sends nothing, ever."""

    kind = "replay"

    @property
    def cache_kind(self) -> str:
        return self.cfg.replay_kind

    async def _call(
        self, messages: Messages, json_schema: dict[str, Any] | None, max_tokens: int
    ) -> Completion:
        self.stats.failures += 1
        raise CacheMiss(
            f"replay: no cached {self.cfg.replay_kind} answer of model "
            f"{self.cfg.model!r} for this request (prompt or params changed?)"
        )


def open_provider(cfg: ProviderConfig, cache: Cache | None = None) -> Provider:
    """The provider for `cfg.kind`; raises PrivacyError/ConfigError before sending anything."""
    kinds: dict[str, type[Provider]] = {
        "openai": OpenAIProvider,
        "anthropic": AnthropicProvider,
        "replay": ReplayProvider,
    }
    if cfg.kind not in kinds:
        raise ConfigError(
            f"provider kind {cfg.kind!r} answers from records, not messages "
            "(distil handles it); use openai, anthropic or replay here"
        )
    return kinds[cfg.kind](cfg, cache)
