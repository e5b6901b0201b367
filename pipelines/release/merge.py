"""`temper merge`: fold a LoRA adapter into its base model, a standalone model for serving."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

from ..errors import MissingInput
from ..io import atomic_dir, write_json
from ..model_source import adapter_method, load_causal_lm
from ..training.model import load_base


def merge(
    candidate: str | Path,
    out: str | Path,
    base_dir: str | Path,
    dtype_name: Literal["bfloat16", "float16", "float32"] = "bfloat16",
) -> dict[str, Any]:
    """Merge an adapter into its base and save a standalone safetensors model (atomically).

    LoRA adapters merge into the base weights in their 16-bit dtype (evaluate merges them the
    same way, in float32 on the CPU). A QLoRA adapter was trained, and evaluated, on NF4
    weights plus the adapter unmerged: it is merged into those weights dequantized to 16 bits
    (what the adapter saw, not the original 16-bit ones). The merged model is not the model
    that was evaluated (the 4-bit rounding is baked in, the adapter is rounded to 16 bits):
    a warning says so; evaluate the merged folder before shipping it.
    """
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer

    candidate = Path(candidate)
    adapter = candidate / "adapter" if (candidate / "adapter").is_dir() else candidate
    if not (adapter / "adapter_config.json").exists():
        raise MissingInput(f"{adapter}: no adapter_config.json (not a PEFT adapter)")
    PeftConfig.from_pretrained(adapter)  # validates the adapter config
    method = adapter_method(adapter)
    dtype = getattr(torch, dtype_name)
    if method == "qlora":
        warnings.warn(
            "merging a QLoRA adapter into dequantized NF4 weights: the merged 16-bit model is "
            "not the one `temper evaluate` scored (4-bit base + adapter, unmerged); it carries "
            "the base's 4-bit rounding and a 16-bit rounded adapter. Evaluate the merged "
            "model before shipping it, or serve the 4-bit base + adapter as evaluated",
            UserWarning,
            stacklevel=2,
        )
        _, model = load_base(base_dir, "qlora", "bf16")
        model = model.dequantize().to(dtype)
    else:
        model = load_causal_lm(base_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(
        adapter if (adapter / "tokenizer.json").exists() else base_dir
    )
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {
            "adapter": str(adapter),
            "base": str(base_dir),
            "method": method,
            "dtype": dtype_name,
            "dequantized": method == "qlora",
        }
        write_json(tmp / "temper_merge.json", info)
    return info
