"""`serve:` in params.yaml: what `temper serve` loads, how it batches, who may call it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...config import Section


class ServeConfig(Section):
    """`serve:` in params.yaml (every field is also a `temper serve -S serve.<key>=...`)."""

    host: str = Field("127.0.0.1", description="Bind address (beyond loopback: keys required).")
    port: int = Field(8000, ge=0, le=65535, description="Port (0: any free one).")
    models: list[str] = Field(
        default_factory=lambda: ["models:/temper-clause-review@champion"],
        description="What to serve: models:/<name>@<alias> (watched: hot-swapped when the "
        "alias moves), models:/<name>/<version> (pinned), or a pulled bundle folder. "
        "The request's `model` picks one by id: the alias, <name>-v<version> or the folder name.",
    )
    watch_interval_s: float = Field(
        10.0, gt=0, description="How often the registry aliases are checked."
    )
    cache_dir: str = Field(".cache/serve", description="Pulled bundles (<name>-v<version>/).")
    base_dir: str | None = Field(
        None,
        description="A local copy of the base model (its hash must match the bundle's; "
        "null: found by the bundle's identity, e.g. the built-in one).",
    )
    prompt: Literal["task", "raw"] = Field(
        "task",
        description="task: the last user message is the record's text, wrapped in the "
        "registered task's prompt exactly as evaluated; raw: the messages as sent, through "
        "the chat template.",
    )
    max_batch_size: int = Field(16, gt=0, description="Requests generated together at most.")
    max_wait_ms: float = Field(
        20.0, ge=0, description="How long the first queued request waits for company."
    )
    max_queue: int = Field(64, gt=0, description="Queued requests beyond this get 429.")
    max_body_bytes: int = Field(1_000_000, gt=0, description="Larger request bodies get 413.")
    max_prompt_tokens: int = Field(
        2048, gt=0, description="Longer prompts get 400 (context_length_exceeded)."
    )
    max_tokens_limit: int = Field(512, gt=0, description="The largest `max_tokens` accepted.")
    request_timeout_s: float = Field(
        120.0, gt=0, description="A request unanswered after this gets 504."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM: how long in-flight requests may finish."
    )
    api_keys_file: str | None = Field(
        None,
        description="One key per line, plain or `sha256:<hex>` (only digests are kept).",
    )
    api_keys_env: str = Field(
        "TEMPER_API_KEYS", description="Environment variable with comma-separated keys."
    )
    log_file: str | None = Field(None, description="JSON log lines go here too (null: stderr).")
    log_prompts: bool = Field(
        False, description="Log prompt and answer text (redacted: emails, cards, IPs, phones)."
    )
    semantic_cache: bool = Field(
        False,
        description="Answer repeats from the semantic cache (the `cache:` section) before "
        "the model and the router; greedy task answers only (docs/cache.md).",
    )
    engine: Literal["builtin", "vllm"] = Field(
        "builtin",
        description="What generates: builtin (micro-batches through model.generate; CPU, "
        "tests, small models) or vllm (a vLLM server Temper starts from the `vllm:` section, "
        "or the one at engine_url). Everything else is the same code for both.",
    )
    engine_url: str | None = Field(
        None,
        description="engine vllm: attach to this vLLM server (e.g. http://vllm:8000) instead of "
        "starting one; it must run with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING.",
    )
    threads: int | None = Field(None, gt=0, description="torch CPU threads (null: default).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs.")
