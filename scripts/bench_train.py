"""Benchmark: training tokens/s of `temper train` against trl's SFTTrainer doing equal work.

    python scripts/bench_train.py [--steps 10] [--repeats 1] [--quality-steps 40]
                                  [--quality-examples 64] [--arms temper,trl_equal,...]
                                  [--params params.yaml] [--base-dir models/base]
    python scripts/bench_train.py --smoke     # does it run (CI), not a timing

About 12 minutes on 2 CPU cores with the defaults (each further round adds about 5).

`--smoke`: the arms temper and trl_equal only, 1 optimizer step each, no quality arms, on data
built here (`temper prepare` into a temp folder: one batch of training records and 2
validation ones, with gold completions; the base model is built into models/base if absent).
A failed arm exits non-zero.

Every speed arm trains the real base model for the same number of optimizer steps on the
same records (a fixed, seeded sample of exactly steps x batch training records, so each arm
sees each of them once), each arm in its own process (peak RSS is per arm), back to back:

- `temper`: the train stage (`temper.stages.train`) with the first candidate of `train:` in
  params.yaml (quick profile: LoRA r16 on the top 8 blocks, max_length 192, batch 4, bf16
  autocast where the CPU has it, no gradient checkpointing, length-grouped batches).
- `trl_equal`: `SFTTrainer(peft_config=LoraConfig(...))` with the SAME LoRA config and
  blocks, max_length, batch size, precision and gradient checkpointing (off) as `temper`;
  everything else at trl's defaults (random order, its fused LM head over every position,
  learning-rate schedule, ...). It gets the same prompt-cut records, so both arms train on
  exactly the same tokens. **The headline ratio is temper / trl_equal.**
- `trl_tuned`: `trl_equal` as a careful user would tune it: length-grouped batches
  (`train_sampling_strategy="group_by_length"`). Not padding-free: trl's `padding_free`
  flattens a batch into one sequence and relies on flash-attention's varlen kernels to keep
  attention inside each example; on a CPU (sdpa/eager attention) attention then crosses
  examples (measured: logits of the second example off by 0.13 on a tiny Llama), so it would
  train a different, wrong model. Batch size 1 would avoid padding but is not equal work.
- `trl_defaults`: trl at its full defaults, as a user gets it out of the box: LoRA on every
  block, max_length 1024, gradient checkpointing on, bf16, random order (same records, same
  LoRA rank/alpha/targets, same steps and batch).
- `temper_all_layers`, `trl_equal_all_layers`: the same pair with LoRA on every block
  (`layers: null`): the engineering gain without the one lever that changes the model.
- `temper_full_profile`: the train stage at the full profile's own settings
  (configs/profiles/full.yaml: every block, its batch size and max_length) on a sample of the
  full training split; with the tokens of one epoch over that split (prepared with the full
  profile into a temp folder) it gives the full profile's time estimate.

Then the quality cost of the speed lever that changes the model (adapting the top 8 blocks
instead of all 30): `temper` with `layers` as shipped and with `layers: null`, trained for
`--quality-steps` steps on the whole quick-profile training set (same seed, same schedule),
each scored on the validation split: completion loss (all of it) and greedy clause-type
accuracy on its first `--quality-examples` clauses (`temper.evaluation.generation`).
`--quality-steps 0` skips this part.

Data: `data/distilled` if present, else built from `data/prepared` with gold answers (what
distil's offline provider writes). The machine is shared: timings are noisy (+-30%); arms run
back to back in one invocation, in rounds with `--repeats N` (every arm once per round; the
table shows each arm's median tokens/s, and each ratio is the median of the per-round ratios,
so a change of load between rounds cancels out; use an odd N). Prints a table (tokens/s, s/step, peak RSS), the further ratios,
the full-profile estimate, the quality table, and last `RESULT train_tokens_per_s_ratio X`
(temper / trl_equal).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from temper.params import TemperParams

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "configs" / "tasks" / "clause_review.yaml"
FULL_PROFILE = ROOT / "configs" / "profiles" / "full.yaml"

SPEED_ARMS = [
    "temper",
    "trl_equal",
    "trl_tuned",
    "trl_defaults",
    "temper_all_layers",
    "trl_equal_all_layers",
    "temper_full_profile",
]
QUALITY_ARMS = ["quality_top_layers", "quality_all_layers"]


# --------------------------------------------------------------------------- data


def with_gold_completions(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prepared records as distil's offline `gold` provider writes them."""
    from temper.task import load_task

    task = load_task(TASK)
    for rec in recs:
        rec["completion"] = [{"role": "assistant", "content": task.format_answer(rec["gold"])}]
    return recs


