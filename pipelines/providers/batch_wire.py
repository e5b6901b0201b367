"""The two vendors' batch APIs on the wire, through their official SDKs.

OpenAI Batch: the requests go up as a JSONL file (`files.create(purpose="batch")`, one
`{"custom_id", "method", "url", "body"}` per line), `batches.create` starts the batch over it;
results come back as two JSONL files (`output_file_id`: answered, `error_file_id`: failed or
expired), one `{"custom_id", "response": {"status_code", "body"}, "error"}` per line.
Anthropic Message Batches: `messages.batches.create(requests=[{"custom_id", "params"}])`;
when `processing_status` is `ended`, `messages.batches.results` streams one
`{"custom_id", "result": {"type": succeeded|errored|canceled|expired, ...}}` per line.

Each adapter turns those into the same four things for `providers.batch`: submit, find a
submission whose id was never recorded (a crash between the vendor's answer and our state
write), poll, and results as `Result` rows. The request bodies are the sync path's own
(`request_body`), so a batch answer and a sync answer of one request share a cache key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from .base import PrivacyError, Reply
from .retries import retryable_status
from .vendors import anthropic_reply, openai_reply

# Anthropic error types worth another submission (the rest, e.g. invalid_request_error, are
# about the request itself and would fail again).
RETRY_TYPES = {"api_error", "overloaded_error", "rate_limit_error", "timeout_error"}


@dataclass
class Result:
    """One request's fate in a finished batch: a reply, or an error (retryable or final)."""

    custom_id: str
    reply: Reply | None = None
    error: str | None = None
    retryable: bool = False
    cancelled: bool = False


@dataclass
class Progress:
    status: str  # the vendor's word
    ended: bool  # no request of it will change any more
    counts: dict[str, int]


class OpenAIBatches:
    """`/v1/files` + `/v1/batches` (completion window 24 h)."""

    # 50,000 requests and 200 MB per input file (OpenAI's limits).
    max_requests, max_bytes = 50_000, 200_000_000
    endpoint = "/v1/chat/completions"

    def line(self, custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"custom_id": custom_id, "method": "POST", "url": self.endpoint, "body": body}

    async def submit(self, client: Any, lines: list[dict[str, Any]], token: str) -> str:
        data = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode()
        upload = await client.files.create(
            file=(f"temper-{token}.jsonl", data, "application/jsonl"), purpose="batch"
        )
        batch = await client.batches.create(
            input_file_id=upload.id,
            endpoint=self.endpoint,
            completion_window="24h",
            metadata={"temper_token": token},
        )
        return batch.id

    async def find(self, client: Any, token: str, n: int, since: float, known: set[str]) -> Any:
        """The batch we created with `token` in its metadata, if the vendor has it."""
        async for batch in client.batches.list(limit=100):
            if (batch.metadata or {}).get("temper_token") == token:
                return batch.id
            if batch.created_at < since - 3600:  # newest first: older ones cannot be ours
                return None
        return None

    async def progress(self, client: Any, batch_id: str) -> Progress:
        b = await client.batches.retrieve(batch_id)
        counts = b.request_counts.model_dump() if b.request_counts else {}
        ended = b.status in ("completed", "failed", "expired", "cancelled")
        return Progress(b.status, ended, counts)

    async def results(self, client: Any, batch_id: str, base_url: str, local: bool) -> list[Result]:
        b = await client.batches.retrieve(batch_id)
        out: list[Result] = []
        if b.status == "failed":  # the input was refused as a whole: nothing ran
            why = "; ".join(e.message or e.code or "" for e in (b.errors.data or [])) or "failed"
            return [Result("*", error=f"batch {batch_id} failed validation: {why}")]
        for file_id in (b.output_file_id, b.error_file_id):
            if not file_id:
                continue
            text = (await client.files.content(file_id)).text
            for lineno, raw in enumerate(text.splitlines(), 1):
                if raw.strip():
                    out.append(self._row(json.loads(raw), f"{file_id}:{lineno}", b.status))
        return out

    @staticmethod
    def _row(row: dict[str, Any], where: str, status: str) -> Result:
        from openai.types.chat import ChatCompletion

        cid = row.get("custom_id") or ""
        response = row.get("response") or {}
        code = response.get("status_code")
        if code == 200 and not row.get("error"):
            try:
                reply = openai_reply(ChatCompletion.model_validate(response.get("body")))
            except Exception as err:  # a malformed line: retry it, never crash on it
                return Result(cid, error=f"{where}: unreadable answer: {err}"[:300], retryable=True)
            return Result(cid, reply)
        error = row.get("error") or (response.get("body") or {}).get("error") or {}
        message = f"{code or error.get('code')}: {error.get('message') or error}"[:300]
        if error.get("code") == "batch_cancelled" or status in ("cancelled", "cancelling"):
            return Result(cid, error="batch cancelled", cancelled=True)
        retry = error.get("code") == "batch_expired" or (
            code is not None and retryable_status(code)
        )
        return Result(cid, error=message, retryable=retry)

    async def cancel(self, client: Any, batch_id: str) -> str:
        return (await client.batches.cancel(batch_id)).status


