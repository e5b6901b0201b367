"""Talking to a vLLM OpenAI-compatible server: completions over token ids, adapters, rescoring.

Why `/v1/completions` with token ids rather than `/v1/chat/completions`: Temper renders the
prompt itself (the registered task's prompt through the bundle's chat template, exactly as
evaluated), so the tokens vLLM sees are the tokens the built-in engine sees, whichever chat
template a vLLM run by someone else was started with. `return_token_ids` gives the generated
ids back, so label confidences are computed on tokens, as `evaluation.confidence` defines them.

Why rescoring: vLLM applies the structured-output mask to the logits before it computes
logprobs, so under a schema its logprobs are renormalised over the allowed tokens (a label's
probability is then the model's probability *given that it answers with a label*). The
evaluation and the router's registered threshold use the raw model's probabilities.
`token_logprob` gets one: a one-token request without a grammar over the reply so far, asking
for that token's logprob (`logprob_token_ids`); only the few tokens that spell a label are
rescored, concurrently, and their prefix is in vLLM's prefix cache. (`prompt_logprobs` over the
whole reply would be one request, but vLLM 0.32's CPU LoRA kernels fail on it when it shares a
batch with other requests: the engine dies with an einsum shape error.)

Hand-written over httpx rather than the openai SDK: vLLM's extensions (`return_token_ids`,
`prompt_logprobs`, the LoRA endpoints) are outside the SDK's types, and a streamed request
must be cancellable by closing its connection (vLLM then aborts it).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from ..errors import TemperError


def lora_name(label: str, adapter_sha256: str) -> str:
    """An adapter's name inside vLLM: a label and the adapter's hash. vLLM keeps the first
    adapter loaded under a name (`load_adapter` then does nothing), so callers sharing one
    vLLM (gateway replicas, registries whose versions share numbers, evaluations) must never
    give two adapters one name."""
    return f"{label}-{adapter_sha256[:12]}"


class EngineUnavailable(TemperError):
    """The engine cannot be reached, is restarting, or failed (the gateway answers 503)."""


class EngineRejected(TemperError):
    """The engine refused the request as invalid (the gateway answers 400 with its reason)."""


def _error_message(response: httpx.Response) -> str:
    try:
        body = json.loads(response.content or b"{}")
    except ValueError:
        return response.text[:500]
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        return str(err.get("message") or err.get("detail") or err)[:500]
    return str(err)[:500]


def raise_for(response: httpx.Response, what: str) -> None:
    if response.status_code < 400:
        return
    message = f"vLLM {what}: HTTP {response.status_code}: {_error_message(response)}"
    if response.status_code in (400, 404, 422):
        raise EngineRejected(message)
    raise EngineUnavailable(message)


class VllmClient:
    """HTTP client of one vLLM server (sync calls for control, async ones for requests)."""

    def __init__(self, url: str, key: str | None = None, timeout_s: float = 600.0):
        self.url = url.rstrip("/")
        self.headers = {"authorization": f"Bearer {key}"} if key else {}
        self.timeout = httpx.Timeout(timeout_s, connect=5.0)
        self._async: httpx.AsyncClient | None = None

    # -- control (sync: called from the loader and supervisor threads) --

    def _post(self, path: str, body: dict[str, Any], what: str) -> httpx.Response:
        try:
            response = httpx.post(
                f"{self.url}{path}", json=body, headers=self.headers, timeout=self.timeout
            )
        except httpx.TransportError as err:
            raise EngineUnavailable(f"vLLM at {self.url} not reachable ({what}): {err}") from None
        return response

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter under `name` (already loaded under that name: nothing to do)."""
        body = {"lora_name": name, "lora_path": path}
        response = self._post("/v1/load_lora_adapter", body, f"loading {name}")
        if response.status_code == 400 and "already" in response.text:
            return
        raise_for(response, f"loading adapter {name} from {path}")

    def unload_adapter(self, name: str) -> None:
        response = self._post("/v1/unload_lora_adapter", {"lora_name": name}, f"unloading {name}")
        if response.status_code in (400, 404):
            return  # not loaded (e.g. the engine restarted without it)
        raise_for(response, f"unloading adapter {name}")

    def models(self) -> list[str]:
        return [m["id"] for m in self._models()]

    def base_model(self) -> str:
        """The name vLLM serves its base model under (the model that is no LoRA adapter)."""
        bases = [m["id"] for m in self._models() if not m.get("parent")]
        if not bases:
            raise EngineUnavailable(f"vLLM at {self.url} lists no base model")
        return bases[0]

    def _models(self) -> list[dict[str, Any]]:
        try:
            response = httpx.get(f"{self.url}/v1/models", headers=self.headers, timeout=10)
        except httpx.TransportError as err:
            raise EngineUnavailable(f"vLLM at {self.url} not reachable: {err}") from None
        raise_for(response, "listing models")
        return response.json()["data"]

    # -- requests (async: on the server's event loop, or an evaluation's) --

    def client(self) -> httpx.AsyncClient:
        if self._async is None:
            # vLLM's uvicorn closes a connection idle for 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE);
            # one reused just then fails with a ReadError (seen in CI): forget them sooner.
            limits = httpx.Limits(
                max_connections=256, max_keepalive_connections=64, keepalive_expiry=2.0
            )
            self._async = httpx.AsyncClient(
                base_url=self.url, headers=self.headers, timeout=self.timeout, limits=limits
            )
        return self._async

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.aclose()
            self._async = None

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST /v1/completions with `stream: true`; yields each chunk. Closing the iterator
        closes the connection, and vLLM aborts the request."""
        body = {**body, "stream": True}
        try:
            async with self.client().stream("POST", "/v1/completions", json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise_for(response, "completion")
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise EngineUnavailable(f"vLLM completion failed: {chunk['error']}")
                    yield chunk
        except httpx.TransportError as err:
            raise EngineUnavailable(f"vLLM at {self.url} not reachable: {err!r}") from None

    async def _one_token(self, body: dict[str, Any], what: str) -> dict[str, Any]:
        """One greedy step (`max_tokens` 1) of a non-streamed completion: its choice."""
        body = {**body, "max_tokens": 1, "temperature": 0, "logprobs": 0}
        try:
            response = await self.client().post("/v1/completions", json=body)
        except httpx.TransportError as err:
            raise EngineUnavailable(f"vLLM at {self.url} not reachable: {err!r}") from None
        raise_for(response, what)
        return response.json()["choices"][0]

    async def next_token(self, model: str, ids: list[int], allowed: list[int]) -> tuple[int, float]:
        """The greedy next token after `ids` among `allowed`, and its raw logprob (vLLM
        computes logprobs before it applies `allowed_token_ids`)."""
        body = {"model": model, "prompt": ids, "allowed_token_ids": allowed}
        choice = await self._one_token({**body, "return_token_ids": True}, "closing the answer")
        return int(choice["token_ids"][0]), float(choice["logprobs"]["token_logprobs"][0])

    async def token_logprob(self, model: str, ids: list[int], token: int) -> float:
        """The raw model's log-probability of `token` after `ids` (one step, no grammar)."""
        body = {"model": model, "prompt": ids, "logprob_token_ids": [token]}
        choice = await self._one_token({**body, "return_tokens_as_token_ids": True}, "rescoring")
        return float(choice["logprobs"]["top_logprobs"][0][f"token_id:{token}"])
