"""`temper serve --engine vllm --print-command`: the `vllm serve` line for the same versions.

For a platform team that runs vLLM itself and attaches the gateway to it (`serve.engine_url`):
the adapters are checked as the supervised engine checks them (`engines.check_adapter`), and
the line carries what the gateway relies on: LoRA with runtime loading, the rank that covers
every adapter, the guidance structured-output backend (the evaluation's grammar engine) and
greedy defaults (`--generation-config vllm`). The request's `model` picks the adapter by name.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from ... import bundle
from ...engines.vllm_server import VllmIncompatible, check_adapter, lora_rank_choice
from .adapters import Source

__all__ = ["VllmIncompatible", "check_adapter", "command", "render"]


def command(
    served: list[tuple[Source, Path]], base: str, host: str, port: int, keys: bool
) -> list[str]:
    """`vllm serve` argv for pulled bundles `served` ([(source, bundle folder)]) over `base`."""
    ranks, modules = [], []
    first = bundle.read_manifest(served[0][1])
    for source, folder in served:
        manifest = bundle.read_manifest(folder)
        if manifest.base["hash"] != first.base["hash"]:
            raise VllmIncompatible(
                f"{source.id} and {served[0][0].id} have different base models: one vLLM "
                "server serves adapters of one base"
            )
        adapter = folder / manifest.adapter
        ranks.append(check_adapter(adapter))
        modules.append(f"{source.id}={adapter.resolve()}")
    tokenizer = (served[0][1] / first.tokenizer).resolve()
    argv = [
        "vllm",
        "serve",
        base,
        "--host",
        host,
        "--port",
        str(port),
        "--tokenizer",
        str(tokenizer),
        "--chat-template",
        str((served[0][1] / first.chat_template).resolve()),
        "--enable-lora",
        "--lora-modules",
        *modules,
        "--max-lora-rank",
        str(lora_rank_choice(max(ranks))),
        "--max-loras",
        str(max(2, len(modules))),  # room for a hot swap's second version
        "--generation-config",
        "vllm",
        "--structured-outputs-config",
        json.dumps({"backend": "guidance"}),
    ]
    if keys:
        argv += ["--api-key", "$VLLM_API_KEY"]
    return argv


def render(argv: list[str]) -> str:
    line = " ".join(a if a == "$VLLM_API_KEY" else shlex.quote(a) for a in argv)
    return f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True {line}"
