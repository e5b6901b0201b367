"""`train:` in params.yaml, beside the training code that reads it (trl style).

Candidates override any field; `TrainConfig.candidate(name)` gives one candidate's config.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ..config import ConfigError, Section

# The Llama-style projection names, for reference: `all-linear` selects exactly these on
# SmolLM2/Llama (tests/test_train.py checks it), and the right ones on other architectures.
TARGETS_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TrainConfig(Section):
    """`train:` in params.yaml. Candidates override any of these fields."""

    data_dir: str = Field("data/distilled", description="Folder with train/validation.jsonl.")
    out_dir: str = Field("models/candidates", description="Candidates go to <out_dir>/<name>/.")
    plots_dir: str = Field("plots/train", description="Loss curves (<name>.csv) for dvc plots.")
    checkpoint_dir: str = Field(
        ".cache/train", description="Checkpoints (outside DVC outputs, so a re-run can resume)."
    )
    accelerate: str = Field(
        "cpu", description="Accelerate config: a name under configs/accelerate/ or a path."
    )
    method: Literal["lora", "qlora"] = Field("lora", description="qlora: 4-bit NF4 base.")
    rank: int = Field(16, gt=0, description="LoRA rank r.")
    alpha: float = Field(32, gt=0, description="LoRA alpha (scale = alpha / rank).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="Linear layers that get LoRA: 'all-linear' (peft: every linear layer of "
        "the blocks, the output head excluded) or a list of module names.",
    )
    layers: int | None = Field(
        None, gt=0, description="LoRA on the top N blocks only (null: all). Cuts the backward."
    )
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate.")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Warmup share of the steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    epochs: float = Field(1.0, gt=0, description="Epochs (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps (overrides epochs).")
    max_train_examples: int | None = Field(
        None, gt=0, description="Use the first N training records (null: all)."
    )
    batch_size: int = Field(8, gt=0, description="Per-device micro-batch size.")
    grad_accum: int = Field(1, gt=0, description="Gradient accumulation steps.")
    max_length: int = Field(
        320, gt=16, description="Max tokens per example; longer clauses are cut (counted)."
    )
    group_by_length: bool = Field(True, description="Batch examples of similar length.")
    packing: bool = Field(
        False, description="Pack examples (needs flash-attention so attention stays per example)."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast where the hardware has it, else fp32."
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: on for CUDA, off on CPU (2.5x slower there, memory is ample)."
    )
    seed: int = Field(0, description="Seed of the adapter init, dropout and data order.")
    save_steps: int = Field(50, gt=0, description="Checkpoint every N optimizer steps.")
    logging_steps: int = Field(1, gt=0, description="Log loss and lr every N steps.")
    eval_batch_size: int = Field(16, gt=0, description="Batch size of the validation loss.")
    max_eval_examples: int | None = Field(
        None, gt=0, description="Validation records scored for the loss (null: all)."
    )
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads (null: default).")
    candidates: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"default": {}},
        description="Candidate name -> overrides of the fields above; one model each.",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        for name, overrides in self.candidates.items():
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"candidate name {name!r}: use letters, digits, - and _")
            bad = set(overrides) - (set(type(self).model_fields) - {"candidates"})
            if bad:
                raise ValueError(f"candidates.{name}: unknown field(s) {sorted(bad)}")
        return self

    def only(self, names: list[str] | None) -> TrainConfig:
        """This config with only the candidates `names` (all when none are given); an unknown
        name fails before anything trains."""
        for name in names or []:
            if name not in self.candidates:
                have = sorted(self.candidates)
                raise ConfigError(f"train.candidates has no {name!r} (have: {have})")
        if not names:
            return self
        return self.model_copy(update={"candidates": {n: self.candidates[n] for n in names}})

    def candidate(self, name: str) -> TrainConfig:
        """This config with candidate `name`'s overrides applied (validated)."""
        if name not in self.candidates:
            raise ConfigError(f"train.candidates has no {name!r} (have: {sorted(self.candidates)})")
        data = self.model_dump()
        data.update(self.candidates[name])
        data["candidates"] = {name: self.candidates[name]}
        try:
            return type(self).model_validate(data)
        except ValueError as err:
            raise ConfigError(f"train.candidates.{name}: {err}") from None
