"""Inference engines both wings use: vLLM as a child process and its HTTP client.

`temper serve --engine vllm` (the online wing) and `evaluate.engine: vllm` (the offline
wing) start and talk to vLLM through the same two modules, so what the evaluation measured is
what the server serves: `vllm_server` (the `vllm:` params section, the command line, start,
readiness, restart, stop) and `vllm_client` (completions over token ids, runtime LoRA
loading, raw-logprob rescoring). vLLM runs in its own virtualenv (`make vllm`): Temper talks
to it over its OpenAI-compatible HTTP API and never imports it.
"""

from __future__ import annotations

from .vllm_client import EngineRejected, EngineUnavailable, VllmClient, lora_name
from .vllm_server import VllmConfig, VllmIncompatible, VllmServer, check_adapter

__all__ = [
    "EngineRejected",
    "EngineUnavailable",
    "VllmClient",
    "VllmConfig",
    "VllmIncompatible",
    "VllmServer",
    "check_adapter",
    "lora_name",
]
