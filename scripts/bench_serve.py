"""Benchmark `temper serve`: micro-batched vs one-at-a-time, on the same requests, same run.

Two real server processes are started in turn on loopback with the same served version: one
with the configured micro-batching (`serve.max_batch_size`, default 16), one with
`max_batch_size=1` (every request generated alone). Each gets the same N requests, the texts of
real test clauses (data/prepared/test.jsonl), at concurrency 1, 4 and 16, sent by the
unmodified `openai` SDK (AsyncOpenAI, streaming, so the time to the first token is measured
too). Printed per setting: throughput (requests/s), p50/p95 latency, p50 time to first token,
generated tokens/s, and the mean batch size the server reported on /metrics.

Writes `--out` (default docs/results/bench_serve.json): every row, and under `batched` the
batched server's best requests/s and tokens/s, which `temper cost` reads as one machine's
throughput.

Target: batched / one-at-a-time throughput >= 3 at concurrency 16.
Ends with: RESULT serve_batched_throughput_ratio <ratio at concurrency 16>

    python scripts/bench_serve.py [--model models:/temper-clause-review@champion] [-n 32]
    python scripts/bench_serve.py --smoke     # does it run (CI), not a timing

`--smoke` needs no registry and no prepared data: it builds a bundle in a temp folder
(`smoke_bundle`: the base model, built into `model.dir` if absent, a small random LoRA adapter,
a budget of 8 new tokens), sends 2 requests (the 2 shortest clauses of the raw test split) at
concurrency 2 only, with no warm-up, keeps the servers' files in the temp folder (monitor
embeddings off), writes no `--out`, and reports the ratio at concurrency 2. A failure exits
non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 4, 16)


def smoke_base() -> Path:
    """The base model folder (`model.dir`), built as `dvc repro base_model` builds it if absent."""
    from temper.config import load_params
    from temper.stages.base_model import ModelConfig, run

    model = load_params(ROOT / "params.yaml").get("model") or {}
    cfg = ModelConfig.model_validate({**model, "dir": str(ROOT / model.get("dir", "models/base"))})
    if not (Path(cfg.dir) / "temper_source.json").exists():
        run(cfg)
    return Path(cfg.dir)


def smoke_bundle(work: Path, max_new_tokens: int | None = None) -> Path:
    """A bundle as `temper pull` writes one, with no registry: `write_serving` (task,
    tokenizer, manifest with the evaluate section's generation settings, the budget cut to
    `max_new_tokens` if given) over the base model and a random LoRA adapter (r 2 on q/v) whose
    B matrices are small, so that the model still answers in JSON as the base model does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from temper.bundle import generation_settings, write_serving
    from temper.config import load_params
    from temper.evaluation.config import EvaluateConfig
    from temper.io import adapter_hash
    from temper.task import load_task

    base = smoke_base()
    params = load_params(ROOT / "params.yaml")
    task = load_task(ROOT / params["task"])
    out = work / "smoke-bundle"
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, weights in peft_model.named_parameters():
            if "lora_B" in name:
                weights.normal_(0, 1e-3)
    peft_model.save_pretrained(out / "adapter", safe_serialization=True)
    generation = generation_settings(
        task, EvaluateConfig.model_validate(params.get("evaluate") or {})
    )
    if max_new_tokens is not None:
        generation = generation.model_copy(update={"max_new_tokens": max_new_tokens})
    write_serving(out, task, base, generation, adapter_hash(out / "adapter"))
    return out


def smoke_texts(n: int) -> list[str]:
    """The `n` shortest clauses of the raw test split (whitespace collapsed)."""
    with open(ROOT / "data" / "raw" / "contracts" / "test.jsonl", encoding="utf-8") as f:
        texts = [" ".join(json.loads(line)["clause"].split()) for line in f if line.strip()]
    return sorted(texts, key=len)[:n]


def smoke_set(work: Path) -> list[str]:
    """`-S` for a smoke run's servers: their files in `work`, not in the repository."""
    return [
        f"serve.cache_dir={work / 'serve-cache'}",
        f"monitor.path={work / 'monitor.sqlite'}",
        "monitor.embed=false",  # the embedder's load would share the cores with the requests
        f"monitor.state_file={work / 'monitor' / 'state.json'}",
        f"monitor.report_dir={work / 'monitor'}",
        f"cache.path={work / 'semantic.sqlite'}",
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, batch: int, log: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "temper", "serve", "--port", str(port), "-m", model]
    command += ["-S", f"serve.max_batch_size={batch}", "-S", "serve.max_queue=256", *extra]
    command += ["-S", f"serve.log_file={log}"]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    end = time.time() + 300
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"temper serve exited with {proc.returncode}: see {log}")
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"temper serve not ready after 300 s: see {log}")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(60)


def batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the server's temper_batch_size histogram."""
    total = count = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("temper_batch_size_sum"):
            total = float(line.split()[-1])
        elif line.startswith("temper_batch_size_count"):
            count = float(line.split()[-1])
    return total, count


