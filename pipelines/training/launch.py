"""Launching: in this process for single-process Accelerate configs, else `accelerate launch`.

The Accelerate configs are `configs/accelerate/<name>.yaml`, chosen by `train.accelerate`.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from ..config import ConfigError, read_yaml

log = logging.getLogger(__name__)

ACCELERATE_DIR = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


def accelerate_config(name: str) -> Path:
    path = Path(name) if name.endswith((".yaml", ".yml")) else ACCELERATE_DIR / f"{name}.yaml"
    if not path.exists():
        have = sorted(p.stem for p in ACCELERATE_DIR.glob("*.yaml"))
        raise ConfigError(f"train.accelerate={name!r}: no {path} (shipped: {have})")
    return path


def needs_launcher(config_path: Path) -> bool:
    """Single-process configs run in this process; anything distributed goes through
    `accelerate launch` (one process per device, DDP/FSDP wiring)."""
    acc = read_yaml(config_path)
    return int(acc.get("num_processes", 1)) > 1 or acc.get("distributed_type", "NO") not in (
        "NO",
        "no",
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(config_path: Path, argv: list[str]) -> None:
    """Run `python -m temper <argv>` under `accelerate launch --config_file ...` (one process
    per device; `argv` is a `temper train --launched ...` command line).

    On a machine without CUDA, multi-process configs run as CPU DDP over gloo:
    `ACCELERATE_USE_CPU=1` with the multi-GPU launcher is the combination that starts
    synchronised processes (`--cpu --num_processes 2` starts only one).
    """
    import torch

    env = dict(os.environ)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_path),
        "--main_process_port",
        str(free_port()),
    ]
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd += ["--num_cpu_threads_per_process", env["OMP_NUM_THREADS"]]
    cmd += ["-m", "temper", *argv]
    log.info("launching: %s", " ".join(cmd))
    subprocess.run(cmd, env=env, check=True)
