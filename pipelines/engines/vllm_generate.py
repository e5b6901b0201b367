"""Whole test sets through vLLM (`evaluate.engine: vllm`): what the evaluation measures is then
what `temper serve --engine vllm` serves, on the same engine, grammar and prompts.

One vLLM process for the base model, started at the first use and kept for the evaluation's
run (baseline, every candidate, validation and test); each candidate's adapter is loaded at
runtime under its own name. Prompts are rendered and tokenised here, as `generation.generate`
does, and sent as token ids; every request streams, so the time to the first token and the
request's own latency are measured per answer; answers stop where the built-in loop stops
them (EOS, the JSON answer complete, the budget). Label confidences use the raw model's
logprobs of the label tokens (`VllmClient.token_logprob`), as everywhere else.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from ..io import adapter_hash
from .vllm_client import VllmClient, lora_name
from .vllm_server import VllmConfig, VllmServer, check_adapter


class VllmGenerator:
    """A vLLM server for one evaluation run, started at first use (`close` stops it), or one
    that runs already at `url` (attached: `close` leaves it running)."""

    def __init__(
        self,
        cfg: VllmConfig,
        base_dir: str | Path,
        log_path: str | Path,
        rows: int,
        url: str | None = None,
    ):
        self.cfg, self.base_dir, self.log_path, self.rows = cfg, Path(base_dir), log_path, rows
        self.server: VllmServer | None = None
        # an attached server's key, if it wants one, comes from the environment (never params)
        self.client = VllmClient(url, os.environ.get("VLLM_API_KEY")) if url else None
        self.base_name: str | None = None  # the base model's name in vLLM
        self.adapters: dict[str, str] = {}  # adapter folder -> its name in vLLM

    def start(self) -> None:
        """Start vLLM now (or reach the attached one) rather than at the first generation."""
        self._ensure(None)

    def _ensure(self, adapter: Path | None) -> str:
        """The vLLM model name for `adapter` (None: the base), starting vLLM if needed."""
        if self.client is None:
            rank = check_adapter(adapter) if adapter is not None else 8
            self.server = VllmServer(
                self.cfg, self.base_dir.resolve(), self.log_path, max(rank, 64), self.rows
            )
            self.server.start()
            self.client = VllmClient(self.server.url, self.server.key)
            self.base_name = str(self.base_dir.resolve())
        if self.base_name is None:  # attached: whatever name its operator served the base as
            self.base_name = self.client.base_model()
        if adapter is None:
            return self.base_name
        key = str(adapter.resolve())
        if key not in self.adapters:
            check_adapter(adapter)
            name = lora_name("eval", adapter_hash(adapter))
            self.client.load_adapter(name, key)
            self.adapters[key] = name
        return self.adapters[key]

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def generate(
        self,
        tokenizer: Any,
        prompts: list[list[dict[str, str]]],
        adapter: Path | None,
        max_new_tokens: int,
        schema: dict[str, Any] | None,
        label_positions: Any,
        stop_at_json: bool = True,
        progress: bool = True,
        desc: str = "generate",
    ) -> list[Any]:
        """`generation.Generation`s for `prompts`, in order. `label_positions(ids, text)` gives
        the reply's token indexes to rescore with the raw model (their logprobs replace
        vLLM's, which are taken after the schema mask)."""
        from ..chat import render, supports_system
        from ..evaluation.constrained import json_logits_processor

        model = self._ensure(adapter)
        system_ok = supports_system(tokenizer)
        texts = [
            render(tokenizer, p, system_ok, tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        constraint = json_logits_processor(schema, tokenizer) if schema else None
        one = _Request(self.client, model, max_new_tokens, constraint, stop_at_json)

        async def run_all() -> list[Any]:
            from tqdm.auto import tqdm

            gate = asyncio.Semaphore(self.rows)
            bar = tqdm(total=len(encoded), desc=desc, unit="ex", disable=not progress)

            async def limited(ids: list[int]) -> Any:
                async with gate:
                    g = await one(ids, tokenizer, label_positions)
                    bar.update(1)
                    return g

            try:
                return await asyncio.gather(*(limited(ids) for ids in encoded))
            finally:
                bar.close()
                assert self.client is not None
                await self.client.aclose()

        t0 = time.perf_counter()
        gens = asyncio.run(run_all())
        amortised = (time.perf_counter() - t0) * 1000 / max(len(gens), 1)
        for g in gens:  # throughput, as the built-in loop's batch wall time / batch size
            g.amortised_ms = amortised
        return gens


class _Request:
    """One prompt through vLLM, streamed, then its label tokens rescored."""

    def __init__(self, client, model, max_new_tokens, constraint, stop_at_json):
        self.client, self.model, self.budget = client, model, max_new_tokens
        self.constraint, self.stop_at_json = constraint, stop_at_json

    def body(self, ids: list[int]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": ids,
            "max_tokens": self.budget,
            "temperature": 0.0,
            "logprobs": 0,
            "return_token_ids": True,
        }
        if self.constraint is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": self.constraint.schema},
            }
        return body

    async def __call__(self, ids: list[int], tokenizer: Any, label_positions: Any) -> Any:
        from ..evaluation.generation import Generation
        from .closing import Closer, close_answer

        t0 = time.perf_counter()
        closer = Closer(self.constraint, self.budget, tokenizer) if self.constraint else None
        tokens: list[int] = []
        logprobs: list[float] = []
        first, closing = await self._stream(ids, tokens, logprobs, closer)
        if closing and closer is not None:
            await close_answer(self.client, self.model, ids, tokens, logprobs, closer)
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        if self.constraint is not None:
            places = label_positions(tokens, text)
            values = await asyncio.gather(
                *(
                    self.client.token_logprob(self.model, ids + tokens[:j], tokens[j])
                    for j in places
                )
            )
            for j, value in zip(places, values, strict=True):
                logprobs[j] = value
        elapsed = (time.perf_counter() - t0) * 1000
        first_ms = ((first or time.perf_counter()) - t0) * 1000
        return Generation(
            text=text,
            new_tokens=len(tokens),
            latency_ms=elapsed,
            first_token_ms=first_ms,
            amortised_ms=elapsed,
            token_ids=tokens,
            token_logprobs=logprobs,
        )

    async def _stream(
        self, ids: list[int], tokens: list[int], logprobs: list[float], closer: Any
    ) -> tuple[float | None, bool]:
        """Stream the completion into `tokens` / `logprobs`; (first token time, whether the
        answer must now be closed within its budget)."""
        from ..task import parse_answer

        first, raw = None, ""
        async for chunk in self.client.stream(self.body(ids)):
            if not chunk.get("choices"):
                continue
            choice = chunk["choices"][0]
            first = first or time.perf_counter()
            picked = choice.get("token_ids") or []
            if closer is not None and picked and not closer.keeps(tokens, raw, picked[0]):
                return first, True  # the built-in engine closes here: leave the stream
            values = (choice.get("logprobs") or {}).get("token_logprobs") or []
            for k, token in enumerate(choice.get("token_ids") or []):
                # EOS kept, as the built-in loop counts it among an answer's new tokens
                tokens.append(token)
                logprobs.append(float(values[k]) if k < len(values) else 0.0)
            piece = choice.get("text") or ""
            raw += piece
            if choice.get("finish_reason"):
                break
            if self.stop_at_json and "}" in piece and parse_answer(raw.strip()) is not None:
                break
        return first, False
