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
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, Params, flatten
from ..errors import TemperError
from ..io import atomic_dir, atomic_open, model_hash, stable_hash, write_json
from ..results import TrainResult
from ..tracking import Tracking, log_adapter_model, log_dataset
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
    cfg: TrainConfig, base_dir: str | Path, tracking: Tracking | None = None
) -> dict[str, TrainResult]:
    """The stage: train every candidate of `train.candidates` (narrow them first with
    `cfg.only(names)`), logging each to a child run of `tracking`'s pipeline run.

    Single-process Accelerate configs train here; multi-process ones re-launch `temper train
    --launched` under `accelerate launch` with the same params file and `-S` overrides (read
    from `tracking.params`), and read the result it wrote.
    """
    acc = accelerate_config(cfg.accelerate)
    results = {}
    for name in cfg.candidates:
        if needs_launcher(acc):
            if tracking is None or not isinstance(tracking.params, Params):
                raise ConfigError(
                    f"train.accelerate={cfg.accelerate} re-launches `temper train`: it needs "
                    "the params file (run it through the CLI)"
                )
            try:
                launch(acc, launch_argv(tracking.params, name))
            except subprocess.CalledProcessError as err:
                code = err.returncode
                raise TrainError(f"accelerate launch failed with exit code {code}") from None
            results[name] = TrainResult.load(Path(cfg.out_dir) / name / "train_metrics.json")
        else:
            results[name] = train_candidate(cfg.candidate(name), base_dir, tracking)
    return results


class TrainError(TemperError, RuntimeError):
    """Training could not run to the end (the message says where it stopped)."""


def launch_argv(params: Params, name: str) -> list[str]:
    """`temper train --launched` for one candidate, on the params this run resolved."""
    argv = ["train", "--launched", "--params", params.source, "--candidate", name]
    return argv + [arg for item in params.overrides for arg in ("--set", item)]


@dataclass
class Inputs:
    """What one candidate trains on: the base model (LoRA added), its tokenizer, the data."""

    tokenizer: Any
    model: Any
    train_ds: Any
    clauses_cut: int
    val_recs: list[dict[str, Any]]
    precision: str
    checkpointing: bool
    trainable: int
    base_hash: str
    data_id: str


def train_candidate(
    cfg: TrainConfig, base_dir: str | Path, tracking: Tracking | None = None
) -> TrainResult:
    """Train the one candidate of `cfg` (`cfg.candidate(name)`) in this process (under
    `accelerate launch`: on every rank).

    Writes `<out_dir>/<name>/{adapter/,train_metrics.json}` and `<plots_dir>/<name>.csv` on the
    main process and returns the result (on other ranks too). Resumes from the last
    checkpoint of the same config.
    """
    from accelerate import PartialState
    from transformers import set_seed

    (name,) = cfg.candidates
    cfg = cfg.candidate(name)
    # `cpu=True` on a CPU machine: without it PartialState sees no GPU, decides "not
    # distributed" and every rank believes it is the main process until the Trainer rebuilds
    # the state, so every rank would talk to MLflow (and race to create its experiment).
    state = PartialState(cpu=device_type() == "cpu")
    set_seed(cfg.seed)
    inputs = load_inputs(cfg, base_dir)
    resolved = cfg.model_dump(exclude={"candidates"})
    ckpt_dir, resume = checkpoint(cfg, name, resolved, inputs, state)
    # Only the main process talks to MLflow (a shared store: every rank would race).
    run_ctx: Any = contextlib.nullcontext()
    if tracking is not None and state.is_main_process:
        run_ctx = tracking.child(
            "train",
            f"train-{name}",
            **{
                "temper.candidate": name,
                "temper.base_model": str(base_dir),
                "temper.base_model_hash": inputs.base_hash,
                "temper.data_hash": inputs.data_id,
            },
        )
    with run_ctx as mlrun:
        if mlrun is not None:
            mlrun.log_params({**flatten({"train": resolved}), "base_model_hash": inputs.base_hash})
            for split in ("train", "validation"):
                log_dataset(mlrun, Path(cfg.data_dir) / f"{split}.jsonl", split, "training")
        trainer = make_trainer_class()(
            model=inputs.model,
            args=sft_args(cfg, ckpt_dir, inputs.precision, inputs.checkpointing),
            train_dataset=inputs.train_ds,
            processing_class=inputs.tokenizer,
            callbacks=[make_callback(mlrun)],
        )
        use_progress_bar(trainer, f"train {name}")
        log_start(cfg, name, inputs, state.num_processes, resume)
        start = time.perf_counter()
        out = trainer.train(resume_from_checkpoint=True if resume else None)
        wall = time.perf_counter() - start
        result = finish(cfg, name, base_dir, inputs, trainer, out, wall, state, resume, mlrun)
        if state.is_main_process:
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # done: the next run starts fresh
    state.wait_for_everyone()
    return broadcast_object(result)


