"""vLLM on CPU: the model inside the engine process (Temper's start) against vLLM's default,
a worker process of its own that the engine process polls. Same base model, same requests.

    python scripts/vllm_cpu_executor.py [--requests 20] [--tokens 32]

For each way: the start's wall time, then `--requests` greedy completions one after another
(the same prompt each time, a different last token so no answer is a prefix-cache copy), with
the wall time and the CPU seconds of vLLM's whole process group (server, engine, worker) over
them, and whether the answers are the same both ways. The figures in docs/serve.md ("On CPU")
come from this script. Needs `make vllm` and the base model (`dvc repro base_model`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import httpx

from temper.engines import VllmConfig, VllmServer
from temper.model_source import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]

PROMPT = "Which clause type is this? This Agreement shall be governed by the laws of New York."


class VllmDefault(VllmServer):
    """vLLM's own CPU start: no `uni` executor, its multiprocessing and thread binding."""

    def argv(self) -> list[str]:
        argv = super().argv()
        at = argv.index("--distributed-executor-backend")
        return argv[:at] + argv[at + 2 :]

    def env(self) -> dict[str, str]:
        env = super().env()
        for key in ("VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS"):
            env.pop(key)
        return env


def group_cpu_s(pgid: int) -> float:
    """utime + stime of every live process in the process group, in seconds."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of stat: the process group
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def measure(kind: type[VllmServer], cfg: VllmConfig, base: Path, ids: list[int], args) -> dict:
    server = kind(cfg, base, args.logs / f"{kind.__name__}.log")
    t0 = time.perf_counter()
    server.start()
    started = time.perf_counter() - t0
    try:
        auth = {"Authorization": f"Bearer {server.key}"}
        cpu0, t0 = group_cpu_s(server.proc.pid), time.perf_counter()
        answers = []
        for i in range(args.requests):
            body = {"model": str(base), "prompt": [*ids, 100 + i], "max_tokens": args.tokens}
            got = httpx.post(
                f"{server.url}/v1/completions",
                json={**body, "temperature": 0},
                headers=auth,
                timeout=300,
            )
            got.raise_for_status()
            answers.append(got.json()["choices"][0]["text"])
        wall = time.perf_counter() - t0
        cpu = group_cpu_s(server.proc.pid) - cpu0
    finally:
        server.stop()
    return {"start_s": started, "wall_s": wall, "cpu_s": cpu, "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--base", type=Path, default=ROOT / "models" / "base")
    parser.add_argument("--python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--logs", type=Path, default=None, help="vLLM's logs (default: a temp dir)")
    args = parser.parse_args()
    args.logs = args.logs or Path(tempfile.mkdtemp(prefix="vllm-cpu-executor-"))
    cfg = VllmConfig(python=args.python, device="cpu", dtype="float32", kv_cache_gib=2)
    tokenizer = load_tokenizer(args.base)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True
    )
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    rows = {
        "engine process (Temper)": measure(VllmServer, cfg, args.base, ids, args),
        "worker process (vLLM default)": measure(VllmDefault, cfg, args.base, ids, args),
    }
    print(f"{args.requests} requests x {args.tokens} tokens, one at a time, {os.cpu_count()} cores")
    print(f"{'model runs in':<30} {'start s':>8} {'wall s':>8} {'CPU s':>8}")
    for name, r in rows.items():
        print(f"{name:<30} {r['start_s']:>8.1f} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f}")
    ours, theirs = rows.values()
    print("same answers:", ours["answers"] == theirs["answers"])
    print(f"RESULT vllm_cpu_uni_over_default_cpu_s {ours['cpu_s'] / theirs['cpu_s']:.3f}")


if __name__ == "__main__":
    main()
