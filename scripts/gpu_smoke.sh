#!/usr/bin/env bash
# One run on a CUDA machine measures what the GPU paths do, and prints markdown tables:
#   1. generation on cuda in bfloat16 vs float32 (the evaluation loop, tokens/s, same prompts);
#   2. a few LoRA and QLoRA training steps in bf16 (tokens/s, peak memory, losses);
#   3. the QLoRA candidate scored as served: 4-bit NF4 base + adapter unmerged (tokens/s,
#      valid JSON, clause-type accuracy on the clauses it was trained on: a smoke check).
#   bash scripts/gpu_smoke.sh [steps] [n_prompts]
# Needs the base model folder (BASE, default models/base) and prepared clauses (data/prepared,
# else a small prepare run from data/raw into a temporary folder). Writes nothing in the
# project (a temporary folder). Record what it prints in docs/gpu.md.
# GPU_SMOKE_IMPORT_ONLY=1 stops after the imports (how the tests check it on a CPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-10}"
N_PROMPTS="${2:-64}"
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true TEMPER_LOG_LEVEL=WARNING
python - "$STEPS" "$N_PROMPTS" <<'PY'
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from temper.config import load_params
from temper.params import TemperParams
from temper.evaluation.generation import generate, load_model
from temper.io import read_jsonl, write_jsonl
from temper.model_source import adapter_method
from temper.stages import train
from temper.stages.prepare import run as prepare
from temper.task import load_task, parse_answer
from temper.training.config import TrainConfig

if os.environ.get("GPU_SMOKE_IMPORT_ONLY"):
    print("imports ok")
    sys.exit(0)
if not torch.cuda.is_available():
    sys.exit("gpu_smoke: no CUDA device visible (torch.cuda.is_available() is False)")

steps, n_prompts = int(sys.argv[1]), int(sys.argv[2])
base = os.environ.get("BASE", "models/base")
task = load_task("configs/tasks/clause_review.yaml")
work = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
prepared = Path("data/prepared")
if not (prepared / "train.jsonl").exists():
    params = load_params("params.yaml")
    cfg = TemperParams.of(params).prepare.model_copy(
        update={
            "out_dir": str(work / "prepared"),
            "metrics": str(work / "prepare.json"),
            "max_examples": {"train": 256, "validation": 32, "test": 32},
        }
    )
    prepare(cfg, task, base)
    prepared = work / "prepared"
for split in ("train", "validation"):
    recs = read_jsonl(prepared / f"{split}.jsonl")[: 256 if split == "train" else 32]
    for r in recs:
        r["completion"] = [{"role": "assistant", "content": task.format_answer(r["gold"])}]
    write_jsonl(work / "data" / f"{split}.jsonl", recs)
clauses = read_jsonl(work / "data" / "train.jsonl")[:n_prompts]
prompts = [r["prompt"] for r in clauses]


def measure(model, tok, label, batch):
    """Greedy answers to the prompts: tokens/s, peak memory, valid JSON, accuracy."""
    generate(model, tok, prompts[:batch], 8, batch_size=batch, progress=False)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    gens = generate(model, tok, prompts, task.max_new_tokens, batch_size=batch, progress=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    answers = [parse_answer(g.text) for g in gens]
    right = sum(
        (a or {}).get("clause_type") == r["gold"]["clause_type"]
        for a, r in zip(answers, clauses, strict=True)
    )
    tokens = sum(g.new_tokens for g in gens)
    return (label, batch, len(gens), tokens / seconds, seconds,
            torch.cuda.max_memory_allocated() / 2**20,
            sum(a is not None for a in answers) / len(gens), right / len(gens))


gen_rows = []
for dtype in ("bfloat16", "float32"):
    for batch in (16, 64):
        model, tok = load_model(base, dtype=dtype, device="cuda")
        gen_rows.append(measure(model, tok, f"base model, {dtype}", batch))
        del model
        torch.cuda.empty_cache()

train_rows = []
for method in ("lora", "qlora"):
    cfg = TrainConfig(data_dir=str(work / "data"), out_dir=str(work / "cand"),
                      plots_dir=str(work / "plots"), checkpoint_dir=str(work / "ckpt"),
                      accelerate="single_gpu", method=method, precision="bf16",
                      max_steps=steps, batch_size=8, layers=None, save_steps=10_000,
                      candidates={method: {}})
    torch.cuda.reset_peak_memory_stats()
    m = train.run(cfg.only([method]), base)[method]  # a results.TrainResult
    train_rows.append((method, m.precision, m.steps, m.train_seconds, m.tokens_per_s or 0.0,
                       m.peak_cuda_mb or 0.0, m.trainable_params, m.val_loss, m.base_val_loss))
    torch.cuda.empty_cache()

adapter = work / "cand" / "qlora" / "adapter"
assert adapter_method(adapter) == "qlora", "the QLoRA candidate must say what it is"
served, stok = load_model(base, adapter, device="cuda")  # auto dtype: bf16 compute
n4 = sum(type(mod).__name__ == "Linear4bit" for mod in served.modules())
assert n4 > 0 and type(served).__name__.startswith("Peft"), "not scored as served"
gen_rows.append(measure(served, stok, f"qlora candidate, 4-bit + adapter ({n4} Linear4bit)", 64))

print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
print("\n| generation | batch | prompts | tokens/s | seconds | peak CUDA MiB | valid JSON | accuracy |")
print("|---|---|---|---|---|---|---|---|")
for r in gen_rows:
    print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.0f} | {r[4]:.1f} | {r[5]:.0f} | {r[6]:.2f} | {r[7]:.2f} |")
print("\n| method | precision | steps | seconds | tokens/s | peak CUDA MiB | trainable | val loss | base val loss |")
print("|---|---|---|---|---|---|---|---|---|")
for r in train_rows:
    print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.0f} | {r[5]:.0f} | {r[6]:,} | {r[7]:.4f} | {r[8]:.4f} |")
PY
