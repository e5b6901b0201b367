"""Every `scripts/bench_*.py` in its smoke mode: it runs and ends with its `RESULT` line (a bench
nothing runs breaks unseen: bench_prepare failed at once on main when prepare began to refuse
sources outside `prepare.source_dir`, bench_train's trl arms when `train.target_modules` became
`all-linear`).

`--smoke` only shrinks the work (a few records, requests or steps) and needs nothing a fresh
clone lacks after `make install`: what a bench reads it builds in a temp folder (a bundle, a
prepared set) or, the base model, into `models/base` as `dvc repro base_model` would. The
benches that load the model or start servers are slow; bench_engines also runs vLLM's CPU build
(`make vllm`): the built-in engine, vLLM alone, and the gateway attached to that vLLM in both
confidence modes, each answering one real test clause. Its vLLM is the session's
(`--engine-url`, conftest.shared_vllm): the bench's own start is `VllmServer.start`, which
test_serve runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_serve import VLLM_PYTHON, engine_args

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"\d+(?:\.\d+)?"

# bench -> (its RESULT names, last line last; extra arguments; timeout s); marks per bench.
BENCHES = {
    "bench_distil": (["distil_wall_over_ideal"], [], 120),
    "bench_monitor": (["monitor_submit_overhead_ratio"], [], 120),
    "bench_prepare": (["prepare_records_per_s"], [], 300),
    "bench_eval": (["eval_batched_speedup"], [], 600),
    "bench_serve": (["serve_batched_throughput_ratio"], [], 600),
    "bench_train": (["train_tokens_per_s_ratio"], [], 600),
    "bench_engines": (
        ["gateway_overhead_ratio", "builtin_vs_vllm_ratio"],
        ["-S", f"vllm.python={VLLM_PYTHON}", "-S", "vllm.kv_cache_gib=2"],
        900,
    ),
}
MARKS = {
    "bench_prepare": [pytest.mark.slow],  # prepare reads the base model's tokenizer
    "bench_eval": [pytest.mark.slow],
    "bench_serve": [pytest.mark.slow],
    "bench_train": [pytest.mark.slow],
    "bench_engines": [pytest.mark.slow, pytest.mark.vllm],
}


def test_every_bench_is_here():
    assert {p.stem for p in (ROOT / "scripts").glob("bench_*.py")} == set(BENCHES)


def run_smoke(bench: str, *more: str, env: dict | None = None) -> subprocess.CompletedProcess:
    _, extra, timeout = BENCHES[bench]
    return subprocess.run(
        [sys.executable, f"scripts/{bench}.py", "--smoke", *extra, *more],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize("bench", [pytest.param(b, marks=MARKS.get(b, []), id=b) for b in BENCHES])
def test_bench_smoke(bench, request):
    if bench in MARKS:  # the real base model, built once for the session (not by each bench)
        request.getfixturevalue("base_model_dir")
    more, env = [], None
    if bench == "bench_engines":  # on the session's vLLM (`--engine-url`), not one of its own
        engine_args("vllm")  # skips (or fails in CI) when vLLM's environment is missing
        vllm = request.getfixturevalue("shared_vllm")
        more, env = ["--engine-url", vllm.url], {**os.environ, "VLLM_API_KEY": vllm.key}
    done = run_smoke(bench, *more, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names, _, _ = BENCHES[bench]
    lines = done.stdout.strip().splitlines()
    tail = lines[-len(names) :]
    for name, line in zip(names, tail, strict=True):
        found = re.fullmatch(rf"RESULT {name} ({NUMBER})", line)
        assert found, lines[-5:]
        assert float(found[1]) > 0, line  # rates and ratios of work that was done
    if bench == "bench_engines":
        for system in ("builtin", "vllm-direct", "gateway-vllm", "gateway-vllm-rescore"):
            assert f"| {system} | 1 |" in done.stdout, system
        assert f"vLLM peak memory: not measured (attached to {vllm.url})" in done.stdout
        agree = next(x for x in lines if x.startswith("agreement with the built-in engine:"))
        assert '"gateway-vllm-rescore": {"answers": 1' in agree, agree
