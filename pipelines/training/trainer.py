"""trl's SFTTrainer with the completion-only loss, its arguments, MLflow step logging, the
validation loss, and what the ranks of a distributed run tell each other."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

from ..config import ConfigError
from .config import TrainConfig
from .data import fit_prompt, tokenize_pair
from .model import device_type


def make_trainer_class():
    """SFTTrainer with the completion-only loss head and a token counter (lazy import)."""
    from trl import SFTTrainer

    class TemperTrainer(SFTTrainer):
        tokens_seen = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.tokens_seen += int(inputs["attention_mask"].sum())
            inputs = {
                k: v
                for k, v in inputs.items()
                if k in ("input_ids", "attention_mask", "labels", "position_ids")
            }
            out = model(**inputs, completion_loss=True, num_items_in_batch=num_items_in_batch)
            loss = out.loss
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages; trl does the same
            return (loss, out) if return_outputs else loss

    return TemperTrainer


def make_callback(mlrun: Any = None) -> Any:
    """Send loss, learning rate and grad norm of every logged step to the MLflow child run
    (`tracking.ChildRun`; None: nothing is sent)."""
    from transformers import TrainerCallback

    class Track(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if mlrun is None or not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            row = {"loss": logs["loss"], "learning_rate": logs.get("learning_rate", 0.0)}
            if "grad_norm" in logs:
                row["grad_norm"] = logs["grad_norm"]
            mlrun.log_metrics(row, step=state.global_step)

    return Track()


def sft_args(cfg: TrainConfig, out: Path, precision: str, gc: bool):
    from trl import SFTConfig

    if cfg.packing and device_type() != "cuda":
        raise ConfigError(
            "train.packing needs flash-attention (CUDA) so that attention stays "
            "inside each packed example; set train.packing: false on CPU"
        )
    return SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio in transformers 5
        weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        max_length=cfg.max_length,
        packing=cfg.packing,
        padding_free=cfg.packing,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        completion_only_loss=True,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=gc,
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        report_to="none",
        disable_tqdm=True,  # our own bar (training.progress), not a dict per logged step
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        use_cpu=device_type() == "cpu",
        dataset_num_proc=None,
        eval_strategy="no",
    )


def mean_loss(
    model,
    tokenizer,
    records: list[dict[str, Any]],
    max_length: int,
    batch_size: int = 16,
    precision: str = "fp32",
) -> float:
    """Token-mean completion loss over `records` (no grad), same loss as in training."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    feats = [tokenize_pair(tokenizer, fit_prompt(tokenizer, r, max_length)[0]) for r in records]
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    dtype = torch.bfloat16 if precision == "bf16" else None
    with torch.no_grad(), torch.autocast(device_type(), dtype=dtype, enabled=dtype is not None):
        for i in range(0, len(feats), batch_size):
            batch = collate(feats[i : i + batch_size])
            batch = {k: v.to(model.device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
                completion_loss=True,
                num_items_in_batch=1,
            )
            total += float(out.loss)
            count += n
    model.train(was_training)
    return total / max(count, 1)


def lora_state(model) -> dict[str, Any]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(model).items()}


def weights_hash(state: dict[str, Any]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].numpy().tobytes())
    return digest.hexdigest()[:16]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def broadcast_object(obj: Any) -> Any:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def gather_objects(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_sum(value: int) -> int:
    return int(sum(gather_objects(value)))
