"""The model being tuned: base weights (LoRA: fp32 on the CPU, the autocast dtype on a GPU;
QLoRA: 4-bit NF4), LoRA on the architecture's linear layers, the loss head.

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
from ..model_source import disable_bnb_cpu_repack
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


def base_dtype(method: str, precision: str, device: str) -> str:
    """The dtype the base weights are loaded in (torch name).

    LoRA on a GPU: the autocast dtype (bf16/fp16): the base is frozen, so 16-bit weights halve
    its memory and its matmuls run at tensor-core speed; peft keeps the adapter in fp32. On the
    CPU fp32 master weights with bf16 autocast (what every committed CPU result used). QLoRA:
    the non-quantized parts in fp32 (peft's `prepare_model_for_kbit_training` upcasts them).
    """
    if method == "lora" and device == "cuda" and precision in ("bf16", "fp16"):
        return {"bf16": "bfloat16", "fp16": "float16"}[precision]
    return "float32"


def load_base(base_dir: str | Path, method: str, precision: str, gc: bool = False):
    """Load the tokenizer and base model: LoRA in `base_dtype`, QLoRA in 4-bit NF4.

    Through `temper.model_source`: a referenced local folder is checked, and
    `model.attn_implementation` is passed to `from_pretrained`.
    """
    import torch

    from ..model_source import load_causal_lm, load_tokenizer, nf4_config

    tokenizer = load_tokenizer(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {"dtype": getattr(torch, base_dtype(method, precision, device_type()))}
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if method == "qlora":
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        kwargs["quantization_config"] = nf4_config(compute)
        if fsdp:
            # FSDP shards flat parameters of one dtype: store everything in the compute dtype
            # and let FSDP place the shards (no device_map), as in the FSDP-QLoRA recipe.
            kwargs["dtype"] = compute
        elif device_type() == "cuda":
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = load_causal_lm(base_dir, **kwargs)
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        disable_bnb_cpu_repack(model)
        if not fsdp:  # it upcasts norms to fp32, which FSDP's one-dtype flat params refuse
            # Without checkpointing, don't let peft make the inputs require grad: that would
            # force a backward through every block even when only the top ones are adapted.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)
    return tokenizer, model


def target_modules(model, targets: str | list[str]) -> list[str]:
    """LoRA's target modules as names: `all-linear` resolved by peft's own rule.

    peft resolves "all-linear" (every linear layer but the output head) itself, but refuses it
    together with `layers_to_transform`; so its resolver is run here and its module paths are
    reduced to their last names (q_proj, ...) when no excluded module shares one.
    """
    if isinstance(targets, list):
        return list(targets)
    import torch
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    resolved = _maybe_include_all_linear_layers(
        LoraConfig(target_modules=targets, task_type="CAUSAL_LM"), model
    ).target_modules
    if isinstance(resolved, str):
        raise ConfigError(f"train.target_modules={targets!r}: use 'all-linear' or a list of names")
    leaves = {name.rsplit(".", 1)[-1] for name in resolved}
    others = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name not in resolved
    }
    return sorted(leaves) if not leaves & others else sorted(resolved)


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
        target_modules=target_modules(model, cfg.target_modules),
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def write_quantization_marker(adapter_dir: Path, method: str) -> None:
    """A QLoRA adapter says so in its folder (`model_source.QUANT_FILE`): evaluate and merge
    then load the 4-bit base it was trained on, wherever the folder goes (registry, pull)."""
    from ..io import write_json
    from ..model_source import QUANT_FILE

    if method == "qlora":
        write_json(
            adapter_dir / QUANT_FILE,
            {"method": "qlora", "quant_type": "nf4", "double_quant": True, "bits": 4},
        )


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
