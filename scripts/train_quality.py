"""Greedy-decode a trained candidate on the validation split: valid-JSON rate and accuracy.

    python scripts/train_quality.py models/candidates/default [--data data/distilled] [--base]

Batched greedy decoding with left padding (the same helper the train stage uses). This is a
quick check of the train stage's output; the evaluate stage does the real scoring on test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipelines import train as T
from temper.io import write_jsonl
from temper.task import load_task, parse_answer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("candidate", type=Path, help="models/candidates/<name>")
    parser.add_argument("--data", type=Path, default=Path("data/distilled"))
    parser.add_argument("--base-dir", default="models/base")
    parser.add_argument("--task", default="configs/tasks/clause_review.yaml")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--base", action="store_true", help="score the base model (no adapter)")
    parser.add_argument("--save", type=Path, help="write the outputs here (JSONL)")
    args = parser.parse_args()

    from peft import PeftModel

    task = load_task(args.task)
    records = T.load_records(args.data / "validation.jsonl", args.limit)
    precision = T.resolve_precision(T.TrainConfig())
    tokenizer, model = T.load_base(args.base_dir, "lora", precision)
    if not args.base:
        model = PeftModel.from_pretrained(model, args.candidate / "adapter")
    start = time.perf_counter()
    outputs = T.generate(model, tokenizer, [r["prompt"] for r in records], task.max_new_tokens,
                         args.batch_size, precision)
    seconds = time.perf_counter() - start
    parsed = valid = correct = 0
    rows = []
    for rec, text in zip(records, outputs, strict=True):
        answer = parse_answer(text)
        problems = task.validate_answer(answer) if answer is not None else ["no JSON object"]
        parsed += answer is not None
        valid += not problems
        correct += bool(answer) and answer.get("clause_type") == rec["gold"]["clause_type"]
        rows.append({"id": rec.get("id"), "gold": rec["gold"], "output": text,
                     "problems": problems})
    if args.save:
        write_jsonl(args.save, rows)
    n = len(records)
    result = {"candidate": "base" if args.base else str(args.candidate), "n": n,
              "parsed_json": parsed / n, "valid_json": valid / n,
              "clause_type_accuracy": correct / n,
              "generate_seconds": round(seconds, 1), "example_output": outputs[0]}
    print(json.dumps(result, indent=2))
    print(f"RESULT val_valid_json {valid / n:.4f}")
    print(f"RESULT val_clause_type_accuracy {correct / n:.4f}")


if __name__ == "__main__":
    main()