class AnthropicBatches:
    """`/v1/messages/batches` (processing ends within 24 h)."""

    # 100,000 requests or 256 MB per batch (Anthropic's limits).
    max_requests, max_bytes = 100_000, 256_000_000

    def line(self, custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"custom_id": custom_id, "params": body}

    async def submit(self, client: Any, lines: list[dict[str, Any]], token: str) -> str:
        return (await client.messages.batches.create(requests=lines)).id

    async def find(self, client: Any, token: str, n: int, since: float, known: set[str]) -> Any:
        """A batch of exactly `n` requests created since `since` that no state entry names.

        A Message Batch carries no metadata, so this is a heuristic (size and time); it errs
        towards adopting, which at worst waits for a batch we did not make.
        """
        async for batch in client.messages.batches.list(limit=100):
            created = batch.created_at.timestamp()
            if created < since - 3600:
                return None
            total = sum(batch.request_counts.model_dump().values())
            if batch.id not in known and total == n and created >= since - 120:
                return batch.id
        return None

    async def progress(self, client: Any, batch_id: str) -> Progress:
        b = await client.messages.batches.retrieve(batch_id)
        return Progress(
            b.processing_status, b.processing_status == "ended", b.request_counts.model_dump()
        )

    async def results(self, client: Any, batch_id: str, base_url: str, local: bool) -> list[Result]:
        b = await client.messages.batches.retrieve(batch_id)
        if local and b.results_url and urlparse(b.results_url).netloc != urlparse(base_url).netloc:
            # The SDK would send our key (and fetch our data) wherever the URL points.
            raise PrivacyError(
                f"batch {batch_id}: results_url {b.results_url} is not the local endpoint "
                f"{base_url} and allow_external is false"
            )
        out: list[Result] = []
        async for row in await client.messages.batches.results(batch_id):
            r = row.result
            if r.type == "succeeded":
                out.append(Result(row.custom_id, anthropic_reply(r.message)))
            elif r.type == "errored":
                err = r.error.error
                out.append(
                    Result(
                        row.custom_id,
                        error=f"{err.type}: {err.message}"[:300],
                        retryable=err.type in RETRY_TYPES,
                    )
                )
            elif r.type == "canceled":
                out.append(Result(row.custom_id, error="batch cancelled", cancelled=True))
            else:  # expired: the 24 h window closed before it ran
                out.append(Result(row.custom_id, error="expired", retryable=True))
        return out

    async def cancel(self, client: Any, batch_id: str) -> str:
        return (await client.messages.batches.cancel(batch_id)).processing_status


def wire_for(kind: str) -> OpenAIBatches | AnthropicBatches:
    return {"openai": OpenAIBatches, "anthropic": AnthropicBatches}[kind]()
