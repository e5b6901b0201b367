"""A fake frontier API on loopback: real HTTP, real OpenAI and Anthropic wire formats.

Fake *behaviour* (answers come from a pluggable responder, faults are injected on purpose),
real protocol: the project's code talks to it with the official openai/anthropic SDKs.

    from fake_api import FakeAPI, Faults
    with FakeAPI(responder=lambda messages: '{"ok": true}', latency_s=0.01,
                 faults=Faults(rate_429=0.1, rate_500=0.05), api_key="sk-test") as api:
        cfg = ProviderConfig(kind="openai", base_url=api.openai_url, ...)   # .../v1
        cfg = ProviderConfig(kind="anthropic", base_url=api.anthropic_url, ...)  # server root
        ...
        api.requests, api.status, api.faults_injected, api.hits_by_user

Endpoints: POST /v1/chat/completions (OpenAI), POST /v1/messages (Anthropic), and both
vendors' batch endpoints (tests/fake_batch.py: `/v1/files`, `/v1/batches`,
`/v1/messages/batches`; `api.batch` holds their state and `batch_submissions`).
Faults (forced with `queue_faults`, else chosen by `fault_fn(messages)`, else drawn per request
with a seeded RNG from `Faults` rates):
  "429" (with retry-after), "500", "slow" (sleeps `slow_s`, past the client's timeout),
  "malformed" (200 with a JSON body cut short), "truncated" (200, answer cut in half,
  finish_reason length / stop_reason max_tokens), "huge" (200 with a 2 MB answer, usage
  counting all of it whatever max_tokens said), "overbill" (a normal answer whose usage claims
  500,000 output tokens).
Prompt caching (`prompt_cache=True`), as the vendors report it: Anthropic caches the prefix up
to the last `cache_control` breakpoint (first sight: `cache_creation_input_tokens`, repeats:
`cache_read_input_tokens`, both left out of `input_tokens`); OpenAI caches the leading system
messages by itself (repeats: `prompt_tokens_details.cached_tokens`, part of `prompt_tokens`).
`log[i]["cache_control"]` lists where a request put breakpoints ("system", "turn <i>").
Billing, as a vendor would: every request the server processes to the end is billed its
usage (`billed_input_tokens`, `billed_output_tokens`), also when the client gave up waiting;
`in_flight` counts requests still being processed.
Standalone (for benchmarks, in its own process): python tests/fake_api.py --latency 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

Responder = Callable[[list[dict[str, Any]]], str]
FAULTS = ("429", "500", "slow", "malformed", "truncated", "huge", "overbill")
HUGE_BYTES = 2_000_000


def echo_responder(messages: list[dict[str, Any]]) -> str:
    """Default: a small JSON object naming the last user message's first words."""
    last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return json.dumps({"echo": str(last)[:40]})


def messages_key(messages: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Faults:
    """Probabilities of each injected fault per request (independent draws, seeded)."""

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_slow: float = 0.0
    rate_malformed: float = 0.0
    rate_truncated: float = 0.0
    rate_huge: float = 0.0
    rate_overbill: float = 0.0
    retry_after: float = 0.05  # seconds, sent as the retry-after header with a 429
    slow_s: float = 2.0  # how long a "slow" request stalls
    seed: int = 0


def completion_body(
    flavour: str,
    model: Any,
    text: str,
    tin: int,
    tout: int,
    finished: bool = True,
    read: int = 0,
    written: int = 0,
    ident: str = "fake",
) -> dict[str, Any]:
    """One answer as the vendor's API returns it (OpenAI chat completion / Anthropic message);
    `read`/`written`: input tokens read from / written to the prompt cache."""
    if flavour == "openai":
        return {
            "id": f"chatcmpl-{ident}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop" if finished else "length",
                }
            ],
            "usage": {
                "prompt_tokens": tin,
                "completion_tokens": tout,
                "total_tokens": tin + tout,
                "prompt_tokens_details": {"cached_tokens": read},
            },
        }
    return {
        "id": f"msg_{ident}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn" if finished else "max_tokens",
        "stop_sequence": None,
        "usage": {
            "input_tokens": tin - read - written,
            "output_tokens": tout,
            "cache_read_input_tokens": read,
            "cache_creation_input_tokens": written,
        },
    }


def tokens(text: str) -> int:
    return len(text) // 4 + 1


