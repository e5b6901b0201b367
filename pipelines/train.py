"""Stage train: LoRA / QLoRA fine-tuning of the base model on the distilled records.

Input: `data/distilled/{train,validation}.jsonl` (prompt + completion, trl's conversational
prompt-completion format). Output per candidate: `models/candidates/<name>/adapter/` (PEFT,
safetensors) and `models/candidates/<name>/train_metrics.json`, plus the loss curve in
`plots/train/<name>.csv` for `dvc plots`.

Built on trl's `SFTTrainer` (chat template, completion-only loss, EOS appended by the template's
end-of-turn token). Two things are done by hand, because they decide the speed on a CPU:

- The loss head. trl's fused LM head scores every position on devices without Triton (CPU),
  casting vocabulary chunks to fp32. Only the completion (~20 of ~170 tokens) is scored, so
  `_completion_loss_forward` projects just those positions through the LM head.
- `layers`: LoRA on the top N transformer blocks only. Nothing below the lowest adapted block
  needs a gradient, so autograd stops there and the backward pass shrinks with it.

Launch: in-process for single-process Accelerate configs, else through `accelerate launch`
(`configs/accelerate/<name>.yaml`, chosen by `train.accelerate`); see `launch`.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from .config import ConfigError, Section, read_yaml
from .io import atomic_dir, atomic_open, read_jsonl, sha256_file, stable_hash, write_json

log = logging.getLogger(__name__)

ACCELERATE_DIR = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
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
    target_modules: list[str] = Field(
        default_factory=lambda: list(TARGETS_ALL), description="Linear layers that get LoRA."
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


# ---------------------------------------------------------------------------------------------
# Data


class DataError(ValueError):
    """A distilled record is unusable (names file, line and field)."""


def load_records(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Read prompt/completion records, checking the fields the trainer needs."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (run the distil stage first)")
    records = read_jsonl(path)
    for lineno, rec in enumerate(records, 1):
        for key in ("prompt", "completion"):
            msgs = rec.get(key)
            if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role")
                for m in msgs
            ):
                raise DataError(f"{path}:{lineno}: field '{key}' must be a non-empty list of "
                                "{role, content} messages")
        if rec["completion"][-1]["role"] != "assistant":
            raise DataError(f"{path}:{lineno}: field 'completion' must end with an assistant turn")
    if not records:
        raise DataError(f"{path}: no records")
    return records[:limit] if limit else records


def fit_prompt(tokenizer, rec: dict[str, Any], max_length: int) -> tuple[dict[str, Any], bool]:
    """Cut the last user message so prompt + completion fit `max_length` tokens.

    trl truncates the whole sequence from the right, which would cut the answer (the only part
    with a loss). For classification the clause's start carries the signal, so its tail goes.
    """
    full = tokenizer.apply_chat_template(rec["prompt"] + rec["completion"], tokenize=True)
    full = full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full
    excess = len(full) - max_length
    if excess <= 0:
        return rec, False
    prompt = [dict(m) for m in rec["prompt"]]
    user = prompt[-1]
    ids = tokenizer(user["content"], add_special_tokens=False)["input_ids"]
    keep = len(ids) - excess - 2  # 2 tokens of slack: re-tokenising the cut text can shift
    if keep < 8:
        raise DataError(f"record {rec.get('id')}: max_length {max_length} leaves no room for the "
                        "clause; raise train.max_length")
    user["content"] = tokenizer.decode(ids[:keep])
    return {**rec, "prompt": prompt}, True


def to_dataset(tokenizer, records: list[dict[str, Any]], max_length: int):
    """A `datasets.Dataset` of conversational prompt/completion pairs; returns (ds, n_cut)."""
    from datasets import Dataset

    rows, cut = [], 0
    for rec in records:
        rec, was_cut = fit_prompt(tokenizer, rec, max_length)
        cut += was_cut
        rows.append({"prompt": rec["prompt"], "completion": rec["completion"]})
    return Dataset.from_list(rows), cut


def data_hash(data_dir: Path) -> str:
    return stable_hash({n: sha256_file(data_dir / f"{n}.jsonl") for n in ("train", "validation")})


# ---------------------------------------------------------------------------------------------
# Model


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
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute,
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
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
        target_modules=list(cfg.target_modules), layers_to_transform=layers,
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


# ---------------------------------------------------------------------------------------------
# Trainer


def make_trainer_class():
    """SFTTrainer with the completion-only loss head and a token counter (lazy import)."""
    from trl import SFTTrainer

    class TemperTrainer(SFTTrainer):
        tokens_seen = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.tokens_seen += int(inputs["attention_mask"].sum())
            inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask",
                                                                 "labels", "position_ids")}
            out = model(**inputs, completion_loss=True, num_items_in_batch=num_items_in_batch)
            loss = out.loss
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages; trl does the same
            return (loss, out) if return_outputs else loss

    return TemperTrainer


def make_callback(client, run_id: str | None):
    """Send loss, learning rate and grad norm of every logged step to the MLflow child run."""
    from mlflow.entities import Metric
    from transformers import TrainerCallback

    class Track(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            row = {"step": state.global_step, "loss": float(logs["loss"]),
                   "learning_rate": float(logs.get("learning_rate", 0.0))}
            if "grad_norm" in logs:
                row["grad_norm"] = float(logs["grad_norm"])
            if client is not None:
                now = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[
                    Metric(k, v, now, row["step"]) for k, v in row.items() if k != "step"
                ])

    return Track()


def sft_args(cfg: TrainConfig, out: Path, precision: str, gc: bool):
    from trl import SFTConfig

    if cfg.packing and device_type() != "cuda":
        raise ConfigError("train.packing needs flash-attention (CUDA) so that attention stays "
                          "inside each packed example; set train.packing: false on CPU")
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
        disable_tqdm=not sys.stderr.isatty(),
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        use_cpu=device_type() == "cpu",
        dataset_num_proc=None,
        eval_strategy="no",
    )


# ---------------------------------------------------------------------------------------------
# Evaluation helpers (also used by tests and scripts)


def mean_loss(model, tokenizer, records: list[dict[str, Any]], max_length: int,
              batch_size: int = 16, precision: str = "fp32") -> float:
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
            batch = collate(feats[i:i + batch_size])
            batch = {k: v.to(model.device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"], completion_loss=True, num_items_in_batch=1)
            total += float(out.loss)
            count += n
    model.train(was_training)
    return total / max(count, 1)


def tokenize_pair(tokenizer, rec: dict[str, Any]) -> dict[str, list[int]]:
    """input_ids and completion-only labels of one record, as trl builds them."""
    prompt = tokenizer.apply_chat_template(rec["prompt"], add_generation_prompt=True,
                                           tokenize=True)
    full = tokenizer.apply_chat_template(rec["prompt"] + rec["completion"], tokenize=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    full = full["input_ids"] if hasattr(full, "keys") else full
    labels = [-100] * len(prompt) + list(full[len(prompt):])
    return {"input_ids": list(full), "labels": labels}


def generate(model, tokenizer, prompts: list[list[dict[str, str]]], max_new_tokens: int,
             batch_size: int = 16, precision: str = "fp32") -> list[str]:
    """Greedy answers for chat prompts, batched with left padding."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
             for p in prompts]
    outputs: list[str] = []
    was_training = model.training
    model.eval()
    dtype = torch.bfloat16 if precision == "bf16" else None
    try:
        with torch.no_grad(), torch.autocast(device_type(), dtype=dtype, enabled=dtype is not None):
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(model.device)
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
                outputs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:],
                                                  skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


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


