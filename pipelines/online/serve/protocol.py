"""The OpenAI chat-completions protocol as `temper serve` speaks it: requests, errors, bodies.

Shapes follow the OpenAI API reference (and vLLM's server, which follows it too): errors are
`{"error": {"message", "type", "param", "code"}}` with the HTTP status a client's SDK maps to
its exception classes (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 413,
429 RateLimitError, 503 InternalServerError...). Unknown request fields are refused (400
naming the field), as OpenAI does, so a typo is not silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ...errors import TemperError


class ApiError(TemperError):
    """An error answered in OpenAI's shape with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    # Extra keys (name, tool_call_id...) are tolerated on messages: SDKs echo them back.
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class JsonSchemaFormat(_Strict):
    name: str = "answer"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class RouteOptions(_Strict):
    """`route` (an extension, the openai SDK's `extra_body`): force a tier, or keep the
    request on this machine. Neither goes beyond the server's `route:` config."""

    tier: str | None = None
    allow_external: bool | None = None


class ChatRequest(_Strict):
    """POST /v1/chat/completions. Omitted `temperature` means the registered version's own
    decoding (greedy, as it was evaluated), not OpenAI's default of 1."""

    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    n: int = Field(1, ge=1, le=1, description="One choice per request.")
    user: str | None = None
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="Not supported: 0 only.")
    presence_penalty: float = Field(0.0, ge=0, le=0, description="Not supported: 0 only.")
    metadata: dict[str, str] | None = None
    store: bool | None = None
    route: RouteOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty stop sequences")
        return stops

    def budget(self, limit: int) -> int | None:
        asked = self.max_completion_tokens or self.max_tokens
        if asked is not None and asked > limit:
            raise ApiError(
                400,
                f"max_tokens is {asked}, this server allows at most {limit}",
                param="max_tokens",
            )
        return asked


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """A pydantic/FastAPI validation failure as OpenAI's 400, naming the first bad field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = f"Unrecognized request argument supplied: {param}"
    elif first.get("type") == "json_invalid":
        msg, param = "The request body is not valid JSON", None
    elif param:
        msg = f"{param}: {msg}"
    return ApiError(400, msg, param=param)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