def load_inputs(cfg: TrainConfig, base_dir: str | Path) -> Inputs:
    """The base model with LoRA (and the completion-only loss), the tokenizer and the data."""
    import torch

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    precision = resolve_precision(cfg)
    gc = resolve_checkpointing(cfg)
    data_dir = Path(cfg.data_dir)
    tokenizer, model = load_base(base_dir, cfg.method, precision, gc)
    train_recs = load_records(data_dir / "train.jsonl", cfg.max_train_examples)
    val_recs = load_records(data_dir / "validation.jsonl", cfg.max_eval_examples)
    train_ds, n_cut = to_dataset(tokenizer, train_recs, cfg.max_length)
    model = add_lora(model, cfg)
    add_completion_loss(model.get_base_model())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Inputs(
        tokenizer,
        model,
        train_ds,
        n_cut,
        val_recs,
        precision,
        gc,
        trainable,
        model_hash(base_dir),
        data_hash(data_dir),
    )


def checkpoint(
    cfg: TrainConfig, name: str, resolved: dict[str, Any], inputs: Inputs, state: Any
) -> tuple[Path, bool]:
    """The checkpoint folder of this exact config, data, base and world size, and whether
    to resume from it (decided on the main process, shared with every rank)."""
    paths = ("data_dir", "out_dir", "plots_dir", "checkpoint_dir")
    key = stable_hash(
        {
            "cfg": {k: v for k, v in resolved.items() if k not in paths},
            "data": inputs.data_id,
            "base": inputs.base_hash,
            "world": state.num_processes,
        }
    )
    ckpt_dir = Path(cfg.checkpoint_dir) / name / key
    resume = state.is_main_process and any(ckpt_dir.glob("checkpoint-*"))
    return ckpt_dir, bool(broadcast_object(resume))


def log_start(cfg: TrainConfig, name: str, inputs: Inputs, processes: int, resume: bool) -> None:
    log.info(
        "candidate %s: %d train records (%d clauses cut to %d tokens), %d trainable "
        "params, precision %s, checkpointing %s, %d process(es)%s",
        name,
        len(inputs.train_ds),
        inputs.clauses_cut,
        cfg.max_length,
        inputs.trainable,
        inputs.precision,
        inputs.checkpointing,
        processes,
        ", resuming" if resume else "",
    )


def finish(
    cfg: TrainConfig,
    name: str,
    base_dir: str | Path,
    inputs: Inputs,
    trainer: Any,
    out: Any,
    wall: float,
    state: Any,
    resume: bool,
    mlrun: Any,
) -> TrainResult | None:
    """Gather what every rank saw; on the main process score the validation loss, write the
    adapter, the metrics and the loss curve, and log them (None on the other ranks)."""
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
    model = trainer.model
    hashes = gather_objects(weights_hash(lora_state(model)))
    if not state.is_main_process:
        return None
    tokens = sum(rank_tokens)
    ranks = {
        "num_processes": state.num_processes,
        "rank_weight_hashes": hashes,
        "rank_tokens": rank_tokens,
        "train_tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "resumed": resume,
        "mlflow_run_id": mlrun.run_id if mlrun is not None else None,
    }
    result = result_of(cfg, name, base_dir, inputs, model, out, wall, history, ranks)
    write_outputs(cfg, name, model, inputs.tokenizer, result, history)
    if mlrun is not None:
        result.mlflow_model_id = log_result(mlrun, cfg, name, result)
        result.save(Path(cfg.out_dir) / name / "train_metrics.json")
    return result


def result_of(
    cfg: TrainConfig,
    name: str,
    base_dir: str | Path,
    inputs: Inputs,
    model: Any,
    out: Any,
    wall: float,
    history: list[dict[str, float]],
    ranks: dict[str, Any],
) -> TrainResult:
    """The candidate's `TrainResult`; `ranks`: what `finish` gathered from every rank."""
    import torch

    precision = inputs.precision
    val_loss = mean_loss(
        model, inputs.tokenizer, inputs.val_recs, cfg.max_length, cfg.eval_batch_size, precision
    )
    base_loss = cached_base_loss(cfg, base_dir, precision, model, inputs.tokenizer, inputs.val_recs)
    return TrainResult(
        candidate=name,
        steps=out.global_step,
        train_loss=history[-1]["loss"] if history else None,
        train_loss_mean=out.training_loss,
        val_loss=val_loss,
        base_val_loss=base_loss,
        train_seconds=wall,
        peak_rss_mb=peak_rss_mb(),
        peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else None,
        train_records=len(inputs.train_ds),
        clauses_cut=inputs.clauses_cut,
        val_records=len(inputs.val_recs),
        trainable_params=inputs.trainable,
        precision=precision,
        gradient_checkpointing=inputs.checkpointing,
        base_model_hash=inputs.base_hash,
        data_hash=inputs.data_id,
        config=cfg.model_dump(exclude={"candidates"}),
        **ranks,
    )


def log_result(mlrun: Any, cfg: TrainConfig, name: str, result: TrainResult) -> str:
    """The adapter as an MLflow logged model with the run's metrics on it; its id."""
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
        flatten({"train": key_params(result.config)}),
    )
    mlrun.log_metrics(
        {k: getattr(result, k) for k in keys if getattr(result, k) is not None},
        model_id=model_id,
    )
    return model_id


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