# ---------------------------------------------------------------------------------------------
# Entry points


def run(cfg: TrainConfig, name: str, base_dir: str | Path, mlflow_cfg=None,
        params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train candidate `name` (in this process; under `accelerate launch` on every rank).

    Writes `<out_dir>/<name>/{adapter/,train_metrics.json}` and `<plots_dir>/<name>.csv` on the
    main process; returns the metrics. Resumes from the last checkpoint of the same config.
    """
    import torch
    from accelerate import PartialState
    from transformers import set_seed

    from .base_model import model_hash

    cfg = cfg.candidate(name)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # `cpu=True` on a CPU machine: without it PartialState sees no GPU, decides "not
    # distributed" and every rank believes it is the main process until the Trainer rebuilds
    # the state, so every rank would talk to MLflow (and race to create its experiment).
    state = PartialState(cpu=device_type() == "cpu")
    precision = resolve_precision(cfg)
    gc = resolve_checkpointing(cfg)
    data_dir = Path(cfg.data_dir)
    set_seed(cfg.seed)

    tokenizer, model = load_base(base_dir, cfg.method, precision, gc)
    train_recs = load_records(data_dir / "train.jsonl", cfg.max_train_examples)
    val_recs = load_records(data_dir / "validation.jsonl", cfg.max_eval_examples)
    train_ds, n_cut = to_dataset(tokenizer, train_recs, cfg.max_length)
    model = add_lora(model, cfg)
    add_completion_loss(model.get_base_model())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    resolved = cfg.model_dump(exclude={"candidates"})
    paths = ("data_dir", "out_dir", "plots_dir", "checkpoint_dir")
    ckpt_key = stable_hash({"cfg": {k: v for k, v in resolved.items() if k not in paths},
                            "data": data_hash(data_dir),
                            "base": model_hash(base_dir), "world": state.num_processes})
    ckpt_dir = Path(cfg.checkpoint_dir) / name / ckpt_key
    resume = state.is_main_process and any(ckpt_dir.glob("checkpoint-*"))
    resume = bool(broadcast_object(resume))

    client = run_id = None
    if mlflow_cfg is not None and state.is_main_process:
        client, run_id = start_mlflow(mlflow_cfg, params or {}, name, resolved, base_dir, data_dir)

    trainer = make_trainer_class()(
        model=model,
        args=sft_args(cfg, ckpt_dir, precision, gc),
        train_dataset=train_ds,
        processing_class=tokenizer,
        callbacks=[make_callback(client, run_id)],
    )
    log.info("candidate %s: %d train records (%d clauses cut to %d tokens), %d trainable "
             "params, precision %s, checkpointing %s, %d process(es)%s", name, len(train_ds),
             n_cut, cfg.max_length, trainable, precision, gc, state.num_processes,
             ", resuming" if resume else "")
    start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=True if resume else None)
    except BaseException:
        if client is not None:
            client.set_terminated(run_id, "FAILED")
        raise
    wall = time.perf_counter() - start
    # The trainer's log history survives a resume (it is in the checkpoint): the full curve.
    history = [{"step": e["step"], "loss": float(e["loss"]),
                "learning_rate": float(e.get("learning_rate", 0.0))}
               for e in trainer.state.log_history if "loss" in e]
    tokens = broadcast_sum(trainer.tokens_seen)
    model = trainer.model
    lora = lora_state(model)
    hashes = gather_objects(weights_hash(lora))

    metrics: dict[str, Any] = {}
    if state.is_main_process:
        val_loss = mean_loss(model, tokenizer, val_recs, cfg.max_length, cfg.eval_batch_size,
                             precision)
        base_val_loss = cached_base_loss(cfg, base_dir, precision, model, tokenizer, val_recs)
        metrics = {
            "candidate": name,
            "steps": result.global_step,
            "train_loss": history[-1]["loss"] if history else None,
            "train_loss_mean": result.training_loss,
            "val_loss": val_loss,
            "base_val_loss": base_val_loss,
            "train_seconds": wall,
            "train_tokens": tokens,
            "tokens_per_s": tokens / wall if wall > 0 else None,
            "peak_rss_mb": peak_rss_mb(),
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20
            if torch.cuda.is_available() else None,
            "train_records": len(train_ds),
            "clauses_cut": n_cut,
            "val_records": len(val_recs),
            "trainable_params": trainable,
            "precision": precision,
            "gradient_checkpointing": gc,
            "num_processes": state.num_processes,
            "rank_weight_hashes": hashes,
            "resumed": resume,
            "mlflow_run_id": run_id,
            "base_model_hash": model_hash(base_dir),
            "data_hash": data_hash(data_dir),
            "config": resolved,
        }
        write_outputs(cfg, name, model, tokenizer, metrics, history)
        if client is not None:
            finish_mlflow(client, run_id, metrics, Path(cfg.out_dir) / name / "adapter")
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # done: the next run starts fresh
    state.wait_for_everyone()
    return metrics


def cached_base_loss(cfg: TrainConfig, base_dir, precision: str, model, tokenizer,
                     val_recs: list[dict[str, Any]]) -> float:
    """The base model's validation loss (adapter off), cached: every candidate shares it."""
    from .base_model import model_hash

    key = stable_hash({"base": model_hash(base_dir), "data": data_hash(Path(cfg.data_dir)),
                       "n": len(val_recs), "max_length": cfg.max_length, "precision": precision,
                       "method": cfg.method})
    path = Path(cfg.checkpoint_dir) / f"base_val_loss-{key}.json"
    if path.exists():
        return float(json.loads(path.read_text())["loss"])
    with model.disable_adapter():
        loss = mean_loss(model, tokenizer, val_recs, cfg.max_length, cfg.eval_batch_size,
                         precision)
    write_json(path, {"loss": loss})
    return loss


def write_outputs(cfg: TrainConfig, name: str, model, tokenizer, metrics: dict[str, Any],
                  history: list[dict[str, float]]) -> None:
    with atomic_dir(Path(cfg.out_dir) / name) as tmp:
        model.save_pretrained(tmp / "adapter", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "adapter")
        write_json(tmp / "train_metrics.json", metrics)
    Path(cfg.plots_dir).mkdir(parents=True, exist_ok=True)
    with atomic_open(Path(cfg.plots_dir) / f"{name}.csv") as handle:
        handle.write("step,loss,learning_rate\n")
        for row in history:
            handle.write(f"{row['step']},{row['loss']:.6f},{row['learning_rate']:.8g}\n")


def start_mlflow(mlflow_cfg, params: dict[str, Any], name: str, resolved: dict[str, Any],
                 base_dir: str | Path, data_dir: Path):
    import mlflow

    from . import tracking
    from .base_model import model_hash

    parent = tracking.pipeline_run(mlflow_cfg, params)
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent).info.experiment_id
    run = client.create_run(experiment_id, run_name=f"train-{name}", tags=tracking.child_run_tags(
        parent, **{"temper.stage": "train", "temper.candidate": name,
                   "temper.git_commit": tracking.git_commit(),
                   "temper.base_model": str(base_dir),
                   "temper.base_model_hash": model_hash(base_dir),
                   "temper.data_hash": data_hash(data_dir)}))
    from mlflow.entities import Param

    flat = {f"train.{k}": json.dumps(v) if isinstance(v, list | dict) else str(v)
            for k, v in resolved.items()}
    flat["base_model_hash"] = model_hash(base_dir)
    client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in flat.items()])
    return client, run.info.run_id


