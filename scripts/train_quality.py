"""Greedy-decode a trained candidate on the validation split: valid-JSON rate and accuracy.

    python scripts/train_quality.py models/candidates/default [--data data/distilled] [--base]

Greedy decoding with the evaluate stage's own loop (`temper.evaluation.generation`: the adapter
merged into the base weights, length-sorted batches with left padding, stop at a complete
JSON answer). This is a quick check of the train stage's output; the evaluate stage does the
real scoring on test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from temper.evaluation.generation import generate, load_model
from temper.io import write_jsonl
from temper.task import load_task, parse_answer
from temper.training.data import load_records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("candidate", type=Path, help="models/candidates/<name>")
    parser.add_argument("--data", type=Path, default=Path("data/distilled"))
    parser.add_argument("--base-dir", default="models/base")
    parser.add_argument("--task", default="configs/tasks/clause_review.yaml")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32", help="as evaluate.dtype")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--base", action="store_true", help="score the base model (no adapter)")
    parser.add_argument("--save", type=Path, help="write the outputs here (JSONL)")
    args = parser.parse_args()

    task = load_task(args.task)
    records = load_records(args.data / "validation.jsonl", args.limit)
    adapter = None if args.base else args.candidate / "adapter"
    model, tokenizer = load_model(args.base_dir, adapter, args.dtype, args.threads)
    start = time.perf_counter()
    generations = generate(
        model,
        tokenizer,
        [r["prompt"] for r in records],
        task.max_new_tokens,
        args.batch_size,
        progress=False,
    )
    seconds = time.perf_counter() - start
    outputs = [g.text for g in generations]
    parsed = valid = correct = 0
    rows = []
    for rec, text in zip(records, outputs, strict=True):
        answer = parse_answer(text)
        problems = task.validate_answer(answer) if answer is not None else ["no JSON object"]
        parsed += answer is not None
        valid += not problems
        correct += bool(answer) and answer.get("clause_type") == rec["gold"]["clause_type"]
        rows.append(
            {"id": rec.get("id"), "gold": rec["gold"], "output": text, "problems": problems}
        )
    if args.save:
        write_jsonl(args.save, rows)
    n = len(records)
    result = {
        "candidate": "base" if args.base else str(args.candidate),
        "n": n,
        "parsed_json": parsed / n,
        "valid_json": valid / n,
        "clause_type_accuracy": correct / n,
        "generate_seconds": round(seconds, 1),
        "example_output": outputs[0],
    }
    print(json.dumps(result, indent=2))
    print(f"RESULT val_valid_json {valid / n:.4f}")
    print(f"RESULT val_clause_type_accuracy {correct / n:.4f}")


if __name__ == "__main__":
    main()
