"""Stage train: LoRA / QLoRA fine-tuning of the base model on the distilled records.

Input: `data/distilled/{train,validation}.jsonl` (prompt + completion, trl's conversational
prompt-completion format). Output per candidate: `models/candidates/<name>/adapter/` (PEFT,
safetensors) and `models/candidates/<name>/train_metrics.json` (`results.TrainResult`), plus
the loss curve in `plots/train/<name>.csv` for `dvc plots`.

Built on trl's `SFTTrainer` (chat template, completion-only loss, EOS appended by the template's
end-of-turn token), with the speed levers of `temper.training.model`. Each candidate of
`train.candidates` is one DVC stage `train@<name>` and one MLflow child run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import flatten
from ..io import atomic_dir, atomic_open, model_hash, stable_hash, write_json
from ..results import TrainResult
from ..tracking import MlflowConfig, child_run, log_adapter_model, log_dataset
from ..training.config import TrainConfig
from ..training.data import data_hash, load_records, to_dataset
from ..training.launch import accelerate_config, launch, needs_launcher
from ..training.model import (
    add_completion_loss,
    add_lora,
    device_type,
    load_base,
    resolve_checkpointing,
    resolve_precision,
    write_quantization_marker,
)
from ..training.progress import use_progress_bar
from ..training.trainer import (
    broadcast_object,
    gather_objects,
    lora_state,
    make_callback,
    make_trainer_class,
    mean_loss,
    peak_rss_mb,
    sft_args,
    weights_hash,
)

log = logging.getLogger(__name__)


def key_params(resolved: dict[str, Any]) -> dict[str, Any]:
    """The fields that tell candidates apart: the logged model's params, the runs' columns."""
    keys = (
        "method",
        "rank",
        "alpha",
        "layers",
        "learning_rate",
        "epochs",
        "max_steps",
        "batch_size",
        "max_length",
    )
    return {k: resolved[k] for k in keys}


def run(
    cfg: TrainConfig,
    names: list[str] | None,
    base_dir: str | Path,
    mlflow_cfg: MlflowConfig | None = None,
    params: dict[str, Any] | None = None,
    launch_argv: Callable[[str], list[str]] | None = None,
) -> dict[str, TrainResult]:
    """The stage: train every candidate in `names` (default: all of `train.candidates`).

    Single-process Accelerate configs train here; multi-process ones re-launch `temper train
    --launched` under `accelerate launch` (`launch_argv(name)` gives its arguments) and read
    the result it wrote. Unknown names fail before anything trains.
    """
    names = list(names or cfg.candidates)
    for name in names:
        cfg.candidate(name)
    acc = accelerate_config(cfg.accelerate)
    results = {}
    for name in names:
        if needs_launcher(acc):
            if launch_argv is None:
                raise ValueError(f"train.accelerate={cfg.accelerate} needs a launcher command")
            launch(acc, launch_argv(name))
            results[name] = TrainResult.load(Path(cfg.out_dir) / name / "train_metrics.json")
        else:
            results[name] = train_candidate(cfg, name, base_dir, mlflow_cfg, params)
    return results


def train_candidate(
    cfg: TrainConfig,
    name: str,
    base_dir: str | Path,
    mlflow_cfg: MlflowConfig | None = None,
    params: dict[str, Any] | None = None,
) -> TrainResult:
    """Train candidate `name` in this process (under `accelerate launch`: on every rank).

    Writes `<out_dir>/<name>/{adapter/,train_metrics.json}` and `<plots_dir>/<name>.csv` on the
    main process and returns the result (on other ranks too). Resumes from the last
    checkpoint of the same config.
    """
    import torch
    from accelerate import PartialState
    from transformers import set_seed

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
    base_hash, data_id = model_hash(base_dir), data_hash(data_dir)
    ckpt_key = stable_hash(
        {
            "cfg": {k: v for k, v in resolved.items() if k not in paths},
            "data": data_id,
            "base": base_hash,
            "world": state.num_processes,
        }
    )
    ckpt_dir = Path(cfg.checkpoint_dir) / name / ckpt_key
    resume = state.is_main_process and any(ckpt_dir.glob("checkpoint-*"))
    resume = bool(broadcast_object(resume))

    # Only the main process talks to MLflow (a shared store: every rank would race).
    tracking = contextlib.nullcontext()
    if mlflow_cfg is not None and state.is_main_process:
        tracking = child_run(
            mlflow_cfg,
            params or {},
            "train",
            f"train-{name}",
            **{
                "temper.candidate": name,
                "temper.base_model": str(base_dir),
                "temper.base_model_hash": base_hash,
                "temper.data_hash": data_id,
            },
        )
    with tracking as mlrun:
        if mlrun is not None:
            mlrun.log_params({**flatten({"train": resolved}), "base_model_hash": base_hash})
            for split in ("train", "validation"):
                log_dataset(mlrun, data_dir / f"{split}.jsonl", split, "training")
        trainer = make_trainer_class()(
            model=model,
            args=sft_args(cfg, ckpt_dir, precision, gc),
            train_dataset=train_ds,
            processing_class=tokenizer,
            callbacks=[make_callback(mlrun)],
        )
        use_progress_bar(trainer, f"train {name}")
        log.info(
            "candidate %s: %d train records (%d clauses cut to %d tokens), %d trainable "
            "params, precision %s, checkpointing %s, %d process(es)%s",
            name,
            len(train_ds),
            n_cut,
            cfg.max_length,
            trainable,
            precision,
            gc,
            state.num_processes,
            ", resuming" if resume else "",
        )
        start = time.perf_counter()
        out = trainer.train(resume_from_checkpoint=True if resume else None)
        wall = time.perf_counter() - start
        # The trainer's log history survives a resume (it is in the checkpoint): the full curve.
        history = [
            {
                "step": e["step"],
                "loss": float(e["loss"]),
                "learning_rate": float(e.get("learning_rate", 0.0)),
            }
            for e in trainer.state.log_history
            if "loss" in e
        ]
        rank_tokens = [int(t) for t in gather_objects(trainer.tokens_seen)]
        tokens = sum(rank_tokens)
        model = trainer.model
        hashes = gather_objects(weights_hash(lora_state(model)))

        result = None
        if state.is_main_process:
            val_loss = mean_loss(
                model, tokenizer, val_recs, cfg.max_length, cfg.eval_batch_size, precision
            )
            result = TrainResult(
                candidate=name,
                steps=out.global_step,
                train_loss=history[-1]["loss"] if history else None,
                train_loss_mean=out.training_loss,
                val_loss=val_loss,
                base_val_loss=cached_base_loss(
                    cfg, base_dir, precision, model, tokenizer, val_recs
                ),
                train_seconds=wall,
                train_tokens=tokens,
                tokens_per_s=tokens / wall if wall > 0 else None,
                peak_rss_mb=peak_rss_mb(),
                peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20
                if torch.cuda.is_available()
                else None,
                train_records=len(train_ds),
                clauses_cut=n_cut,
                val_records=len(val_recs),
                trainable_params=trainable,
                precision=precision,
                gradient_checkpointing=gc,
                num_processes=state.num_processes,
                rank_weight_hashes=hashes,
                rank_tokens=rank_tokens,
                resumed=resume,
                mlflow_run_id=mlrun.run_id if mlrun is not None else None,
                base_model_hash=base_hash,
                data_hash=data_id,
                config=resolved,
            )
            write_outputs(cfg, name, model, tokenizer, result, history)
            if mlrun is not None:
                keys = (
                    "val_loss",
                    "base_val_loss",
                    "train_seconds",
                    "tokens_per_s",
                    "peak_rss_mb",
                    "train_tokens",
                    "steps",
                    "train_loss_mean",
                    "peak_cuda_mb",
                )
                model_id = log_adapter_model(
                    mlrun,
                    Path(cfg.out_dir) / name / "adapter",
                    name,
                    flatten({"train": key_params(resolved)}),
                )
                mlrun.log_metrics(
                    {k: getattr(result, k) for k in keys if getattr(result, k) is not None},
                    model_id=model_id,
                )
                result.mlflow_model_id = model_id
                result.save(Path(cfg.out_dir) / name / "train_metrics.json")
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # done: the next run starts fresh
    state.wait_for_everyone()
    return broadcast_object(result)


def cached_base_loss(
    cfg: TrainConfig,
    base_dir: str | Path,
    precision: str,
    model: Any,
    tokenizer: Any,
    val_recs: list[dict[str, Any]],
) -> float:
    """The base model's validation loss (adapter off), cached: every candidate shares it."""
    key = stable_hash(
        {
            "base": model_hash(base_dir),
            "data": data_hash(Path(cfg.data_dir)),
            "n": len(val_recs),
            "max_length": cfg.max_length,
            "precision": precision,
            "method": cfg.method,
        }
    )
    path = Path(cfg.checkpoint_dir) / f"base_val_loss-{key}.json"
    if path.exists():
        return float(json.loads(path.read_text())["loss"])
    with model.disable_adapter():
        loss = mean_loss(model, tokenizer, val_recs, cfg.max_length, cfg.eval_batch_size, precision)
    write_json(path, {"loss": loss})
    return loss


def write_outputs(
    cfg: TrainConfig,
    name: str,
    model: Any,
    tokenizer: Any,
    result: TrainResult,
    history: list[dict[str, float]],
) -> None:
    with atomic_dir(Path(cfg.out_dir) / name) as tmp:
        model.save_pretrained(tmp / "adapter", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "adapter")
        # A QLoRA adapter says so in its own folder, so that wherever it goes (registry,
        # pull) it is scored and served on the 4-bit base it was trained on.
        write_quantization_marker(tmp / "adapter", cfg.method)
        result.save(tmp / "train_metrics.json")
    Path(cfg.plots_dir).mkdir(parents=True, exist_ok=True)
    with atomic_open(Path(cfg.plots_dir) / f"{name}.csv") as handle:
        handle.write("step,loss,learning_rate\n")
        for row in history:
            handle.write(f"{row['step']},{row['loss']:.6f},{row['learning_rate']:.8g}\n")
