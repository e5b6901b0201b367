"""Where evaluation runs and in which dtype: `evaluate.device` and `evaluate.dtype` resolved.

`choose` is pure (the hardware facts are arguments), so every branch is tested on a CPU-only
machine; `resolve` asks torch for those facts. `auto` means: the GPU when torch sees one, in
bf16 where it runs natively (Ampere and newer), else fp16; float32 on the CPU. The CPU keeps
float32 even where it has AVX512-BF16: that is the dtype every committed CPU result came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class Placement:
    """A resolved device ("cpu" or "cuda") and torch dtype name."""

    device: str
    dtype: str


def choose(device: str, dtype: str, cuda_available: bool, bf16_supported: bool) -> Placement:
    """Resolve `auto` and refuse combinations the hardware cannot run."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"evaluate.device={device!r}: use auto, cpu or cuda")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"evaluate.dtype={dtype!r}: use auto, float32, bfloat16 or float16")
    if device == "cuda" and not cuda_available:
        raise ConfigError("evaluate.device=cuda but torch sees no CUDA device (use auto or cpu)")
    dev = ("cuda" if cuda_available else "cpu") if device == "auto" else device
    if dtype == "auto":
        if dev == "cpu":
            return Placement("cpu", "float32")
        return Placement("cuda", "bfloat16" if bf16_supported else "float16")
    if dev == "cuda" and dtype == "bfloat16" and not bf16_supported:
        raise ConfigError(
            "evaluate.dtype=bfloat16 but this GPU has no native bf16 (use auto or float16)"
        )
    return Placement(dev, dtype)


def resolve(device: str = "auto", dtype: str = "auto") -> Placement:
    """`choose` with this machine's facts."""
    import torch

    cuda = torch.cuda.is_available()
    return choose(device, dtype, cuda, cuda and torch.cuda.is_bf16_supported())
