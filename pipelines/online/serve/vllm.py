"""`temper serve --engine vllm`: the `vllm serve` command for the same registered adapters.

vLLM (GPU only; not installable here, see STACK-FACTS) serves LoRA adapters over one base with
`--enable-lora --lora-modules <name>=<path>`; the request's `model` then picks the adapter by
that name, so the served names here are Temper's ids (`champion`, ...) and clients do not
change. Before printing, each adapter is checked against what vLLM's LoRA loader accepts:
no `modules_to_save` (whole copied modules), no new or resized token embeddings / `lm_head`
(LoRA on them, or extra vocabulary), no DoRA, and a rank vLLM supports (`--max-lora-rank` is
then the smallest of its allowed values that covers every adapter).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from ...evaluation import bundle
from .adapters import Source

# `--max-lora-rank` choices of vLLM's LoRA config (vllm/config/lora.py).
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
EMBEDDINGS = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")


class VllmIncompatible(ValueError):
    """An adapter vLLM would refuse (the message says why)."""


def check_adapter(adapter: Path) -> int:
    """Raise `VllmIncompatible` unless vLLM can serve `adapter`; returns its rank."""
    config_file = adapter / "adapter_config.json"
    cfg: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
    where = str(config_file)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise VllmIncompatible(f"{where}: peft_type {cfg.get('peft_type')}: vLLM serves LoRA only")
    if cfg.get("modules_to_save"):
        raise VllmIncompatible(
            f"{where}: modules_to_save {cfg['modules_to_save']}: vLLM loads LoRA weights only, "
            "not whole copied modules"
        )
    if cfg.get("use_dora"):
        raise VllmIncompatible(f"{where}: use_dora: vLLM does not serve DoRA adapters")
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    hit = [t for t in targets if any(e in t for e in EMBEDDINGS)]
    if hit:
        raise VllmIncompatible(f"{where}: LoRA on {hit}: vLLM takes no embedding/lm_head LoRA")
    weights = adapter / "adapter_model.safetensors"
    if weights.exists():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            bad = [k for k in f.keys() if any(e in k for e in EMBEDDINGS)]  # noqa: SIM118
        if bad:
            raise VllmIncompatible(
                f"{weights}: holds {bad[:3]}: resized embeddings or lm_head, which vLLM refuses"
            )
    rank = max([int(cfg.get("r", 8)), *map(int, (cfg.get("rank_pattern") or {}).values())])
    if rank > MAX_LORA_RANKS[-1]:
        raise VllmIncompatible(f"{where}: rank {rank} above vLLM's largest ({MAX_LORA_RANKS[-1]})")
    return rank


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
        str(next(r for r in MAX_LORA_RANKS if r >= max(ranks))),
        "--max-loras",
        str(len(modules)),
        "--generation-config",
        "vllm",
    ]
    if keys:
        argv += ["--api-key", "$TEMPER_API_KEY"]
    return argv


def render(argv: list[str]) -> str:
    return " ".join(a if a == "$TEMPER_API_KEY" else shlex.quote(a) for a in argv)
