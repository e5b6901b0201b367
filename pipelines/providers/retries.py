"""Which failures are worth a retry, how long to wait, and which may still have been billed.

Retries are tenacity's (in `clients.Provider`) around one SDK attempt, with the SDKs' own
retry switched off: one policy for both SDKs, and every attempt passes the rate limiter and
the budget (an SDK-internal retry would bypass both and be invisible in the metrics).
"""

from __future__ import annotations

import contextlib
import json
import time
from email.utils import parsedate_to_datetime

from .base import MalformedResponse, OverLimitReply


def causes(err: BaseException | None) -> list[BaseException]:
    """`err` and what it was raised from or during, outermost first."""
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def over_limit(err: BaseException) -> OverLimitReply | None:
    """The OverLimitReply behind `err`: the anthropic SDK wraps what the transport raises
    while reading a body in APIConnectionError (retried), the openai SDK does not."""
    return next((e for e in causes(err) if isinstance(e, OverLimitReply)), None)


def never_connected(err: BaseException) -> bool:
    """The connection was never made (refused, unreachable, connect timeout)."""
    import httpx2

    return any(isinstance(e, (httpx2.ConnectError, httpx2.ConnectTimeout)) for e in causes(err))


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


def retryable_status(code: int) -> bool:
    """An HTTP status worth another attempt: 408, 409, 429 and 5xx (the sync path's retries and
    batch mode's resubmissions share this rule)."""
    return code in (408, 409, 429) or code >= 500


def is_retryable(err: BaseException) -> bool:
    """429, 408, 409, 5xx, timeouts, connection errors and unreadable bodies are worth a retry."""
    import anthropic
    import openai

    if isinstance(err, (openai.APIStatusError, anthropic.APIStatusError)):
        return retryable_status(err.status_code)
    return isinstance(
        err,
        (
            openai.APIConnectionError,
            anthropic.APIConnectionError,
            openai.APIResponseValidationError,
            anthropic.APIResponseValidationError,
            json.JSONDecodeError,
            MalformedResponse,
        ),
    )


def may_have_been_billed(err: BaseException) -> bool:
    """Whether a failed attempt may still have been processed (and billed) by the server.

    Yes for a read timeout (the client left, the server went on) and for a 200 whose body was
    cut, unreadable or too long; no when the connection was never made or the server answered
    with an error status.
    """
    import httpx2

    if never_connected(err):
        return False
    chain = causes(err)
    import anthropic
    import openai

    billed = (
        openai.APITimeoutError,
        anthropic.APITimeoutError,
        openai.APIResponseValidationError,
        anthropic.APIResponseValidationError,
        httpx2.TimeoutException,
        httpx2.RemoteProtocolError,
        json.JSONDecodeError,
        MalformedResponse,
        OverLimitReply,
    )
    return any(isinstance(e, billed) for e in chain)
