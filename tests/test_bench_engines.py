"""`scripts/bench_engines.py --smoke` runs end to end (seconds of load, not a timing): the
built-in engine, vLLM alone, and the gateway attached to that vLLM by `serve.engine_url` (the
path a platform team that runs vLLM itself takes), each answering real test clauses."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys

import pytest
from registry_fixtures import ROOT, gentle_adapter, make_project
from test_serve import VLLM_PYTHON, engine_args, register, runner

from temper.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_bench_engines_smoke(tmp_path, base_model_dir, prepared_dir):
    engine_args("vllm")  # skips (or fails in CI) when vLLM's environment is missing
    project = tmp_path / "project"
    project.mkdir()
    make_project(project, base_model_dir)
    bundle = tmp_path / "bundle"
    with contextlib.chdir(project):
        register(project, gentle_adapter(base_model_dir, tmp_path / "gentle"), 15)
        uri = "models:/temper-clause-review@challenger"
        pulled = runner.invoke(app, ["pull", uri, "-o", str(bundle)])
        assert pulled.exit_code == 0, pulled.output
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_engines.py"),
            "--smoke",
            "--bundle",
            str(bundle),
            "--test",
            str(prepared_dir / "test.jsonl"),
            "-S",
            f"vllm.python={VLLM_PYTHON}",
            "-S",
            "vllm.kv_cache_gib=2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert re.fullmatch(r"RESULT builtin_vs_vllm_ratio \d+\.\d{3}", lines[-1]), lines[-3:]
    assert re.fullmatch(r"RESULT gateway_overhead_ratio \d+\.\d{3}", lines[-2]), lines[-3:]
    for system in ("builtin", "vllm-direct", "gateway-vllm", "gateway-vllm-rescore"):
        assert f"| {system} | 2 |" in done.stdout, system
    assert "vLLM peak memory" in done.stdout
    agree = next(x for x in lines if x.startswith("agreement with the built-in engine:"))
    assert '"gateway-vllm-rescore": {"answers": 2' in agree, agree
