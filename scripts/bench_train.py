"""Benchmark: tokens/s of `temper train`'s settings vs trl SFTTrainer defaults, same everything else.

    python scripts/bench_train.py [--steps 10] [--batch-size 8] [--params params.yaml]

Both arms train the real base model on the same records for the same number of optimizer steps
with the same batch size and LoRA rank, each in its own process (so peak RSS is per arm):

- `trl`: `SFTTrainer(peft_config=LoraConfig(r, all 7 projections))` with `SFTConfig` defaults
  (gradient checkpointing on, bf16 where supported, max_length 1024, random order, trl's LM
  head over every position).
- `temper`: `pipelines.train.run` with the `train:` section of params.yaml (first candidate).
- `temper_all_layers`: the same but LoRA on every block (`layers: null`), to separate the
  engineering gains from the choice of adapting only the top blocks.

Data: `data/distilled` if present, else built from `data/prepared` with gold answers (what
distil's offline provider writes). The machine is shared: timings are noisy (+-30%); the
ratio is measured in one run, arms back to back. Last line: `RESULT train_tokens_per_s_ratio X`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_data(out: Path) -> Path:
    from temper.io import read_jsonl, write_jsonl
    from temper.task import load_task

    distilled = ROOT / "data" / "distilled"
    if (distilled / "train.jsonl").exists() and (distilled / "validation.jsonl").exists():
        return distilled
    task = load_task(ROOT / "configs" / "tasks" / "clause_review.yaml")
    for split in ("train", "validation"):
        recs = read_jsonl(ROOT / "data" / "prepared" / f"{split}.jsonl")
        for rec in recs:
            rec["completion"] = [{"role": "assistant", "content": task.format_answer(rec["gold"])}]
        write_jsonl(out / f"{split}.jsonl", recs)
    return out


def arm_trl(args, cfg, data: Path, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from pipelines import train as T

    tokenizer, model = T.load_base(args.base_dir, "lora", "fp32")
    recs = T.load_records(data / "train.jsonl")
    ds = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in recs])
    counted = {"tokens": 0}
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)

    def counting(batch):
        out = collate(batch)
        counted["tokens"] += int(out["attention_mask"].sum())
        return out

    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(output_dir=str(work / "trl"), max_steps=args.steps,
                       per_device_train_batch_size=args.batch_size, report_to="none",
                       save_strategy="no", use_cpu=not torch.cuda.is_available(), seed=cfg.seed,
                       disable_tqdm=True),
        train_dataset=ds,
        processing_class=tokenizer,
        data_collator=counting,
        peft_config=LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=T.TARGETS_ALL,
                               task_type="CAUSAL_LM"),
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"tokens": counted["tokens"], "seconds": seconds,
            "gradient_checkpointing": trainer.args.gradient_checkpointing,
            "bf16": trainer.args.bf16, "peak_rss_mb": T.peak_rss_mb()}


def arm_temper(args, cfg, data: Path, work: Path, all_layers: bool) -> dict:
    from pipelines import train as T

    update = {"data_dir": str(data), "out_dir": str(work / "cand"), "plots_dir": str(work / "p"),
              "checkpoint_dir": str(work / "ckpt"), "max_steps": args.steps,
              "batch_size": args.batch_size, "save_steps": 10_000, "max_eval_examples": 8}
    if all_layers:
        update["layers"] = None
    cfg = cfg.model_copy(update=update)
    m = T.run(cfg, next(iter(cfg.candidates)), args.base_dir)
    return {"tokens": m["train_tokens"], "seconds": m["train_seconds"],
            "gradient_checkpointing": m["gradient_checkpointing"], "bf16": m["precision"] == "bf16",
            "peak_rss_mb": m["peak_rss_mb"], "layers": cfg.layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--base-dir", default=str(ROOT / "models" / "base"))
    parser.add_argument("--arms", default="trl,temper,temper_all_layers")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm, print JSON
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from temper.config import load_params, section
    from pipelines.train import TrainConfig

    params = section(load_params(args.params), "train", TrainConfig)
    cfg = params.candidate(next(iter(params.candidates)))
    if args.arm:
        work = Path(args.work)
        data = build_data(work / "data")
        if args.arm == "trl":
            out = arm_trl(args, cfg, data, work)
        else:
            out = arm_temper(args, cfg, data, work, args.arm == "temper_all_layers")
        print("ARM " + json.dumps(out))
        return

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as work:
        for arm in args.arms.split(","):
            cmd = [sys.executable, __file__, "--arm", arm, "--work", work, "--steps",
                   str(args.steps), "--batch-size", str(args.batch_size), "--params", args.params,
                   "--base-dir", args.base_dir]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("ARM ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"arm {arm} failed:\n{proc.stderr[-4000:]}")
            results[arm] = json.loads(line[4:])
            r = results[arm]
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
            print(f"{arm:>18}: {r['tokens']:6d} tokens in {r['seconds']:6.1f}s = "
                  f"{r['tokens_per_s']:6.1f} tokens/s, peak RSS {r['peak_rss_mb']:.0f} MiB, "
                  f"checkpointing {r['gradient_checkpointing']}, bf16 {r['bf16']}", flush=True)
    print(f"steps {args.steps}, batch {args.batch_size}, rank {cfg.rank}, layers {cfg.layers}")
    base = results["trl"]["tokens_per_s"]
    if "temper_all_layers" in results:
        ratio = results["temper_all_layers"]["tokens_per_s"] / base
        print(f"temper (all layers) / trl defaults: {ratio:.2f}x")
    ratio = results["temper"]["tokens_per_s"] / base
    print(f"temper (shipped settings) / trl defaults: {ratio:.2f}x")
    print(f"RESULT train_tokens_per_s_ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
