"""Benchmark the engines: the built-in engine, vLLM directly, and the gateway over vLLM.

Same served version, same prompts (the texts of real test clauses), concurrency 1 and 16, one
run, one after the other on the same machine (never two engines at once: they would share the
cores):

1. `temper serve` with the built-in engine (OpenAI chat requests, task prompt mode);
2. vLLM alone, started from the `vllm:` params section (temper.engines.VllmServer), sent the
   very requests the gateway would send it: the task prompt's token ids, the task schema as
   `response_format`, greedy, `max_tokens` from the version's generation settings;
3. `temper serve --engine vllm` attached to that same vLLM (`serve.engine_url`), with
   `vllm.confidence: engine`: the same model work as 2, so the ratio is the gateway's own
   overhead (auth, routing code, prompt rendering, tokenising, SSE relaying, metrics, the
   request log);
4. the same gateway with `vllm.confidence: rescore` (the default): one extra prefill per answer
   for raw-model label confidences; reported, not part of the overhead ratio.

Throughput is requests/s over the wall time of N requests. vLLM's peak memory is the largest
resident set of its process tree, sampled every 0.2 s.

Ends with:
    RESULT gateway_overhead_ratio <gateway (3) req/s / vLLM direct (2) req/s, concurrency 16>
    RESULT builtin_vs_vllm_ratio <built-in (1) req/s / vLLM direct (2) req/s, concurrency 16>

    python scripts/bench_engines.py [--bundle FOLDER | --model models:/<name>@<alias>] [-n 32]
    python scripts/bench_engines.py --smoke   # a check that it runs (CI), not a timing
    python scripts/bench_engines.py --engine-url http://gpu-box:8000   # a vLLM you run

`--engine-url` benches a running vLLM of the same base model instead of starting one (its key,
if it wants one, from VLLM_API_KEY): 2 to 4 then measure that server; its memory is not sampled.

Needs `make vllm` (vLLM's own environment) and, without --bundle, a registered version (make run).
`--smoke` needs no registry and no prepared data: without --bundle it builds one in a temp folder
(bench_serve.smoke_bundle: the base model and a small random LoRA adapter), and without --test
it sends the shortest clause of the raw test split. Each of the four systems answers that one
request at concurrency 1 with no warm-up; the servers' files stay in the temp folder; no
`--out` is written. A failure exits non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
from bench_serve import (  # the same gateway start and stop (and smoke bundle) as bench_serve.py
    smoke_bundle,
    smoke_set,
    smoke_texts,
    start,
    stop,
)

from temper.params import TemperParams

ROOT = Path(__file__).resolve().parents[1]

CONCURRENCY = (1, 16)


def served_prompts(bundle: Path, texts: list[str]) -> tuple[list[list[int]], dict, int]:
    """The token ids, schema and budget the gateway sends vLLM for these texts."""
    from temper import bundle as bundles
    from temper.chat import render
    from temper.evaluation.constrained import json_logits_processor

    manifest, task, _ = bundles.open_bundle(bundle)
    tokenizer = bundles.load_tokenizer(bundle / manifest.tokenizer)
    ids = []
    for text in texts:
        prompt = render(tokenizer, task.messages(text), tokenize=False, add_generation_prompt=True)
        ids.append(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    schema = json_logits_processor(task, tokenizer).schema  # with the compact separators
    return ids, schema, manifest.generation.max_new_tokens


async def gateway_one(client: openai.AsyncOpenAI, model: str, text: str, seen: dict) -> int:
    r = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}]
    )
    confidence = (r.model_extra.get("temper") or {}).get("confidence") or {}
    seen[text] = (r.choices[0].message.content, confidence)  # what this system answered
    return r.usage.completion_tokens


async def direct_one(client: httpx.AsyncClient, body: dict) -> int:
    r = await client.post("/v1/completions", json=body)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


async def timed(calls: list, concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def limited(call) -> int:
        async with gate:
            t0 = time.perf_counter()
            tokens = await call()
            latencies.append(time.perf_counter() - t0)
            return tokens

    t0 = time.perf_counter()
    tokens = await asyncio.gather(*(limited(c) for c in calls))
    wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests": len(calls),
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(calls) / wall, 3),
        "p50_latency_s": round(statistics.median(latencies), 3),
        "p95_latency_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
        "tokens_per_s": round(sum(tokens) / wall, 1),
    }


def run_gateway(url: str, model: str, texts: list[str], concurrency: int, seen=None) -> dict:
    seen = {} if seen is None else seen

    async def go() -> dict:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0)
        client = client.with_options(timeout=900)
        try:
            return await timed(
                [lambda t=t: gateway_one(client, model, t, seen) for t in texts], concurrency
            )
        finally:
            await client.close()

    return asyncio.run(go())


def run_direct(url: str, key: str, bodies: list[dict], concurrency: int) -> dict:
    async def go() -> dict:
        async with httpx.AsyncClient(
            base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=900
        ) as client:
            return await timed([lambda b=b: direct_one(client, b) for b in bodies], concurrency)

    return asyncio.run(go())


class PeakMemory:
    """The largest resident set of a process tree, sampled in a thread."""

    def __init__(self, pid: int):
        import psutil

        self.root, self.peak, self.done = psutil.Process(pid), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        import psutil

        while not self.done.wait(0.2):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                continue

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.peak / 2**30


def bundle_for(args: argparse.Namespace) -> Path:
    if args.bundle:
        return Path(args.bundle).resolve()
    out = ROOT / ".cache" / "bench_engines" / args.model.replace("/", "_").replace(":", "")
    if not out.exists():
        subprocess.run(
            [sys.executable, "-m", "temper", "pull", args.model, "-o", str(out)],
            cwd=ROOT,
            check=True,
        )
    return out


def load_texts(path: str, n: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()][:n]
    if len(texts) < n:
        raise SystemExit(f"{path}: only {len(texts)} records, asked for {n}")
    return texts


def bench_builtin(
    bundle: Path, texts, levels, gateway_set, answers: dict, logs: Path, warm: bool = True
) -> list[dict]:
    log = logs / "bench_engines_builtin.log"
    proc, url = start(str(bundle), 16, log, gateway_set)
    seen = answers.setdefault("builtin", {})
    try:
        if warm:
            run_gateway(url, bundle.name, texts[:2], 2)  # warm-up: grammar, caches
        return [
            {"system": "builtin", **run_gateway(url, bundle.name, texts, c, seen)} for c in levels
        ]
    finally:
        stop(proc)


def bench_vllm(
    args, bundle: Path, texts, levels, gateway_set, answers: dict, logs: Path, warm: bool = True
) -> tuple:
    from temper import bundle as bundles
    from temper.engines import VllmClient, lora_name

    manifest, _, adapter = bundles.open_bundle(bundle)
    server = None if args.engine_url else start_vllm(args, bundle, manifest, adapter, logs)
    url = args.engine_url or server.url
    key = os.environ.get("VLLM_API_KEY") if args.engine_url else server.key
    memory = PeakMemory(server.proc.pid) if server else None
    rows: list[dict] = []
    try:
        model = lora_name(bundle.name, manifest.adapter_sha256)  # an attached vLLM holds others
        VllmClient(url, key).load_adapter(model, str(adapter.resolve()))
        ids, schema, budget = served_prompts(bundle, texts)
        response_format = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema},
        }
        bodies = [
            {
                "model": model,
                "prompt": p,
                "max_tokens": budget,
                "temperature": 0.0,
                "response_format": response_format,
            }
            for p in ids
        ]
        if warm:
            run_direct(url, key, bodies[:2], 2)  # warm-up
        rows += [{"system": "vllm-direct", **run_direct(url, key, bodies, c)} for c in levels]
        if key:
            os.environ["VLLM_API_KEY"] = key  # the attached gateways' key for it
        for mode in ("engine", "rescore"):
            extra = ["-S", "serve.engine=vllm", "-S", f"serve.engine_url={url}"]
            extra += ["-S", f"vllm.confidence={mode}", *gateway_set]
            log = logs / f"bench_engines_gateway_{mode}.log"
            proc, gateway = start(str(bundle), 16, log, extra)
            try:
                if warm:
                    run_gateway(gateway, bundle.name, texts[:2], 2)
                name = "gateway-vllm" if mode == "engine" else "gateway-vllm-rescore"
                seen = answers.setdefault(name, {})
                rows += [
                    {"system": name, **run_gateway(gateway, bundle.name, texts, c, seen)}
                    for c in levels
                ]
            finally:
                stop(proc)
    finally:
        peak = memory.stop() if memory else None
        if server is not None:
            server.stop()
    return rows, peak


def start_vllm(args, bundle: Path, manifest, adapter: Path, logs: Path):
    """vLLM from the `vllm:` params section, on the base the gateway would find: --base, else
    model.dir when its hash matches, else by identity."""
    from temper import bundle as bundles
    from temper.config import load_params
    from temper.engines import VllmServer, check_adapter

    vcfg = TemperParams.of(load_params(ROOT / "params.yaml", args.set)).vllm
    base = (
        Path(args.base) if args.base else bundles.matching_base(ROOT / "models" / "base", manifest)
    )
    base = base or bundles.find_base(bundle, manifest)
    server = VllmServer(
        vcfg,
        base.resolve(),
        logs / "bench_engines_vllm.log",
        max_lora_rank=check_adapter(adapter),
        max_num_seqs=16,
        tokenizer=(bundle / manifest.tokenizer).resolve(),
    )
    server.start()
    return server


def agreement(answers: dict, threshold: float | None) -> dict:
    """How far vLLM's answers and label confidences are from the built-in engine's, and
    whether the registered route threshold decides the same (self tier or not)."""
    import math

    base = answers["builtin"]
    out = {"route_threshold": threshold}
    for name in ("gateway-vllm-rescore", "gateway-vllm"):
        pairs = [(base[t], answers[name][t]) for t in base if t in answers.get(name, {})]
        gaps, flips = [], 0
        for (_, b), (_, v) in pairs:
            for field, value in b.items():
                other = v.get(field)
                if value is None or other is None:
                    continue
                gaps.append(abs(math.log(max(other, 1e-300)) - math.log(max(value, 1e-300))))
                if threshold is not None:
                    flips += (value >= threshold) != (other >= threshold)
        out[name] = {
            "answers": len(pairs),
            "same_answer": sum(b[0] == v[0] for b, v in pairs),
            "median_abs_log_confidence_gap": round(statistics.median(gaps), 4) if gaps else None,
            "max_abs_log_confidence_gap": round(max(gaps), 4) if gaps else None,
            "route_decisions_flipped": flips if threshold is not None else None,
        }
    return out


def report(rows: list[dict], args, peak: float | None, levels) -> tuple[float, float]:
    def rps(system: str, c: int) -> float:
        return next(r for r in rows if r["system"] == system and r["concurrency"] == c)[
            "throughput_rps"
        ]

    top = levels[-1]
    print(f"\n{args.requests} requests of real test clauses; machine {os.cpu_count()} CPUs")
    print("| system | concurrency | req/s | p50 s | p95 s | tok/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['system']} | {r['concurrency']} | {r['throughput_rps']} | "
            f"{r['p50_latency_s']} | {r['p95_latency_s']} | {r['tokens_per_s']} |"
        )
    if peak is None:
        print(f"\nvLLM peak memory: not measured (attached to {args.engine_url})")
    else:
        print(f"\nvLLM peak memory (process tree RSS): {peak:.2f} GiB")
    rescore = rps("gateway-vllm-rescore", top) / rps("vllm-direct", top)
    print(f"gateway with rescored confidences / vLLM direct at {top}: {rescore:.3f}")
    return rps("gateway-vllm", top) / rps("vllm-direct", top), rps("builtin", top) / rps(
        "vllm-direct", top
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models:/temper-clause-review@challenger")
    parser.add_argument("--bundle", help="A pulled bundle folder (default: pull --model).")
    parser.add_argument("--base", help="The base model folder (default: the bundle's).")
    parser.add_argument("-n", "--requests", type=int, default=32)
    parser.add_argument("-S", "--set", action="append", default=[], help="vllm.<key>=<value>")
    parser.add_argument(
        "--test", default=None, help="Prepared records (default: data/prepared/test.jsonl)."
    )
    parser.add_argument(
        "--engine-url",
        help="A running vLLM of the bundle's base model to bench instead of starting one "
        "(its key, if any, from VLLM_API_KEY); the gateways attach to it too.",
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "bench_engines.json"))
    parser.add_argument(
        "--smoke", action="store_true", help="1 request, concurrency 1, no warm-up: does it run"
    )
    args = parser.parse_args()
    levels = (1,) if args.smoke else CONCURRENCY
    work = Path(tempfile.mkdtemp(prefix="bench-engines-")) if args.smoke else None
    logs = work or ROOT / "reports"
    logs.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.requests = 1
        if not args.bundle:
            args.bundle = str(smoke_bundle(work))
    bundle = bundle_for(args)
    if args.smoke and args.test is None:
        texts = smoke_texts(args.requests)
    else:
        texts = load_texts(
            args.test or str(ROOT / "data" / "prepared" / "test.jsonl"), args.requests
        )
    gateway_set = [a for kv in args.set for a in ("-S", kv)]
    if args.base:
        gateway_set += ["-S", f"serve.base_dir={args.base}"]
    if args.smoke:
        gateway_set += [a for kv in smoke_set(work) for a in ("-S", kv)]
    from temper.bundle import route_threshold

    answers: dict = {}
    warm = not args.smoke
    rows = bench_builtin(bundle, texts, levels, gateway_set, answers, logs, warm)
    vllm_rows, peak = bench_vllm(args, bundle, texts, levels, gateway_set, answers, logs, warm)
    rows += vllm_rows
    overhead, builtin = report(rows, args, peak, levels)
    agree = agreement(answers, route_threshold(bundle))
    print("agreement with the built-in engine:", json.dumps(agree))
    if not args.smoke:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "rows": rows,
            "vllm_peak_gib": None if peak is None else round(peak, 2),
            "vllm_set": args.set,
        }
        result["agreement"] = agree
        result |= {"gateway_overhead_ratio": overhead, "builtin_vs_vllm_ratio": builtin}
        out.write_text(json.dumps(result, indent=2) + "\n")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(f"RESULT gateway_overhead_ratio {overhead:.3f}")
    print(f"RESULT builtin_vs_vllm_ratio {builtin:.3f}")


if __name__ == "__main__":
    main()