def quick_data(work: Path) -> Path:
    """The quick profile's distilled train/validation records (`--smoke`: its own)."""
    from temper.io import read_jsonl, write_jsonl

    if (work / "smoke" / "validation.jsonl").exists():
        return work / "smoke"
    distilled = ROOT / "data" / "distilled"
    if (distilled / "train.jsonl").exists() and (distilled / "validation.jsonl").exists():
        return distilled
    out = work / "quick"
    if not (out / "validation.jsonl").exists():
        for split in ("train", "validation"):
            recs = read_jsonl(ROOT / "data" / "prepared" / f"{split}.jsonl")
            write_jsonl(out / f"{split}.jsonl", with_gold_completions(recs))
    return out


def sample(src: Path, out: Path, n: int, seed: int = 0, n_val: int = 8) -> Path:
    """A seeded sample of exactly `n` training records (+ a few validation ones) in `out`."""
    from temper.io import read_jsonl, write_jsonl

    recs = read_jsonl(src / "train.jsonl")
    if n > len(recs):
        sys.exit(f"bench_train: {n} records needed, {src / 'train.jsonl'} has {len(recs)}")
    random.Random(seed).shuffle(recs)
    write_jsonl(out / "train.jsonl", recs[:n])
    write_jsonl(out / "validation.jsonl", read_jsonl(src / "validation.jsonl")[:n_val])
    return out


