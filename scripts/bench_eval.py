"""Benchmark: batched evaluation generation vs a one-at-a-time `generate` loop.

Same model (base + a candidate's LoRA merged, or the base model alone), same examples, same
greedy decoding and the same stop rule (EOS), measured in one run:

    python scripts/bench_eval.py                       # 48 test clauses, batch 16
    python scripts/bench_eval.py --full                # + the whole raw test split (826)
    python scripts/bench_eval.py --full --full-limit 200   # time 200 of them, extrapolate
    python scripts/bench_eval.py --smoke               # does it run (CI), not a timing

Prints examples/s of both (throughput), each request's own latency (p50/p95: for the loop the
time of its own call, for the batch the time from its batch's start to the step that finished
it), the amortised time per example (a batch's wall time over its size: a throughput figure,
not a latency), how many answers are identical, and ends with `RESULT eval_batched_speedup
<x>` (the throughput ratio on equal work). `--full` also times the production settings
(batched, prefix cache, stop at a complete JSON answer) on the raw test split. `--smoke`: the
base model alone (built into `model.dir` if absent, as `dvc repro base_model` would), 2 clauses
of the raw test split, batch 2, 4 new tokens; a failure exits non-zero.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from temper.config import load_params
from temper.evaluation.generation import generate, load_model
from temper.evaluation.records import load_records
from temper.io import read_jsonl
from temper.stages.prepare import PrepareConfig
from temper.task import load_task

ROOT = Path(__file__).resolve().parents[1]


def one_at_a_time(model, tokenizer, prompts, max_new_tokens):
    """The naive loop: one prompt, one `generate` call, no padding, no sharing."""
    import torch

    texts, latency_ms = [], []
    for messages in prompts:
        t0 = time.perf_counter()
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.inference_mode():
            out = model.generate(
                **ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        texts.append(
            tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        )
        latency_ms.append((time.perf_counter() - t0) * 1000)
    return texts, latency_ms


def pct(values, q):
    import numpy as np

    return float(np.percentile(values, q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument(
        "--adapter",
        default=None,
        help="Adapter folder (default: the first "
        "candidate under models/candidates, else the base model alone).",
    )
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--full", action="store_true", help="Also time the whole raw test split.")
    ap.add_argument(
        "--full-limit",
        type=int,
        default=None,
        help="Time only this many of the raw test split and extrapolate.",
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="Base model, 2 raw test clauses, batch 2, 4 new tokens: does it run (CI).",
    )
    args = ap.parse_args()
    if args.smoke:
        args.examples, args.batch_size, args.full = 2, 2, False

    params = load_params(args.params)
    task = load_task(ROOT / params["task"])
    model_dir = ROOT / params["model"]["dir"]
    max_new_tokens = 4 if args.smoke else task.max_new_tokens
    if args.smoke:
        from bench_serve import smoke_base  # builds model.dir when absent

        model_dir = smoke_base()
    adapter = args.adapter
    if adapter is None and not args.smoke:
        found = sorted((ROOT / "models" / "candidates").glob("*/adapter/adapter_config.json"))
        adapter = str(found[0].parent) if found else None
    print(
        f"model: {model_dir} + {adapter or 'no adapter (base model)'}; threads "
        f"{args.threads or 'default'}"
    )
    model, tokenizer = load_model(model_dir, adapter, threads=args.threads)
    import torch

    print(f"torch threads: {torch.get_num_threads()}")

    if args.smoke:  # the raw test split, mapped as the prepare stage maps it
        raw = ROOT / "data" / "raw" / "contracts" / "test.jsonl"
        fields = PrepareConfig.model_validate(params.get("prepare") or {}).fields
        records = load_records(raw, task, fields)[: args.examples]
    else:
        records = read_jsonl(ROOT / "data" / "prepared" / "test.jsonl")[: args.examples]
    prompts = [r["prompt"] for r in records]
    n = len(prompts)
    generate(model, tokenizer, prompts[:2], 4, batch_size=2, progress=False)  # warm-up

    t0 = time.perf_counter()
    seq, seq_ms = one_at_a_time(model, tokenizer, prompts, max_new_tokens)
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    bat = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens,
        args.batch_size,
        stop_at_json=False,
        progress=False,
    )
    t_bat = time.perf_counter() - t0
    same = sum(a == b.text for a, b in zip(seq, bat, strict=True))
    bat_ms = [g.latency_ms for g in bat]
    print(
        f"one-at-a-time: {n} examples in {t_seq:.1f} s = {n / t_seq:.3f} ex/s; per request "
        f"p50 {pct(seq_ms, 50):.0f} ms, p95 {pct(seq_ms, 95):.0f} ms"
    )
    print(
        f"batched (batch {args.batch_size}, length-sorted, prefix cache): {t_bat:.1f} s = "
        f"{n / t_bat:.3f} ex/s; per request p50 {pct(bat_ms, 50):.0f} ms, p95 "
        f"{pct(bat_ms, 95):.0f} ms; amortised {sum(g.amortised_ms for g in bat) / n:.0f} "
        f"ms/example; identical answers {same}/{n}"
    )
    speedup = t_seq / t_bat

    if args.full:
        raw = ROOT / "data" / "raw" / "contracts" / "test.jsonl"
        fields = PrepareConfig.model_validate(params.get("prepare") or {}).fields
        full = load_records(raw, task, fields)
        total = len(full)
        subset = full[: args.full_limit] if args.full_limit else full
        t0 = time.perf_counter()
        gens = generate(
            model,
            tokenizer,
            [r["prompt"] for r in subset],
            task.max_new_tokens,
            args.batch_size,
            stop_at_json=True,
            progress=True,
            desc="test split",
        )
        t_full = time.perf_counter() - t0
        tokens = sum(g.new_tokens for g in gens)
        print(
            f"raw test split: {len(subset)} of {total} clauses in {t_full:.1f} s "
            f"({len(subset) / t_full:.2f} ex/s, {tokens / t_full:.1f} generated tokens/s)"
        )
        if len(subset) < total:
            # Clauses are in file order (not sorted by length), so a prefix is a fair sample.
            print(f"extrapolated to all {total}: {t_full * total / len(subset):.0f} s")
    print(f"RESULT eval_batched_speedup {speedup:.2f}")


if __name__ == "__main__":
    main()
