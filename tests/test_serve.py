"""`temper serve` end to end: a real server process on 127.0.0.1 over a real sqlite MLflow
registry, real LoRA adapters on the real base model, driven by the unmodified `openai` SDK
(sync and async) and plain httpx. Only the adapters' weights are made up (registry_fixtures):
what is tested is that the server answers with the registered version, as evaluated.

The module's server is started before any version is champion (so it must answer 503 until
`temper promote` names one), with an API key, a small queue (so 429 is reachable), and a one
second watch interval (so a promotion is picked up quickly). Every test runs on both engines
(`ENGINES`): Temper's own, and vLLM's CPU build in its own virtualenv (`make vllm`), started
and supervised by the gateway, in float32 so that its answers are the evaluated ones exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from registry_fixtures import (
    MODEL,
    ROOT,
    gentle_adapter,
    make_project,
    pattern,
    tiny_adapter,
    train_candidates,
    write_eval,
)
from typer.testing import CliRunner

from temper.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()
KEY = "sk-temper-test-3f9a1c77e2"
CLAUSE = (
    "This Agreement shall be governed by and construed in accordance with the laws of the "
    "State of New York, without regard to its conflict of laws principles."
)
PRIVATE = "Contact jane.roe@example.com about the Harbourview escrow."
# An answer that must be long (the grammar holds the model to 300 characters at least): a
# request that is surely still running a second or two after it started.
LONG = {
    "type": "json_schema",
    "json_schema": {
        "name": "essay",
        "schema": {
            "type": "object",
            "properties": {"essay": {"type": "string", "minLength": 300}},
            "required": ["essay"],
        },
    },
}


# The vLLM cases carry the `vllm` marker: `pytest -m "not vllm"` leaves them out.
ENGINES = ["builtin", pytest.param("vllm", marks=pytest.mark.vllm)]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def engine_args(engine: str) -> list[str]:
    """`temper serve` options for `engine` (vLLM: float32, a small KV cache for 2 cores)."""
    if engine == "builtin":
        return []
    if not VLLM_PYTHON.exists():
        if os.environ.get("CI"):
            raise AssertionError(f"{VLLM_PYTHON} is missing: .ci/run must build it (make vllm)")
        pytest.skip("vLLM's environment is not built (make vllm)")
    return [
        "-S",
        "serve.engine=vllm",
        "-S",
        f"vllm.python={VLLM_PYTHON}",
        "-S",
        "vllm.dtype=float32",
        "-S",
        "vllm.kv_cache_gib=2",
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register(project: Path, adapter: Path, right: int) -> str:
    train_candidates(project, ["r16"], adapter)
    write_eval(project, {"r16": pattern(20, right)}, winner="r16")
    result = runner.invoke(app, ["register"])
    assert result.exit_code == 0, result.output
    return json.loads((project / "metrics" / "register.json").read_text())["version"]


class Running:
    """A `temper serve` process and how to reach it."""

    def __init__(self, project: Path, port: int, log: Path, proc: subprocess.Popen):
        self.project, self.port, self.log, self.proc = project, port, log, proc
        self.url = f"http://127.0.0.1:{port}"
        self.before_ready: httpx.Response | None = None
        self.engine = "builtin"

    def ready(self) -> dict:
        return httpx.get(f"{self.url}/readyz", timeout=10).json()

    def client(self, key: str = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kw)

    def log_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics").text


def start(project: Path, port: int, log: Path, *extra: str, env_keys: str | None = KEY):
    env = {k: v for k, v in os.environ.items() if k != "TEMPER_API_KEYS"}
    if env_keys:
        env["TEMPER_API_KEYS"] = env_keys
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "temper",
            "serve",
            "--port",
            str(port),
            *extra,
            "-S",
            f"serve.log_file={log}",
        ],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log.with_suffix(".stderr"), "w"),  # noqa: SIM115 - lives with the process
        start_new_session=True,
    )


def own_dir(project: Path) -> Path:
    """A folder beside `project` for its server's log, vLLM log and adapter: servers of
    other test modules live in the same temporary root and must not share a log."""
    path = project.parent / f"{project.name}-files"
    path.mkdir(exist_ok=True)
    return path


def serve_champion(project: Path, base_model_dir: Path, *extra: str) -> Running:
    """Register a gentle LoRA version in `project`, promote it, start `temper serve` on it
    (`extra`: more CLI arguments) and wait until it is ready; `stop` ends it."""
    with contextlib.chdir(project):
        register(project, gentle_adapter(base_model_dir, own_dir(project) / "gentle"), 15)
        result = runner.invoke(app, ["promote"])
        assert result.exit_code == 0, result.output
    port = free_port()
    log = own_dir(project) / "serve.log"
    running = Running(project, port, log, start(project, port, log, *extra))
    try:
        wait_until(lambda: httpx.get(f"{running.url}/readyz").status_code == 200, 400, "ready")
    except BaseException:
        stop(running)
        raise
    return running


def stop(running: Running) -> None:
    """SIGKILL the gateway; a vLLM it started must go with it (the engine's guard), not live
    on holding its KV cache."""
    if running.proc.poll() is not None:
        return
    engine_pid = None
    with contextlib.suppress(httpx.HTTPError, ValueError):
        engine_pid = running.ready().get("engine", {}).get("pid")
    os.killpg(running.proc.pid, signal.SIGKILL)
    running.proc.wait()
    if engine_pid is not None:
        try:
            wait_until(lambda: not alive(engine_pid), 60, f"vLLM (pid {engine_pid}) to stop")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(engine_pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Running (a zombie no one reaps yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(check, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        with contextlib.suppress(httpx.TransportError):
            got = check()
            if got:
                return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module", params=ENGINES)
def server(request, tmp_path_factory, base_model_dir):
    extra = engine_args(request.param)
    project = tmp_path_factory.mktemp(f"serve-project-{request.param}")
    make_project(project, base_model_dir)
    with contextlib.chdir(project):
        register(project, gentle_adapter(base_model_dir, own_dir(project) / "gentle"), 15)
        port = free_port()
        log = own_dir(project) / "serve.log"
        proc = start(
            project,
            port,
            log,
            "-S",
            "serve.watch_interval_s=1",
            "-S",
            "serve.max_batch_size=2",
            "-S",
            "serve.max_queue=4",
            "-S",
            "serve.max_body_bytes=200000",
            "-S",
            "serve.drain_timeout_s=150",  # a slow CI machine still finishes the drained answer
            *extra,
        )
        s = Running(project, port, log, proc)
        s.engine = request.param
        auth = {"authorization": f"Bearer {KEY}"}
        # Up, but no champion yet: every model route answers 503 (and says why).
        s.before_ready = wait_until(
            lambda: httpx.get(f"{s.url}/v1/models", headers=auth), 60, "the server to listen"
        )
        assert httpx.get(f"{s.url}/healthz").status_code == 200
        result = runner.invoke(app, ["promote"])
        assert result.exit_code == 0, result.output
        wait_until(lambda: httpx.get(f"{s.url}/readyz").status_code == 200, 400, "ready")
        yield s
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_openai_sdk_models_chat_stream_schema_logprobs(server, base_model_dir):
    assert server.before_ready.status_code == 503
    message = server.before_ready.json()["error"]["message"]  # first try running, or failed
    assert "still loading" in message or "could not be loaded yet" in message, message
    client = server.client()
    models = client.models.list().data
    assert [m.id for m in models] == ["champion"]
    assert models[0].model_extra["version"] == "1" and "smollm2" in models[0].model_extra["parent"]

    # The evaluated answer: the pulled version through the evaluation's own generation.
    from temper import bundle
    from temper.evaluation.generation import generate

    pulled = server.project / ".cache" / "serve" / f"{MODEL}-v1"
    loaded = bundle.load_bundle(pulled, base_model_dir)
    schema = loaded.task.json_schema() if loaded.generation.constrained else None
    want = generate(
        loaded.model,
        loaded.tokenizer,
        [loaded.task.messages(CLAUSE)],
        loaded.generation.max_new_tokens,
        schema=schema,
        progress=False,
        token_scores=True,
    )[0]
    eos = loaded.tokenizer.eos_token_id

    r = client.chat.completions.create(
        model="champion", messages=[{"role": "user", "content": CLAUSE}]
    )
    answer = r.choices[0].message.content
    assert answer == want.text
    assert loaded.task.validate_answer(json.loads(answer)) == []
    assert r.choices[0].finish_reason == "stop"
    assert r.system_fingerprint == f"{MODEL}-v1"
    # The evaluation counts an EOS among its new tokens; OpenAI's usage does not.
    assert r.usage.completion_tokens == len([t for t in want.token_ids if t != eos])
    assert r.usage.prompt_tokens > 20
    assert 0 < r.model_extra["temper"]["confidence"]["clause_type"] <= 1

    parts, usage = [], None
    stream = client.chat.completions.create(
        model="champion",
        messages=[{"role": "user", "content": CLAUSE}],
        stream=True,
        stream_options={"include_usage": True},
    )
    finish = None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        else:
            usage = chunk.usage
    assert "".join(parts) == answer and finish == "stop"
    assert usage.completion_tokens == r.usage.completion_tokens
    assert usage.prompt_tokens == r.usage.prompt_tokens

    custom = {
        "type": "object",
        "properties": {
            "risky": {"type": "boolean"},
            "party": {"type": "string", "maxLength": 30},
        },
        "required": ["risky", "party"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model="champion",
        messages=[{"role": "user", "content": CLAUSE}],
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": custom}},
        max_tokens=60,
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), custom)
    r = client.chat.completions.create(
        model="champion",
        messages=[{"role": "user", "content": CLAUSE}],
        response_format={"type": "json_object"},
    )
    assert loaded.task.validate_answer(json.loads(r.choices[0].message.content)) == []

    r = client.chat.completions.create(
        model="champion",
        messages=[{"role": "user", "content": CLAUSE}],
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in content)
    assert "".join(t.token for t in content).strip() == r.choices[0].message.content

    r = client.chat.completions.create(
        model="champion", messages=[{"role": "user", "content": CLAUSE}], stop=["type"]
    )
    assert r.choices[0].finish_reason == "stop" and "type" not in r.choices[0].message.content
    r = client.chat.completions.create(
        model="champion",
        messages=[{"role": "user", "content": CLAUSE}],
        max_tokens=3,
        response_format={"type": "text"},
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    sampled = [
        client.chat.completions.create(
            model="champion",
            messages=[{"role": "user", "content": CLAUSE}],
            temperature=0.9,
            seed=7,
            response_format={"type": "text"},
            max_tokens=12,
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # a seeded sample repeats

    async def together():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        texts = [f"{CLAUSE} Section {i}." for i in range(4)]
        rs = await asyncio.gather(
            *(
                aclient.chat.completions.create(
                    model="champion", messages=[{"role": "user", "content": t}]
                )
                for t in texts
            )
        )
        await aclient.close()
        return rs

    before = batches(server)
    rs = asyncio.run(together())
    assert all(
        loaded.task.validate_answer(json.loads(x.choices[0].message.content)) == [] for x in rs
    )
    if server.engine == "builtin":  # vLLM batches inside itself (continuous batching)
        assert batches(server) - before < 4  # four concurrent requests, fewer batches
    text = server.metrics()
    for name in (
        "gen_ai_server_request_duration_seconds_bucket",
        "gen_ai_server_time_to_first_token_seconds_count",
        "gen_ai_server_time_per_output_token_seconds_count",
        'gen_ai_server_token_usage_total{gen_ai_operation_name="chat",'
        'gen_ai_request_model="champion",gen_ai_token_type="output"}',
        "temper_queue_depth",
        'temper_adapter_loaded{model_id="champion",registered_model="temper-clause-review",'
        'version="1"} 1.0',
    ):
        assert name in text, name


def test_the_registered_version_is_an_mlflow_pyfunc_model(server, base_model_dir):
    """`mlflow.pyfunc.load_model` and `mlflow models serve` answer as `temper serve` does."""
    if server.engine != "builtin":
        pytest.skip("the pyfunc model does not depend on the engine; checked on builtin")
    import mlflow
    import pandas as pd

    uri = f"sqlite:///{server.project / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    served = server.client().chat.completions.create(
        model="champion", messages=[{"role": "user", "content": CLAUSE}]
    )
    model = mlflow.pyfunc.load_model(
        f"models:/{MODEL}@champion", model_config={"base_dir": str(base_model_dir)}
    )
    out = model.predict(pd.DataFrame({"text": [CLAUSE, PRIVATE]}))
    assert list(out.columns[:2]) == ["clause_type", "key_term"] and len(out) == 2
    assert out["output"][0] == served.choices[0].message.content
    assert out["schema_valid"].all() and 0 < out["confidence.clause_type"][0] <= 1

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TEMPER_BASE_DIR": str(base_model_dir)}
    proc = subprocess.Popen(
        [
            "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/{MODEL}@champion",
            "--env-manager",
            "local",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=server.project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/ping").status_code == 200,
            180,
            "mlflow models serve",
        )
        got = httpx.post(
            f"http://127.0.0.1:{port}/invocations",
            json={"dataframe_split": {"columns": ["text"], "data": [[CLAUSE]]}},
            timeout=120,
        )
        assert got.status_code == 200, got.text
        assert got.json()["predictions"][0]["output"] == served.choices[0].message.content
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_engine_vllm_checks_the_adapter_and_prints_the_command(server):
    if server.engine != "builtin":
        pytest.skip("a CLI check of the registered adapter: once is enough")
    with contextlib.chdir(server.project):
        result = runner.invoke(app, ["serve", "--engine", "vllm", "--print-command"])
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve ")
    assert "--enable-lora" in line and '\'{"backend": "guidance"}\'' in line
    assert f"--lora-modules champion={server.project}/.cache/serve/{MODEL}-v" in line
    assert "--max-lora-rank 8" in line  # rank 2 adapters: vLLM's smallest choice above 1


def batches(server: Running) -> float:
    for line in server.metrics().splitlines():
        if line.startswith("temper_batch_size_count"):
            return float(line.split()[-1])
    return 0.0


def test_every_error_status_in_openai_shape(server):
    client = server.client()
    chat = {"model": "champion", "messages": [{"role": "user", "content": CLAUSE}]}
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(**chat, extra_body={"bogus": 1})
    assert bad.value.body["param"] == "bogus" and bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(**chat, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(
            model="champion", messages=[{"role": "user", "content": "clause " * 2500}]
        )
    assert long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError) as denied:
        server.client(key="sk-wrong").chat.completions.create(**chat)
    assert denied.value.body["code"] == "invalid_api_key"
    missing = httpx.post(f"{server.url}/v1/chat/completions", json=chat)
    assert missing.status_code == 401 and "Missing API key" in missing.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(**{**chat, "model": "nope"})
    assert unknown.value.body["code"] == "model_not_found"
    malformed = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b'{"model": "champion", "messages": [',
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    assert malformed.status_code == 400
    assert malformed.json()["error"]["type"] == "invalid_request_error"
    big = {"model": "champion", "messages": [{"role": "user", "content": "x" * 300_000}]}
    with pytest.raises(openai.APIStatusError) as large:
        client.chat.completions.create(**big)
    assert large.value.status_code == 413
    assert large.value.body["code"] == "request_too_large"

    async def burst():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        got = await asyncio.gather(
            *(
                aclient.chat.completions.with_raw_response.create(
                    **chat, response_format={"type": "text"}, max_tokens=8
                )
                for _ in range(12)
            ),
            return_exceptions=True,
        )
        await aclient.close()
        return got

    got = asyncio.run(burst())
    limited = [g for g in got if isinstance(g, openai.RateLimitError)]
    assert limited, got  # 2 running + 4 queued at most: the rest are refused
    assert limited[0].response.headers["retry-after"] == "1"
    odd = [g for g in got if isinstance(g, Exception) and not isinstance(g, openai.RateLimitError)]
    assert odd == [], [(type(g).__name__, getattr(g, "body", None)) for g in odd]
    rid = httpx.get(
        f"{server.url}/v1/models",
        headers={"authorization": f"Bearer {KEY}", "x-request-id": "trace-42"},
    )
    assert rid.headers["x-request-id"] == "trace-42"


def test_a_client_leaving_mid_stream_frees_its_slot(server):
    body = {
        "model": "champion",
        "messages": [{"role": "user", "content": CLAUSE}],
        "stream": True,
        "max_tokens": 400,
        "response_format": LONG,
    }
    headers = {"authorization": f"Bearer {KEY}", "x-request-id": "leaver-1"}
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        for i, _ in enumerate(response.iter_lines()):
            if i >= 4:
                break
    line = wait_until(
        lambda: next((x for x in server.log_lines() if x.get("request_id") == "leaver-1"), None),
        30,
        "the request's log line",
    )
    assert line.get("cancelled") is True
    assert line["status"] == 200
    assert line["status"] == 200


def test_promotion_swaps_versions_under_load_without_failures(server):
    with contextlib.chdir(server.project):
        v2 = register(server.project, tiny_adapter(str(server.project / "models" / "base")), 16)
    assert v2 == "2"
    client = server.client(timeout=60)
    results: list[tuple[float, str | None, str | None]] = []
    stop = threading.Event()

    def keep_asking(i: int) -> None:
        while not stop.is_set():
            try:
                r = client.chat.completions.create(
                    model="champion",
                    messages=[{"role": "user", "content": f"{CLAUSE} ({i})"}],
                    max_tokens=16,
                )
                results.append((time.time(), r.system_fingerprint, None))
            except Exception as err:  # noqa: BLE001 - every failure is counted
                results.append((time.time(), None, repr(err)))

    threads = [threading.Thread(target=keep_asking, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: len(results) >= 4, 120, "answers from v1")
    with contextlib.chdir(server.project):
        result = runner.invoke(app, ["promote"])
    assert result.exit_code == 0, result.output
    promoted = time.time()
    wait_until(lambda: any(f == f"{MODEL}-v2" for _, f, _ in results), 120, "answers from v2")
    switched = min(t for t, f, _ in results if f == f"{MODEL}-v2")
    # Requests in flight at the swap may still end on v1; 5 s on, all must be v2. (Waiting for
    # 4 more answers after the switch was flaky: fast ones all came within those 5 s.)
    settled = switched + 5
    wait_until(lambda: sum(t > settled for t, _, _ in results) >= 4, 120, "answers after 5 s")
    stop.set()
    for t in threads:
        t.join()
    failures = [e for _, _, e in results if e]
    assert failures == [], failures
    after = [f for t, f, _ in results if t > settled]
    assert len(after) >= 4 and set(after) == {f"{MODEL}-v2"}
    assert {f for t, f, _ in results if t < promoted} == {f"{MODEL}-v1"}
    # Within the watch interval (1 s) plus pulling and loading the new version.
    assert switched - promoted < 60, switched - promoted
    text = server.metrics()
    assert 'version="2"} 1.0' in text
    wait_until(lambda: 'version="1"} 0.0' in server.metrics(), 30, "v1 freed")
    messages = [x["msg"] for x in server.log_lines()]
    assert any("swapped champion: v1 -> v2" in m for m in messages)
    assert any("freed temper-clause-review-v1" in m for m in messages)
    if server.engine == "vllm":  # one base, the new adapter loaded at runtime, the old unloaded
        # (named in vLLM by label and adapter hash: `engines.lora_name`)
        (loaded,) = server.ready()["engine"]["adapters"]
        assert re.fullmatch(rf"{MODEL}-v2-[0-9a-f]{{12}}", loaded), loaded
        assert any(f"vLLM unloaded adapter {MODEL}-v1-" in m for m in messages)


def test_engine_killed_under_load_answers_503_then_serves_again(server):
    """kill -9 of vLLM under load: every request ends (200 or OpenAI's 503, none hangs), the
    gateway restarts the engine with the served adapter, and answers again, itself untouched."""
    if server.engine != "vllm":
        pytest.skip("the built-in engine runs inside the gateway process")
    before = server.ready()["engine"]
    pid = before["pid"]
    client = server.client(timeout=90)
    results: list[tuple[float, float, int | None, object]] = []
    stop = threading.Event()

    def keep_asking(i: int) -> None:
        while not stop.is_set():
            t0 = time.time()
            try:
                client.chat.completions.create(
                    model="champion",
                    messages=[{"role": "user", "content": f"{CLAUSE} ({i})"}],
                    max_tokens=16,
                )
                results.append((t0, time.time(), 200, None))
            except openai.APIStatusError as err:
                results.append((t0, time.time(), err.status_code, err.body))
                time.sleep(0.2)
            except Exception as err:  # noqa: BLE001 - counted: must not happen
                results.append((t0, time.time(), None, repr(err)))

    threads = [threading.Thread(target=keep_asking, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: sum(r[2] == 200 for r in results) >= 3, 120, "answers before")
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        wait_until(lambda: any(r[2] == 503 for r in results), 60, "503 after the kill")
        wait_until(lambda: server.ready().get("engine", {}).get("restarts") == 1, 400, "restart")
        back = time.time()
        wait_until(lambda: sum(r[2] == 200 and r[0] > back for r in results) >= 3, 120, "answers")
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert server.proc.poll() is None  # the gateway itself never restarted
    assert {r[2] for r in results} <= {200, 503}, [r for r in results if r[2] not in (200, 503)]
    failed = [r for r in results if r[2] == 503]
    assert all(r[3]["type"] == "service_unavailable" for r in failed), failed[:3]
    assert max(end - t0 for t0, end, _, _ in results if t0 > killed) < 60  # none hangs
    engine = server.ready()["engine"]
    assert engine["up"] and engine["pid"] != pid and engine["adapters"] == before["adapters"]
    assert "temper_engine_restarts_total 1.0" in server.metrics()


def test_sigterm_drains_in_flight_requests_and_the_log_holds_no_key_or_prompt(server):
    client = server.client(timeout=180)
    with pytest.raises(openai.AuthenticationError):  # a wrong key, and prompt text
        server.client(key="sk-wrong").chat.completions.create(
            model="champion", messages=[{"role": "user", "content": PRIVATE}]
        )
    out: dict = {}
    # Still generating when the signal comes 1 s in: ~8 s of tokens on either engine here
    # (vLLM's CPU LoRA path is slower per token than the built-in engine).
    budget = 200 if server.engine == "builtin" else 80

    def ask():
        try:
            out["r"] = client.chat.completions.create(
                model="champion",
                messages=[{"role": "user", "content": PRIVATE}],
                max_tokens=budget,
                response_format=LONG,
            )
        except Exception as err:  # noqa: BLE001
            out["err"] = err

    engine_pid = server.ready()["engine"].get("pid")
    t = threading.Thread(target=ask)
    t.start()
    time.sleep(1.0)  # in flight
    os.killpg(server.proc.pid, signal.SIGTERM)
    t.join(180)
    assert "err" not in out, out.get("err")
    assert out["r"].choices[0].message.content
    # uvicorn drains, shuts the app down, then re-raises the SIGTERM it caught (so the exit
    # status says what stopped the process, as for any SIGTERM'd program).
    assert server.proc.wait(180) in (0, -signal.SIGTERM)
    lines = server.log_lines()
    down = next(i for i, x in enumerate(lines) if x["msg"] == "Shutting down")
    done = next(i for i, x in enumerate(lines) if x["msg"] == "Application shutdown complete.")
    drained = [x for x in lines[down:done] if x["msg"] == "request"]
    assert drained and drained[0]["status"] == 200  # finished after the signal, not cut off
    assert not [x for x in lines[down:] if x.get("level") in ("error", "critical")]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/healthz")
    if engine_pid is not None:  # the supervised vLLM stopped with the gateway
        with pytest.raises(ProcessLookupError):
            os.kill(engine_pid, 0)
    log = server.log.read_text()
    assert KEY not in log and "sk-wrong" not in log
    assert "jane.roe" not in log and "Harbourview" not in log and "governed by" not in log
    assert '"request_id"' in log and '"status": 401' in log


def test_non_loopback_bind_without_keys_refuses_to_start(tmp_path):
    port = free_port()
    log = tmp_path / "refused.log"
    proc = start(ROOT, port, log, "--host", "0.0.0.0", env_keys=None)
    assert proc.wait(120) == 2
    assert "no API key is set" in log.with_suffix(".stderr").read_text()
