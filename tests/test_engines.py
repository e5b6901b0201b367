"""The engine boundary's fast parts (no model, no vLLM process): how the gateway starts vLLM
(command line and environment), what a job becomes as a vLLM request, how a streamed chunk is
taken (EOS out, as OpenAI's usage counts), and how engine failures reach the client. The real
engines run in test_serve.py, test_serve_route.py and test_evaluate_vllm.py."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from temper.engines import EngineRejected, EngineUnavailable, VllmConfig, VllmServer
from temper.engines.vllm_server import lora_rank_choice
from temper.online.serve.completions import failure
from temper.online.serve.config import ServeConfig
from temper.online.serve.engine import Job, Sampling
from temper.online.serve.metrics import ServeMetrics
from temper.online.serve.scheduler import QueueFull
from temper.online.serve.vllm_engine import VllmEngine


def test_the_vllm_command_line_and_environment(tmp_path):
    cfg = VllmConfig(dtype="float32", kv_cache_gib=3, device="cpu", extra_args=["--seed", "1"])
    server = VllmServer(cfg, "/models/base", tmp_path / "vllm.log", max_lora_rank=12)
    argv = server.argv()
    # vLLM's server module under the guard that stops it when its starter (this process) dies
    assert argv[:2] == [cfg.python, "-c"] and argv[3] == str(os.getpid())
    assert 'run_module("vllm.entrypoints.openai.api_server"' in argv[2]
    assert argv[argv.index("--host") + 1] == "127.0.0.1"  # private: only the gateway calls it
    assert argv[argv.index("--max-lora-rank") + 1] == "16"  # the smallest vLLM choice >= 12
    assert argv[argv.index("--structured-outputs-config") + 1] == '{"backend": "guidance"}'
    assert "--enable-lora" in argv and argv[-2:] == ["--seed", "1"]
    # CPU: small KV blocks, so a one-token rescoring request reuses nearly all of its prefix
    assert argv[argv.index("--block-size") + 1] == "32"
    # CPU: the model inside the engine process, on all cores but one unless vllm.cpu_threads
    assert argv[argv.index("--distributed-executor-backend") + 1] == "uni"
    assert server.env()["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert server.env()["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 2) - 1))
    three = VllmServer(cfg.model_copy(update={"cpu_threads": 3}), "/models/base", tmp_path / "l")
    assert three.env()["OMP_NUM_THREADS"] == "3"
    gpu = VllmServer(cfg.model_copy(update={"device": "cuda"}), "/models/base", tmp_path / "l")
    assert "--block-size" not in gpu.argv()  # vLLM's own choice on a GPU, unless set
    assert "--distributed-executor-backend" not in gpu.argv()  # vLLM's own executor on GPUs
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in gpu.env()
    chosen = cfg.model_copy(update={"device": "cuda", "block_size": 64})
    argv = VllmServer(chosen, "/models/base", tmp_path / "l").argv()
    assert argv[argv.index("--block-size") + 1] == "64"
    env = server.env()
    assert env["VLLM_TARGET_DEVICE"] == "cpu" and env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_API_KEY"] == server.key and len(server.key) >= 24
    assert [lora_rank_choice(r) for r in (1, 2, 8, 9, 64, 65)] == [1, 8, 8, 16, 64, 128]


def test_a_missing_vllm_environment_is_one_clear_error(tmp_path):
    cfg = VllmConfig(python=str(tmp_path / "nope" / "python"))
    with pytest.raises(EngineUnavailable, match="make vllm"):
        VllmServer(cfg, tmp_path, tmp_path / "vllm.log").start()


class Tokenizer:
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(96 + i) for i in ids if i != 2)


def engine(**serve) -> VllmEngine:
    return VllmEngine(ServeConfig(**serve), VllmConfig(), ServeMetrics(), Path("."))


def context(schema=None):
    served = SimpleNamespace(model="temper-clause-review-v3", tokenizer=Tokenizer())
    constraint = SimpleNamespace(schema=schema) if schema else None
    return SimpleNamespace(served=served, constraint=constraint, sampling=Sampling(0.7, 0.9, 5))


def test_a_job_becomes_one_vllm_completion_over_token_ids():
    job = Job(prompt_ids=[5, 6, 7], max_new_tokens=40, key=(), stops=["END"], top_logprobs=2)
    body = engine().body(job, context({"type": "object", "x-guidance": {}}))
    assert body["model"] == "temper-clause-review-v3" and body["prompt"] == [5, 6, 7]
    assert body["max_tokens"] == 40 and body["stop"] == ["END"] and body["logprobs"] == 2
    assert (body["temperature"], body["top_p"], body["seed"]) == (0.7, 0.9, 5)
    assert body["response_format"]["json_schema"]["schema"] == {"type": "object", "x-guidance": {}}
    assert body["return_token_ids"] and body["return_tokens_as_token_ids"]


def test_a_chunk_s_tokens_are_taken_without_eos():
    job = Job(prompt_ids=[1], max_new_tokens=8, key=(), top_logprobs=1)
    choice = {
        "token_ids": [3, 4, 2],
        "logprobs": {
            "token_logprobs": [-0.1, -0.2, -0.3],
            "top_logprobs": [{"token_id:3": -0.1}, {"token_id:9": -0.05}, {"token_id:2": -0.3}],
        },
    }
    engine()._take_tokens(job, choice, {2}, Tokenizer())
    assert job.token_ids == [3, 4] and job.logprobs == [-0.1, -0.2]
    assert job.top == [[(3, -0.1)], [(9, -0.05)]]


def test_engine_failures_reach_the_client_as_503_or_400():
    down = failure(EngineUnavailable("connection refused"))
    assert down.status == 503 and down.code == "engine_unavailable"
    assert down.headers["retry-after"] == "5" and down.type == "service_unavailable"
    refused = failure(EngineRejected("vLLM completion: HTTP 400: bad schema"))
    assert refused.status == 400 and "bad schema" in refused.message
    assert failure(RuntimeError("boom")).status == 500


def test_submit_refuses_when_the_engine_is_down_or_full():
    vllm = engine(max_batch_size=1, max_queue=1)
    job = Job(prompt_ids=[1], max_new_tokens=8, key=())
    with pytest.raises(EngineUnavailable):
        vllm.submit(job, context(), lambda j: None)  # not started: no engine yet

    async def fill() -> None:
        vllm.up.set()
        vllm.tasks = {1: None, 2: None}  # max_batch_size + max_queue in flight
        with pytest.raises(QueueFull):
            vllm.submit(job, context(), lambda j: None)

    asyncio.run(fill())


def test_serve_with_no_vllm_environment_stops_before_loading_anything(tmp_path):
    from temper.config import ConfigError
    from temper.online.serve import serve

    cfg = ServeConfig(engine="vllm", log_file=str(tmp_path / "serve.log"))
    with pytest.raises(ConfigError, match="make vllm"):
        serve(cfg, [], vllm_cfg=VllmConfig(python=str(tmp_path / "missing" / "python")))


class FlakyVllm:
    """A stand-in for vLLM's streamed `/v1/completions` on a real loopback socket: the first
    `drops` requests lose their connection before any answer (a dropped keep-alive, a reset),
    the others stream tokens 3, 4 and EOS."""

    def __init__(self, drops: int):
        import socket

        self.drops, self.requests = drops, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        chunk = {"choices": [{"token_ids": [3, 4, 2], "text": "cd", "finish_reason": "stop"}]}
        body = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                self.requests += 1
                if self.requests <= self.drops:
                    continue  # closed without a byte of answer
                head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                head += f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
                conn.sendall(head.encode() + body)


def run_job(server: FlakyVllm, emit=None) -> Job:
    """One job through the engine attached to `server`, as the gateway runs it."""
    vllm = engine(engine_url=server.url)
    vllm.up.set()
    job = Job(prompt_ids=[1], max_new_tokens=8, key=(), emit=emit)

    async def go() -> None:
        finished = asyncio.Event()
        vllm.submit(job, context(), lambda j: finished.set())
        await finished.wait()
        await vllm.client.aclose()

    asyncio.run(go())
    server.sock.close()
    return job


def test_a_connection_lost_before_any_token_is_tried_once_more():
    server = FlakyVllm(drops=1)
    job = run_job(server)
    assert job.error is None and job.token_ids == [3, 4] and job.text == "cd"
    assert server.requests == 2


def test_a_second_loss_reaches_the_client_as_engine_unavailable():
    server = FlakyVllm(drops=2)
    job = run_job(server, emit=lambda text, entries: None)
    assert isinstance(job.error, EngineUnavailable) and server.requests == 2