async def one(client: openai.AsyncOpenAI, model: str, text: str) -> dict[str, float]:
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": text}],
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - t0
    return {"latency": total, "ttft": first if first is not None else total, "tokens": tokens}


async def run_level(url: str, model: str, texts: list[str], concurrency: int) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def limited(text: str) -> dict[str, float]:
        async with gate:
            return await one(client, model, text)

    before = batch_stats(url)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(limited(t) for t in texts))
    wall = time.perf_counter() - t0
    after = batch_stats(url)
    await client.close()
    latencies = sorted(r["latency"] for r in results)
    batches = after[1] - before[1]
    return {
        "concurrency": concurrency,
        "requests": len(texts),
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(texts) / wall, 3),
        "p50_latency_s": round(statistics.median(latencies), 3),
        "p95_latency_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
        "p50_ttft_s": round(statistics.median(r["ttft"] for r in results), 3),
        "tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 1),
        "mean_batch": round((after[0] - before[0]) / batches, 2) if batches else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models:/temper-clause-review@champion")
    parser.add_argument("-n", "--requests", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="max_batch_size when batched")
    parser.add_argument(
        "-S", "--set", action="append", default=[], help="serve.<key>=<value> for both servers"
    )
    parser.add_argument(
        "--test", default=None, help="Prepared records (default: data/prepared/test.jsonl)."
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "bench_serve.json"))
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="A bundle built here, 2 requests at concurrency 2: does it run (CI).",
    )
    args = parser.parse_args()
    levels = (2,) if args.smoke else CONCURRENCY
    work = Path(tempfile.mkdtemp(prefix="bench-serve-")) if args.smoke else None
    if args.smoke:
        args.requests = min(args.requests, 2)
        args.model = str(smoke_bundle(work, max_new_tokens=8))
        args.set = smoke_set(work) + args.set

    if args.test is None and args.smoke:
        texts = smoke_texts(args.requests)
    else:
        path = args.test or ROOT / "data" / "prepared" / "test.jsonl"
        with open(path, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()][: args.requests]
    if len(texts) < args.requests:
        raise SystemExit(f"{args.test}: only {len(texts)} records, asked for {args.requests}")
    served_id = args.model.split("@")[-1] if "@" in args.model else Path(args.model).name
    if args.model.startswith("models:/") and "@" not in args.model:
        name, version = args.model.removeprefix("models:/").split("/")
        served_id = f"{name}-v{version}"
    load = os.getloadavg()
    rows = []
    for mode, batch in (("batched", args.batch), ("one-at-a-time", 1)):
        log = (work or ROOT / "reports") / f"bench_serve_{mode}.log"  # server logs: not results
        log.parent.mkdir(parents=True, exist_ok=True)
        proc, url = start(args.model, batch, log, [a for kv in args.set for a in ("-S", kv)])
        try:
            if not args.smoke:
                asyncio.run(run_level(url, served_id, texts[:2], 2))  # warm-up: grammar, caches
            for c in levels:
                row = {"mode": mode, **asyncio.run(run_level(url, served_id, texts, c))}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            stop(proc)

    def get(mode: str, c: int) -> dict:
        return next(r for r in rows if r["mode"] == mode and r["concurrency"] == c)

    head = (
        "| concurrency | mode | req/s | p50 latency s | p95 latency s | p50 TTFT s | tok/s "
        "| mean batch |"
    )
    print(f"\n{args.requests} requests of real test clauses, model {args.model} {args.set}")
    print(f"machine: {os.cpu_count()} CPUs, load average at start {load[0]:.2f} {load[1]:.2f}\n")
    print(head)
    print("|" + "---|" * 8)
    for c in levels:
        for mode in ("batched", "one-at-a-time"):
            r = get(mode, c)
            print(
                f"| {c} | {mode} | {r['throughput_rps']} | {r['p50_latency_s']} | "
                f"{r['p95_latency_s']} | {r['p50_ttft_s']} | {r['tokens_per_s']} | "
                f"{r['mean_batch']} |"
            )
    top = levels[-1]
    ratio = get("batched", top)["throughput_rps"] / get("one-at-a-time", top)["throughput_rps"]
    # What `temper cost` reads: the batched server's best throughput (its capacity under load).
    best = max((r for r in rows if r["mode"] == "batched"), key=lambda r: r["throughput_rps"])
    batched = {
        "requests_per_s": best["throughput_rps"],
        "tokens_per_s": best["tokens_per_s"],
        "concurrency": best["concurrency"],
        "p95_latency_s": best["p95_latency_s"],
        "max_batch_size": args.batch,
    }
    summary = {
        "batched": batched,
        "rows": rows,
        f"ratio_at_{top}": ratio,
        "model": args.model,
        "requests": args.requests,
        "cpus": os.cpu_count(),
        "loadavg_at_start": load,
    }
    if args.smoke:
        shutil.rmtree(work, ignore_errors=True)
    else:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"\nbatched / one-at-a-time throughput at concurrency {top}: {ratio:.2f}x (target >= 3)")
    print(f"RESULT serve_batched_throughput_ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