def finish_mlflow(client, run_id: str, metrics: dict[str, Any], adapter: Path) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    keys = ("val_loss", "base_val_loss", "train_seconds", "tokens_per_s", "peak_rss_mb",
            "train_tokens", "steps", "train_loss_mean", "peak_cuda_mb")
    client.log_batch(run_id, metrics=[Metric(k, float(metrics[k]), now, 0) for k in keys
                                      if isinstance(metrics.get(k), int | float)])
    client.log_artifacts(run_id, str(adapter), "adapter")
    client.set_terminated(run_id, "FINISHED")


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


# ---------------------------------------------------------------------------------------------
# Launching


def accelerate_config(name: str) -> Path:
    path = Path(name) if name.endswith((".yaml", ".yml")) else ACCELERATE_DIR / f"{name}.yaml"
    if not path.exists():
        have = sorted(p.stem for p in ACCELERATE_DIR.glob("*.yaml"))
        raise ConfigError(f"train.accelerate={name!r}: no {path} (shipped: {have})")
    return path


def needs_launcher(config_path: Path) -> bool:
    """Single-process configs run in this process; anything distributed goes through
    `accelerate launch` (one process per device, DDP/FSDP wiring)."""
    acc = read_yaml(config_path)
    return int(acc.get("num_processes", 1)) > 1 or acc.get("distributed_type", "NO") not in (
        "NO", "no")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(config_path: Path, argv: list[str]) -> None:
    """Run `python -m pipelines.train <argv>` under `accelerate launch --config_file ...`.

    On a machine without CUDA, multi-process configs run as CPU DDP over gloo:
    `ACCELERATE_USE_CPU=1` with the multi-GPU launcher is the combination that starts
    synchronised processes (`--cpu --num_processes 2` starts only one).
    """
    import torch

    env = dict(os.environ)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path),
           "--main_process_port", str(free_port())]
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd += ["--num_cpu_threads_per_process", env["OMP_NUM_THREADS"]]
    cmd += ["-m", "pipelines.train", *argv]
    log.info("launching: %s", " ".join(cmd))
    subprocess.run(cmd, env=env, check=True)