def smoke_data(args, work: Path) -> None:
    """`--smoke`'s records: `temper prepare` (the real CLI) on the raw data into `work`, one
    batch of training records per step and 2 validation ones, with gold completions."""
    from temper.io import read_jsonl, write_jsonl

    out = work / "smoke-prepared"
    cmd = [sys.executable, "-m", "temper", "prepare", "-p", args.params]
    cmd += ["-S", f"prepare.out_dir={out}", "-S", f"prepare.metrics={out / 'prepare.json'}"]
    cmd += ["-S", f"prepare.max_examples.train={args.steps * train_cfg(args).batch_size}"]
    cmd += ["-S", "prepare.max_examples.validation=2", "-S", "prepare.max_examples.test=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"bench_train: temper prepare failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    for split in ("train", "validation"):
        recs = read_jsonl(out / f"{split}.jsonl")
        write_jsonl(work / "smoke" / f"{split}.jsonl", with_gold_completions(recs))


def full_profile_overrides() -> list[str]:
    from temper.config import as_overrides, read_yaml

    return as_overrides(read_yaml(FULL_PROFILE))


# --------------------------------------------------------------------------- arms


def train_cfg(args) -> Any:
    from temper.config import load_params

    cfg = TemperParams.of(load_params(args.params)).train
    return cfg.candidate(next(iter(cfg.candidates)))


def arm_full_split(args, work: Path) -> dict[str, Any]:
    """Prepare the full training split (full profile) and count one epoch's tokens."""
    from transformers import AutoTokenizer

    from temper.config import load_params
    from temper.io import read_jsonl, write_jsonl
    from temper.stages.prepare import run
    from temper.task import load_task
    from temper.training.data import fit_prompt, tokenize_pair

    params = load_params(args.params, full_profile_overrides())
    out = work / "full_prepared"
    cfg = TemperParams.of(params).prepare.model_copy(
        update={"out_dir": str(out), "metrics": str(out / "prepare.json")}
    )
    run(cfg, load_task(TASK), args.base_dir)
    full = TemperParams.of(params).train
    full = full.candidate(next(iter(full.candidates)))
    data = work / "full"
    for split in ("train", "validation"):
        write_jsonl(
            data / f"{split}.jsonl", with_gold_completions(read_jsonl(out / f"{split}.jsonl"))
        )
    tok = AutoTokenizer.from_pretrained(args.base_dir)
    recs = read_jsonl(data / "train.jsonl")
    tokens = sum(
        len(tokenize_pair(tok, fit_prompt(tok, r, full.max_length)[0])["input_ids"]) for r in recs
    )
    steps = -(-len(recs) // (full.batch_size * full.grad_accum))
    return {
        "records": len(recs),
        "tokens_per_epoch": tokens,
        "steps_per_epoch": steps,
        "batch_size": full.batch_size,
        "max_length": full.max_length,
        "layers": full.layers,
    }


def arm_temper(args, work: Path, arm: str) -> dict[str, Any]:
    from temper.config import load_params
    from temper.stages import train
    from temper.training.trainer import peak_rss_mb

    cfg = train_cfg(args)
    update: dict[str, Any] = {}
    if arm == "temper_full_profile":
        full = TemperParams.of(load_params(args.params, full_profile_overrides())).train
        full = full.candidate(next(iter(full.candidates)))
        update = {k: getattr(full, k) for k in ("layers", "batch_size", "max_length")}
        data = sample(work / "full", work / f"data-{arm}", args.steps * full.batch_size)
    elif arm.startswith("quality"):
        data = quick_data(work)
    else:
        data = sample(quick_data(work), work / f"data-{arm}", args.steps * cfg.batch_size)
    if arm in ("temper_all_layers", "quality_all_layers"):
        update["layers"] = None
    steps = args.quality_steps if arm.startswith("quality") else args.steps
    update.update(
        data_dir=str(data),
        out_dir=str(work / f"cand-{arm}"),
        plots_dir=str(work / f"plots-{arm}"),
        checkpoint_dir=str(work / f"ckpt-{arm}"),
        max_steps=steps,
        grad_accum=1,
        save_steps=100_000,
        max_eval_examples=None if arm.startswith("quality") else 8,
        candidates={arm: {}},
    )
    cfg = cfg.model_copy(update=update)
    m = train.run(cfg.only([arm]), args.base_dir)[arm]
    out = {
        "steps": m.steps,
        "tokens": m.train_tokens,
        "seconds": m.train_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "trainable": m.trainable_params,
        "layers": cfg.layers,
        "max_length": cfg.max_length,
        "batch_size": cfg.batch_size,
        "precision": m.precision,
        "gradient_checkpointing": m.gradient_checkpointing,
        "order": "length-grouped" if cfg.group_by_length else "random",
        "val_loss": m.val_loss,
        "base_val_loss": m.base_val_loss,
    }
    if arm.startswith("quality"):
        out.update(accuracy(args, data, Path(cfg.out_dir) / arm / "adapter"))
    return out


def accuracy(args, data: Path, adapter: Path) -> dict[str, Any]:
    """Greedy clause-type accuracy on the first validation clauses, as evaluate decodes."""
    from temper.evaluation.generation import generate, load_model
    from temper.task import load_task, parse_answer
    from temper.training.data import load_records

    task = load_task(TASK)
    recs = load_records(data / "validation.jsonl", args.quality_examples)
    model, tok = load_model(args.base_dir, adapter)
    outs = generate(model, tok, [r["prompt"] for r in recs], task.max_new_tokens, progress=False)
    answers = [parse_answer(g.text) for g in outs]
    right = sum(
        bool(a) and a.get("clause_type") == r["gold"]["clause_type"]
        for a, r in zip(answers, recs, strict=True)
    )
    valid = sum(a is not None and not task.validate_answer(a) for a in answers)
    return {"accuracy": right / len(recs), "schema_valid": valid / len(recs), "n_eval": len(recs)}


def arm_trl(args, work: Path, arm: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from temper.training.config import TARGETS_ALL
    from temper.training.data import load_records, to_dataset
    from temper.training.model import (
        load_base,
        resolve_checkpointing,
        resolve_precision,
        target_modules,
    )
    from temper.training.trainer import peak_rss_mb

    cfg = train_cfg(args)
    data = sample(quick_data(work), work / f"data-{arm}", args.steps * cfg.batch_size)
    precision = resolve_precision(cfg)
    tokenizer, model = load_base(args.base_dir, "lora", "fp32")
    recs = load_records(data / "train.jsonl")
    n_blocks = model.config.num_hidden_layers
    if arm == "trl_defaults":
        # Out of the box: every block, trl's own max_length and truncation, its precision and
        # checkpointing defaults. Only LoRA's shape (rank, alpha, targets) is temper's.
        layers = None
        ds = Dataset.from_list(
            [{"prompt": r["prompt"], "completion": r["completion"]} for r in recs]
        )
        extra: dict[str, Any] = {}
    else:
        layers = None if arm == "trl_equal_all_layers" else cfg.layers
        ds, _ = to_dataset(tokenizer, recs, cfg.max_length)  # the same cut records as temper
        extra = {
            "max_length": cfg.max_length,
            "bf16": precision == "bf16",
            "fp16": precision == "fp16",
            "gradient_checkpointing": resolve_checkpointing(cfg),
        }
        if arm == "trl_tuned":
            extra["train_sampling_strategy"] = "group_by_length"
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        # resolved as temper resolves them (`all-linear` -> q_proj, ...), so LoRA is the same
        target_modules=target_modules(model, cfg.target_modules or TARGETS_ALL),
        layers_to_transform=None if layers is None else list(range(n_blocks - layers, n_blocks)),
        task_type="CAUSAL_LM",
    )

    class Counting(SFTTrainer):
        """Counts the real (unpadded) tokens of each training batch, as temper's trainer does."""

        tokens_seen = 0

        def compute_loss(self, model, inputs, *a, **kw):
            if model.training:
                self.tokens_seen += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, *a, **kw)

    trainer = Counting(
        model=model,
        args=SFTConfig(
            output_dir=str(work / arm),
            max_steps=args.steps,
            per_device_train_batch_size=cfg.batch_size,
            seed=cfg.seed,
            report_to="none",
            save_strategy="no",
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            **extra,
        ),
        train_dataset=ds,
        processing_class=tokenizer,
        peft_config=lora,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    args_ = trainer.args
    return {
        "steps": trainer.state.global_step,
        "tokens": trainer.tokens_seen,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "layers": layers,
        "max_length": args_.max_length,
        "batch_size": args_.per_device_train_batch_size,
        "precision": "bf16" if args_.bf16 else "fp16" if args_.fp16 else "fp32",
        "gradient_checkpointing": bool(args_.gradient_checkpointing),
        "order": args_.train_sampling_strategy,
    }


# --------------------------------------------------------------------------- driver


def run_arm(args, work: Path, arm: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--arm", arm, "--work", str(work)]
    cmd += ["--steps", str(args.steps), "--quality-steps", str(args.quality_steps)]
    cmd += ["--quality-examples", str(args.quality_examples), "--params", args.params]
    cmd += ["--base-dir", args.base_dir]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("ARM ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"arm {arm} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(line[4:])
    out["wall"] = time.perf_counter() - start
    return out


def blocks(layers: int | None) -> str:
    return "all 30" if layers is None else f"top {layers}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps of each speed arm")
    parser.add_argument(
        "--quality-steps", type=int, default=40, help="steps of the quality arms (0: skip them)"
    )
    parser.add_argument(
        "--quality-examples", type=int, default=64, help="validation clauses greedily decoded"
    )
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--base-dir", default=str(ROOT / "models" / "base"))
    parser.add_argument("--arms", default=",".join(SPEED_ARMS), help="speed arms to run")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each speed arm (round-robin; median)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="temper and trl_equal, 1 step each, no quality arms, data built here (CI).",
    )
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm, print JSON
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.quality_steps, args.repeats = 1, 0, 1
        args.arms = "temper,trl_equal"
        if Path(args.base_dir) == ROOT / "models" / "base":
            from bench_serve import smoke_base  # builds models/base when absent

            args.base_dir = str(smoke_base())

    if args.arm:
        work = Path(args.work)
        if args.arm == "full_split":
            out = arm_full_split(args, work)
        elif args.arm.startswith("trl"):
            out = arm_trl(args, work, args.arm)
        else:
            out = arm_temper(args, work, args.arm)
        print("ARM " + json.dumps(out))
        return

    arms = [a for a in args.arms.split(",") if a]
    unknown = set(arms) - set(SPEED_ARMS)
    if unknown or "temper" not in arms or "trl_equal" not in arms:
        sys.exit(f"--arms: temper and trl_equal are required; unknown {sorted(unknown)}")
    results: dict[str, dict[str, Any]] = {}
    split: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        if args.smoke:
            smoke_data(args, work)
        if "temper_full_profile" in arms:
            split = run_arm(args, work, "full_split")
            print(
                f"full training split: {split['records']} clauses, "
                f"{split['tokens_per_epoch']} tokens per epoch at max_length "
                f"{split['max_length']}",
                flush=True,
            )
        # Round-robin over the arms, so a change of the machine's load hits every arm alike.
        runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
        order = [a for _ in range(args.repeats) for a in arms]
        for arm in order + (QUALITY_ARMS if args.quality_steps else []):
            r = run_arm(args, work, arm)
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
            r["s_per_step"] = r["seconds"] / r["steps"]
            runs.setdefault(arm, []).append(r)
            print(
                f"{arm:>22}: {r['steps']} steps, {r['tokens']} tokens in {r['seconds']:.1f}s "
                f"= {r['tokens_per_s']:.1f} tokens/s (arm wall {r['wall']:.0f}s)",
                flush=True,
            )
    for arm, rs in runs.items():
        # Per arm: the median of its runs (repeats see the same records: the same tokens).
        results[arm] = {
            **rs[0],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
            "s_per_step": statistics.median(r["s_per_step"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
        }

    def ratio(a: str, b: str) -> float:
        """tokens/s of arm a over arm b: the median of the per-round ratios (the two ran
        minutes apart in each round, so a change of the machine's load cancels out)."""
        pairs = zip(runs[a], runs[b], strict=True)
        return statistics.median(x["tokens_per_s"] / y["tokens_per_s"] for x, y in pairs)

    steps = {a: results[a]["steps"] for a in arms}
    if len(set(steps.values())) != 1 or args.steps not in steps.values():
        sys.exit(f"arms ran different numbers of steps: {steps}")
    print()
    print(
        f"speed: {args.steps} optimizer steps per arm on the same sampled training records; "
        f"{args.repeats} round(s); tokens/s and s/step: median of the arm's runs; "
        "vs trl_equal: median of the per-round ratios"
    )
    print(
        "| arm | blocks | max_length | batch | precision | checkpointing | order | trainable "
        "| tokens | tokens/s | s/step | peak RSS MiB | vs trl_equal |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for arm in arms:
        r = results[arm]
        print(
            f"| {arm} | {blocks(r['layers'])} | {r['max_length']} | {r['batch_size']} "
            f"| {r['precision']} | {'on' if r['gradient_checkpointing'] else 'off'} "
            f"| {r['order']} | {r['trainable'] / 1e6:.2f} M | {r['tokens']} "
            f"| {r['tokens_per_s']:.1f} | {r['s_per_step']:.2f} | {r['peak_rss_mb']:.0f} "
            f"| {ratio(arm, 'trl_equal'):.2f}x |"
        )
    print()
    rounds = ", ".join(
        f"{x['tokens_per_s'] / y['tokens_per_s']:.2f}"
        for x, y in zip(runs["temper"], runs["trl_equal"], strict=True)
    )
    print(f"temper / trl at equal settings, per round: {rounds}")
    for arm, what in (
        ("trl_tuned", "trl tuned (length-grouped; padding-free needs flash-attention)"),
        ("trl_defaults", "trl at its full defaults (all blocks, 1024, checkpointing on)"),
    ):
        if arm in results:
            print(f"temper / {what}: {ratio('temper', arm):.2f}x")
    if "temper_all_layers" in results and "trl_equal_all_layers" in results:
        print(
            "temper / trl at equal settings, every block adapted: "
            f"{ratio('temper_all_layers', 'trl_equal_all_layers'):.2f}x"
        )
    if "temper_all_layers" in results:
        print(
            f"speed lever `layers: {results['temper']['layers']}` (vs every block): "
            f"{ratio('temper', 'temper_all_layers'):.2f}x tokens/s"
        )
    if split is not None:
        r = results["temper_full_profile"]
        seconds = split["tokens_per_epoch"] / r["tokens_per_s"]
        print(
            f"full profile estimate: {split['tokens_per_epoch']} tokens per epoch "
            f"({split['records']} clauses, {split['steps_per_epoch']} steps of "
            f"{split['batch_size']}) / {r['tokens_per_s']:.0f} tokens/s (measured at batch "
            f"{r['batch_size']}, max_length {r['max_length']}, {blocks(r['layers'])} blocks) "
            f"= {seconds / 60:.0f} min of training per candidate"
        )
    if args.quality_steps:
        print()
        print(
            f"quality cost of `layers` at equal steps ({args.quality_steps} steps of "
            f"{results['quality_top_layers']['batch_size']}, whole quick training set):"
        )
        print(
            "| blocks adapted | trainable | train s | tokens/s | val loss (base) "
            "| clause-type accuracy | schema-valid |"
        )
        print("|---|---|---|---|---|---|---|")
        for arm in QUALITY_ARMS:
            r = results[arm]
            print(
                f"| {blocks(r['layers'])} | {r['trainable'] / 1e6:.2f} M | {r['seconds']:.0f} "
                f"| {r['tokens_per_s']:.0f} | {r['val_loss']:.4f} ({r['base_val_loss']:.4f}) "
                f"| {r['accuracy']:.3f} (n={r['n_eval']}) | {r['schema_valid']:.3f} |"
            )
    headline = ratio("temper", "trl_equal")
    print()
    print(f"temper (shipped settings) / trl at equal settings: {headline:.2f}x")
    print(f"RESULT train_tokens_per_s_ratio {headline:.2f}")


if __name__ == "__main__":
    main()