class FakeAPI:
    """The server, run by uvicorn in a daemon thread on a free loopback port."""

    def __init__(
        self,
        responder: Responder | None = None,
        *,
        latency_s: float = 0.0,
        faults: Faults | None = None,
        api_key: str | None = None,
        fault_fn: Callable[[list[dict[str, Any]]], str | None] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        prompt_cache: bool = False,
        batch_delay_s: float = 0.2,
        batch_error_fn: Callable[[str, int], str | None] | None = None,
        expire_batches: tuple[int, ...] = (),
        submit_delay_s: float = 0.0,
        batch_max_requests: int = 100_000,
    ):
        self.responder = responder or echo_responder
        self.latency_s = latency_s
        self.faults = faults or Faults()
        self.api_key = api_key
        self.fault_fn = fault_fn
        self.prompt_cache = prompt_cache
        self._prefixes: set[str] = set()  # prompt-cache entries (never expire here)
        self.host, self.port = host, port
        self._rng = random.Random(self.faults.seed)
        self._queued: deque[str | None] = deque()
        self._lock = threading.Lock()
        self.reset_counters()
        self.app = self._build_app()
        # Batches (tests/fake_batch.py): see its docstring for what each knob does.
        self.batch_delay_s, self.batch_error_fn = batch_delay_s, batch_error_fn
        self.expire_batches, self.submit_delay_s = set(expire_batches), submit_delay_s
        self.batch_max_requests = batch_max_requests
        from fake_batch import BatchBackend

        self.batch = BatchBackend(self)
        self.batch.mount(self.app)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- counters and control

    def reset_counters(self) -> None:
        with getattr(self, "_lock", threading.Lock()):
            self.requests = 0  # every POST to a model endpoint
            self.status: Counter[int] = Counter()  # HTTP status sent (malformed counts as 200)
            self.faults_injected: Counter[str] = Counter()
            self.hits: Counter[str] = Counter()  # requests per messages_key(messages)
            self.hits_by_user: Counter[str] = Counter()  # requests per last user message
            self.answered = 0  # good 200 answers sent
            self.batch_answered = 0  # batch requests answered
            self.auth_failures = 0
            self.billed_input_tokens = 0
            self.billed_output_tokens = 0
            self.in_flight = 0
            self.log: list[dict[str, Any]] = []  # endpoint, fault, status, messages, model

    def queue_faults(self, faults: list[str | None]) -> None:
        """Force the next requests' faults in order (None: no fault), before random draws."""
        with self._lock:
            self._queued.extend(faults)

    def _draw(self, messages: list[dict[str, Any]]) -> str | None:
        with self._lock:
            if self._queued:
                return self._queued.popleft()
        if self.fault_fn is not None and (fault := self.fault_fn(messages)) is not None:
            return fault
        with self._lock:
            f = self.faults
            for name, rate in zip(
                FAULTS,
                (
                    f.rate_429,
                    f.rate_500,
                    f.rate_slow,
                    f.rate_malformed,
                    f.rate_truncated,
                    f.rate_huge,
                    f.rate_overbill,
                ),
                strict=True,
            ):
                if rate and self._rng.random() < rate:
                    return name
        return None

    # -- lifecycle

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def openai_url(self) -> str:
        return self.root_url + "/v1"

    @property
    def anthropic_url(self) -> str:
        return self.root_url

    def start(self) -> FakeAPI:
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="fake-api")
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake API server did not start")
            time.sleep(0.005)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> FakeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the app

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def openai_chat(request: Request) -> Response:
            auth = request.headers.get("authorization", "")
            return await self._handle("openai", request, auth.removeprefix("Bearer "))

        @app.post("/v1/messages")
        async def anthropic_messages(request: Request) -> Response:
            # Older SDKs send x-api-key, anthropic 2.x sends a bearer token: accept either.
            key = request.headers.get("x-api-key") or request.headers.get("authorization", "")
            return await self._handle("anthropic", request, key.removeprefix("Bearer "))

        return app

    def billed_usd(self, price_in: float, price_out: float) -> float:
        """What this server would have billed at these prices (USD per 1M tokens)."""
        with self._lock:
            return (
                self.billed_input_tokens * price_in + self.billed_output_tokens * price_out
            ) / 1e6

    async def _handle(self, flavour: str, request: Request, key: str) -> Response:
        with self._lock:
            self.in_flight += 1
        try:
            return await self._answer(flavour, request, key)
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _answer(self, flavour: str, request: Request, key: str) -> Response:
        body = await request.json()
        messages = list(body.get("messages", []))
        if flavour == "anthropic" and body.get("system"):
            messages = [{"role": "system", "content": body["system"]}, *messages]
        marks = [i for i, m in enumerate(messages) if _marked(m["content"])]
        messages = [{"role": m["role"], "content": _text(m["content"])} for m in messages]
        if flavour == "openai":  # automatic: the leading system messages
            cut = next((i for i, m in enumerate(messages) if m["role"] != "system"), 0)
        else:
            cut = marks[-1] + 1 if marks else 0
        fault = self._draw(messages)
        user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        with self._lock:
            self.requests += 1
            self.hits[messages_key(messages)] += 1
            self.hits_by_user[user] += 1
            entry = {
                "endpoint": flavour,
                "fault": fault,
                "model": body.get("model"),
                "messages": messages,
                "response_format": body.get("response_format"),
                "output_config": body.get("output_config"),
                "cache_control": [
                    "system" if messages[i]["role"] == "system" else f"turn {i}" for i in marks
                ],
                "limits": {
                    k: body[k] for k in ("max_tokens", "max_completion_tokens") if k in body
                },
            }
            self.log.append(entry)
        if self.api_key is not None and key != self.api_key:
            with self._lock:
                self.auth_failures += 1
            # Echo the key back, as some proxies do: callers must scrub it from their errors.
            return self._error(
                flavour, 401, "authentication_error", f"invalid api key {key!r}", entry
            )
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if fault:
            with self._lock:
                self.faults_injected[fault] += 1
        if fault == "429":
            return self._error(
                flavour,
                429,
                "rate_limit_error",
                "slow down",
                entry,
                {"retry-after": str(self.faults.retry_after)},
            )
        if fault == "500":
            return self._error(flavour, 500, "api_error", "internal error", entry)
        if fault == "slow":
            await asyncio.sleep(self.faults.slow_s)
        if fault == "malformed":
            return self._send(
                entry,
                200,
                Response(
                    '{"id": "x", "choices": [{"index": 0, "mess', media_type="application/json"
                ),
            )
        text = self.responder(messages)
        finished = True
        if fault == "truncated":
            text, finished = text[: len(text) // 2], False
        if fault == "huge":
            text = (text + " ") * (HUGE_BYTES // (len(text) + 1) + 1)
        tin, tout = sum(tokens(m["content"]) for m in messages), tokens(text)
        if fault == "overbill":
            tout = 500_000
        read = written = 0
        if self.prompt_cache and cut:
            prefix = messages_key(messages[:cut])
            size = sum(tokens(m["content"]) for m in messages[:cut])
            with self._lock:
                if prefix in self._prefixes:
                    read = size
                elif flavour == "anthropic":  # OpenAI reports no writes
                    written = size
                self._prefixes.add(prefix)
        with self._lock:  # processed to the end: billed, whether or not the client still waits
            self.billed_input_tokens += tin
            self.billed_output_tokens += tout
        payload = completion_body(
            flavour, body.get("model"), text, tin, tout, finished, read, written, "fake"
        )
        if finished:
            with self._lock:
                self.answered += 1
        return self._send(entry, 200, JSONResponse(payload))

    def _error(
        self,
        flavour: str,
        status: int,
        kind: str,
        message: str,
        entry: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> Response:
        if flavour == "openai":
            body = {"error": {"message": message, "type": kind, "code": None}}
        else:
            body = {"type": "error", "error": {"type": kind, "message": message}}
        return self._send(entry, status, JSONResponse(body, status_code=status, headers=headers))

    def _send(self, entry: dict[str, Any], status: int, response: Response) -> Response:
        with self._lock:
            self.status[status] += 1
            entry["status"] = status
        return response


def _marked(content: Any) -> bool:
    """Whether a message's content carries an Anthropic `cache_control` breakpoint."""
    return isinstance(content, list) and any(
        isinstance(block, dict) and "cache_control" in block for block in content
    )


def _text(content: Any) -> str:
    """Message content as text (Anthropic and OpenAI both allow a list of typed blocks)."""
    if isinstance(content, list):
        return "".join(block.get("text", "") for block in content if isinstance(block, dict))
    return str(content)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the fake frontier API until killed.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added per request")
    parser.add_argument("--answers", help="JSON file {last user message: reply}; else echo")
    args = parser.parse_args()
    responder = None
    if args.answers:
        with open(args.answers, encoding="utf-8") as handle:
            answers = json.load(handle)

        def responder(messages: list[dict[str, Any]]) -> str:
            last = next(m["content"] for m in reversed(messages) if m["role"] == "user")
            return answers.get(last) or echo_responder(messages)

    api = FakeAPI(responder, latency_s=args.latency, port=args.port).start()
    print(api.root_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        api.stop()


if __name__ == "__main__":
    main()
