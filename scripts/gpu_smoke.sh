#!/usr/bin/env bash
# A few QLoRA steps on CUDA with bf16, printing a short table. Run on a GPU machine:
#   bash scripts/gpu_smoke.sh [steps]
# Uses the real base model (models/base) and a handful of prepared clauses; writes nothing in
# the project (a temporary folder). Record what it prints in docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-10}"
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true TEMPER_LOG_LEVEL=WARNING
python - "$STEPS" <<'PY'
import json, sys, tempfile, time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    sys.exit("gpu_smoke: no CUDA device visible (torch.cuda.is_available() is False)")

from temper.io import read_jsonl, write_jsonl
from temper.stages import train
from temper.task import load_task
from temper.training.config import TrainConfig

steps = int(sys.argv[1])
task = load_task("configs/tasks/clause_review.yaml")
work = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
for split in ("train", "validation"):
    recs = read_jsonl(Path("data/prepared") / f"{split}.jsonl")[:128 if split == "train" else 32]
    for r in recs:
        r["completion"] = [{"role": "assistant", "content": task.format_answer(r["gold"])}]
    write_jsonl(work / "data" / f"{split}.jsonl", recs)

rows = []
for method, precision in (("qlora", "bf16"), ("lora", "bf16")):
    cfg = TrainConfig(data_dir=str(work / "data"), out_dir=str(work / "cand"),
                      plots_dir=str(work / "plots"), checkpoint_dir=str(work / "ckpt"),
                      accelerate="single_gpu", method=method, precision=precision,
                      max_steps=steps, batch_size=8, layers=None, save_steps=10_000,
                      candidates={method: {}})
    torch.cuda.reset_peak_memory_stats()
    m = train.run(cfg, [method], "models/base")[method]  # a results.TrainResult
    rows.append((method, precision, m.steps, m.train_seconds, m.tokens_per_s or 0.0,
                 m.peak_cuda_mb or 0.0, m.val_loss, m.base_val_loss))

print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
print("| method | precision | steps | seconds | tokens/s | peak CUDA MiB | val loss | base val loss |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.0f} | {r[5]:.0f} | {r[6]:.4f} | {r[7]:.4f} |")
PY