def main(argv: list[str] | None = None) -> None:
    """Per-rank entry under `accelerate launch`: --params, --candidate, --set."""
    import argparse

    from .base_model import ModelConfig
    from .config import load_params, section
    from .tracking import MlflowConfig

    parser = argparse.ArgumentParser(prog="python -m pipelines.train")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--candidate", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("TEMPER_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*gemv_4bit.*")
    params = load_params(args.params, args.overrides)
    cfg = section(params, "train", TrainConfig)
    run(cfg, args.candidate, section(params, "model", ModelConfig).dir,
        section(params, "mlflow", MlflowConfig), params)


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------------------------------------
# Merge


def merge(candidate: str | Path, out: str | Path, base_dir: str | Path,
          dtype_name: Literal["bfloat16", "float16", "float32"] = "bfloat16") -> dict[str, Any]:
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
    method = "lora"
    if metrics_file.exists():
        method = json.loads(metrics_file.read_text())["config"].get("method", "lora")
    dtype = getattr(torch, dtype_name)
    if method == "qlora":
        warnings.warn(
            "merging a QLoRA adapter into dequantized NF4 weights: the merged 16-bit model "
            "carries the 4-bit rounding of the base; expect a small quality loss versus the "
            "4-bit base + adapter (compare with `temper evaluate` before shipping)",
            UserWarning, stacklevel=2,
        )
        _, model = load_base(base_dir, "qlora", "bf16")
        model = model.dequantize().to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(adapter if (adapter / "tokenizer.json").exists()
                                              else base_dir)
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {"adapter": str(adapter), "base": str(base_dir), "method": method,
                "dtype": dtype_name, "dequantized": method == "qlora"}
        write_json(tmp / "temper_merge.json", info)
    return info
