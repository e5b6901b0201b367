"""`temper merge`: fold a LoRA adapter into its base model, a standalone model for serving."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

from ..io import atomic_dir, write_json
from ..results import TrainResult
from ..training.model import load_base


def merge(
    candidate: str | Path,
    out: str | Path,
    base_dir: str | Path,
    dtype_name: Literal["bfloat16", "float16", "float32"] = "bfloat16",
) -> dict[str, Any]:
    """Merge an adapter into its base and save a standalone safetensors model (atomically).

    LoRA adapters merge into the base weights in their 16-bit dtype. A QLoRA adapter was
    trained against NF4 weights: it is merged into those weights dequantized to bf16 (what the
    adapter saw, not the original 16-bit ones), which costs some quality compared with serving
    the 4-bit base plus the adapter unmerged; a warning says so.
    """
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    candidate = Path(candidate)
    adapter = candidate / "adapter" if (candidate / "adapter").is_dir() else candidate
    if not (adapter / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter}: no adapter_config.json (not a PEFT adapter)")
    PeftConfig.from_pretrained(adapter)  # validates the adapter config
    metrics_file = adapter.parent / "train_metrics.json"
    method = TrainResult.load(metrics_file).method if metrics_file.exists() else "lora"
    dtype = getattr(torch, dtype_name)
    if method == "qlora":
        warnings.warn(
            "merging a QLoRA adapter into dequantized NF4 weights: the merged 16-bit model "
            "carries the 4-bit rounding of the base; expect a small quality loss versus the "
            "4-bit base + adapter (compare with `temper evaluate` before shipping)",
            UserWarning,
            stacklevel=2,
        )
        _, model = load_base(base_dir, "qlora", "bf16")
        model = model.dequantize().to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
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
