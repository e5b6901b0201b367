"""The model being tuned: base weights (fp32 for LoRA, 4-bit NF4 for QLoRA), LoRA, the loss head.

Two things are done by hand, because they decide the speed on a CPU:

- The loss head. trl's fused LM head scores every position on devices without Triton (CPU),
  casting vocabulary chunks to fp32. Only the completion (~20 of ~170 tokens) is scored, so
  `add_completion_loss` projects just those positions through the LM head.
- `layers`: LoRA on the top N transformer blocks only. Nothing below the lowest adapted block
  needs a gradient, so autograd stops there and the backward pass shrinks with it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import ConfigError
from .config import TrainConfig


def device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(cfg: TrainConfig) -> str:
    """bf16 where the hardware runs it natively (CUDA Ampere+, CPUs with AVX512-BF16/AMX)."""
    import torch

    if cfg.precision != "auto":
        return cfg.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.cpu._is_avx512_bf16_supported() else "fp32"


def resolve_checkpointing(cfg: TrainConfig) -> bool:
    if cfg.gradient_checkpointing == "auto":
        return device_type() == "cuda"
    return cfg.gradient_checkpointing == "on"


def disable_bnb_cpu_repack(model) -> int:
    """Keep bitsandbytes from repacking 4-bit weights for CPU inference.

    bitsandbytes >= 0.49 on CPUs with AVX512-BF16 repacks the weights in place on the first
    no-grad eval forward (generate, the Trainer's eval loop); gradients through them are wrong
    afterwards (cosine 0.04 vs dense). Turning the fast path off keeps training correct.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def load_base(base_dir: str | Path, method: str, precision: str, gc: bool = False):
    """Load the tokenizer and base model: fp32 master weights (LoRA) or 4-bit NF4 (QLoRA)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=compute,
        )
        if fsdp:
            # FSDP shards flat parameters of one dtype: store everything in the compute dtype
            # and let FSDP place the shards (no device_map), as in the FSDP-QLoRA recipe.
            kwargs["dtype"] = compute
        elif device_type() == "cuda":
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        disable_bnb_cpu_repack(model)
        if not fsdp:  # it upcasts norms to fp32, which FSDP's one-dtype flat params refuse
            # Without checkpointing, don't let peft make the inputs require grad: that would
            # force a backward through every block even when only the top ones are adapted.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)
    return tokenizer, model


def add_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    n_layers = model.config.num_hidden_layers
    layers = None
    if cfg.layers is not None:
        if cfg.layers > n_layers:
            raise ConfigError(f"train.layers={cfg.layers} but the model has {n_layers} blocks")
        layers = list(range(n_layers - cfg.layers, n_layers))
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        bias="none",
        target_modules=list(cfg.target_modules),
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def add_completion_loss(model) -> None:
    """Give the causal LM a `completion_loss=True` forward that scores only labelled positions.

    Patched on the inner model (like trl's `add_fused_lm_head`) so calls still go through
    DDP/PEFT wrappers and gradients stay synchronised. The loss is the token mean over the
    batch (or the sum over `num_items_in_batch` under gradient accumulation), as in trl.
    """
    import torch
    import torch.nn.functional as F
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original = model.forward
    backbone_name = model.base_model_prefix

    def forward(*args, completion_loss=False, labels=None, num_items_in_batch=None, **kwargs):
        if not completion_loss:
            if labels is not None:
                kwargs["labels"] = labels
            return original(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = getattr(model, backbone_name)(*args, **kwargs).last_hidden_state
        targets = labels[:, 1:]
        mask = targets != -100
        logits = model.get_output_embeddings()(hidden[:, :-1][mask]).float()
        total = F.cross_entropy(logits, targets[mask], reduction="sum")
        denom = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
        return CausalLMOutputWithPast(loss=total / torch.as_tensor(denom, device=total.device))

    model.forward = forward
