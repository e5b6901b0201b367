"""Benchmark the teacher path: 1,000 requests at concurrency 32 against a 200 ms loopback API.

The fake frontier API (tests/fake_api.py) runs in its own process, as a real API would, so the
client's event loop does not share a GIL with the server. Measured in the same run:

  raw SDK      AsyncOpenAI + a semaphore, nothing else (the floor for this machine)
  provider     temper.providers (cache writes, budget, limiter, retries, stats)
  cached       the same 1,000 requests again from a fresh provider: all cache hits
  stage        optional (--stage, needs data/prepared): `temper distil` on the prepared data
               against the same server, then its fully cached re-run (process start included)

Target: provider wall / ideal (1000 / 32 x 0.2 s = 6.25 s) <= 1.25; cached re-run < 2 s.
Ends with: RESULT distil_wall_over_ideal <ratio> (exit 1 when a request failed).

    python scripts/bench_distil.py [--requests 1000] [--concurrency 32] [--stage]
    python scripts/bench_distil.py --smoke     # 16 requests, 20 ms: does it run (CI), not a timing
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from temper.io import read_jsonl
from temper.providers import ProviderConfig, open_provider
from temper.task import load_task

ROOT = Path(__file__).resolve().parents[1]


def start_server(latency: float, answers: Path | None) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, str(ROOT / "tests" / "fake_api.py"), "--latency", str(latency)]
    if answers:
        command += ["--answers", str(answers)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        raise SystemExit(f"fake API did not start: {url!r}")
    return proc, url


async def raw_sdk(url: str, batch: list, concurrency: int) -> float:
    import openai

    client = openai.AsyncOpenAI(api_key="x", base_url=url + "/v1", max_retries=0)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(messages):
        async with semaphore:
            await client.chat.completions.create(
                model="teacher", messages=messages, max_tokens=256, temperature=0
            )

    t0 = time.perf_counter()
    await asyncio.gather(*(one(m) for m in batch))
    wall = time.perf_counter() - t0
    await client.close()
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--stage", action="store_true", help="also time `temper distil`")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="16 requests at concurrency 4, 20 ms each: does it run (CI), not a timing.",
    )
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.concurrency, args.latency = 16, 4, 0.02

    task = load_task(ROOT / "configs/tasks/clause_review.yaml")
    clauses = [r["clause"] for r in read_jsonl(ROOT / "data/raw/contracts/train.jsonl")]
    clauses = list(dict.fromkeys(clauses))[: args.requests]  # distinct: no accidental cache hits
    batch = [task.messages(c, with_labels=True) for c in clauses]
    ideal = args.requests / args.concurrency * args.latency
    tmp = Path(tempfile.mkdtemp(prefix="bench-distil-"))
    answers = tmp / "answers.json"
    prepared = ROOT / "data" / "prepared"
    gold = {}
    if args.stage and prepared.exists():
        for split in ("train", "validation", "test"):
            for r in read_jsonl(prepared / f"{split}.jsonl"):
                gold[task.user_message(r["text"])] = task.format_answer(
                    {f.name: r["gold"].get(f.name) for f in task.fields}
                )
    answers.write_text(json.dumps(gold))
    server, url = start_server(args.latency, answers)
    try:
        print(
            f"{len(batch)} requests, concurrency {args.concurrency}, +{args.latency * 1000:.0f} ms"
            f" per request; ideal {ideal:.2f} s; cores {os.cpu_count()}"
        )
        raw = asyncio.run(raw_sdk(url, batch, args.concurrency))
        print(f"raw SDK (floor)      {raw:6.2f} s   {raw / ideal:.3f} x ideal")

        cfg = ProviderConfig(
            kind="openai",
            model="teacher",
            base_url=url + "/v1",
            prices={"teacher": {"input": 0.15, "output": 0.6}},
            concurrency=args.concurrency,
            cache=str(tmp / "cache.sqlite"),
            max_requests=10 * args.requests,
        )
        provider = open_provider(cfg)
        t0 = time.perf_counter()
        results = provider.complete_many(batch, desc="provider")
        wall = time.perf_counter() - t0
        failed = sum(isinstance(r, Exception) for r in results)
        s = provider.stats.summary()
        print(
            f"provider layer       {wall:6.2f} s   {wall / ideal:.3f} x ideal   "
            f"({s['requests']} requests, {failed} failed, p50 {s['latency_ms_p50']} ms, "
            f"p95 {s['latency_ms_p95']} ms, ${s['usd']:.4f})"
        )
        provider.close()

        t0 = time.perf_counter()
        again = open_provider(cfg)
        cached = again.complete_many(batch)
        cached_wall = time.perf_counter() - t0
        assert again.stats.cache_hits == len(batch) and again.stats.requests == 0
        print(
            f"cached re-run        {cached_wall:6.2f} s   ({again.stats.cache_hits} hits, "
            f"0 requests)"
        )
        assert all(a.text == b.text for a, b in zip(results, cached, strict=True))

        if args.stage and gold:
            stage(url, tmp)
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"RESULT distil_wall_over_ideal {wall / ideal:.3f}")
    if failed:
        sys.exit(f"bench_distil: {failed} of {len(batch)} requests failed")


def stage(url: str, tmp: Path) -> None:
    """`temper distil` on data/prepared against the same server, then fully cached."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["distil"].update(
        {
            "out_dir": str(tmp / "distilled"),
            "log_mlflow": False,
            "metrics": str(tmp / "distil.json"),
            "progress": False,
        }
    )
    params["distil"]["provider"].update(
        {
            "kind": "openai",
            "model": "local",
            "base_url": url + "/v1",
            "concurrency": 32,
            "cache": str(tmp / "stage-cache.sqlite"),
        }
    )
    params["task"] = str(ROOT / params["task"])
    params["distil"]["prepared_dir"] = str(ROOT / params["distil"]["prepared_dir"])
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    command = [sys.executable, "-m", "temper", "distil", "-p", str(tmp / "params.yaml")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TEMPER_LOG_LEVEL": "WARNING"}
    for label in ("stage, first run", "stage, cached re-run"):
        t0 = time.perf_counter()
        done = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode:
            raise SystemExit(done.stderr)
        m = json.loads((tmp / "distil.json").read_text())
        print(
            f"{label:20s} {wall:6.2f} s   (process start included; {m['requests']} requests,"
            f" {m['cache_hits']} cache hits, {m['rejects']} rejects)"
        )


if __name__ == "__main__":
    main()
