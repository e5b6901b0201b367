"""`temper serve`'s parts without a model: keys, the bind check, the protocol's errors, the
micro-batcher's policy (with a plain function as its runner), the vLLM adapter check, the log
lines. The server itself, on the real model and registry, is tests/test_serve.py."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from temper.config import ConfigError
from temper.online.serve import auth, vllm
from temper.online.serve.engine import Job
from temper.online.serve.logs import JsonFormatter
from temper.online.serve.protocol import ApiError, ChatRequest, validation_error
from temper.online.serve.scheduler import QueueFull, Scheduler


def test_keys_from_file_and_env_are_kept_as_digests_and_checked(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text(f"# team keys\nplain-key-1\n\nsha256:{auth.digest('hashed-key-2')}\n")
    monkeypatch.setenv("TEMPER_TEST_KEYS", "env-key-3, ")
    digests = auth.load_keys(str(keys), "TEMPER_TEST_KEYS")
    assert len(digests) == 3 and "plain-key-1" not in "".join(digests)
    for key in ("plain-key-1", "hashed-key-2", "env-key-3"):
        assert auth.allowed(f"Bearer {key}", digests)
    for header in ("Bearer wrong", "plain-key-1", None, "Basic plain-key-1"):
        assert not auth.allowed(header, digests)
    assert auth.allowed(None, [])  # no keys: open (only a loopback bind allows that)


def test_bad_key_file_names_file_and_line(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("ok\nsha256:abc\n")
    with pytest.raises(ConfigError, match=r"keys:2: `sha256:` needs 64 hex digits"):
        auth.load_keys(str(keys), "UNSET_VARIABLE_X")
    with pytest.raises(ConfigError, match="api_keys_file"):
        auth.load_keys(str(tmp_path / "missing"), "UNSET_VARIABLE_X")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.org"])
def test_bind_beyond_loopback_needs_keys(host):
    with pytest.raises(ConfigError, match="no API key is set"):
        auth.check_bind(host, [])
    auth.check_bind(host, [auth.digest("k")])


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.5"])
def test_loopback_bind_needs_no_keys(host):
    auth.check_bind(host, [])


def request(**extra):
    return {"model": "champion", "messages": [{"role": "user", "content": "x"}], **extra}


@pytest.mark.parametrize(
    ("body", "param", "text"),
    [
        (request(bogus=1), "bogus", "Unrecognized request argument supplied: bogus"),
        (request(temperature=3), "temperature", "temperature:"),
        (request(n=2), "n", "n:"),
        (request(stop=["a", "b", "c", "d", "e"]), "stop", "up to 4"),
        ({"model": "champion", "messages": []}, "messages", "messages:"),
        (request(messages=[{"role": "robot", "content": "x"}]), "messages.0.role", "role"),
        (request(response_format={"type": "xml"}), "response_format.type", "type"),
    ],
)
def test_bad_requests_name_the_field(body, param, text):
    with pytest.raises(ValidationError) as info:
        ChatRequest.model_validate(body)
    err = validation_error(list(info.value.errors()))
    assert err.status == 400 and err.param == param and text in err.message
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_request_fields_and_budget():
    req = ChatRequest.model_validate(
        request(
            stop="END",
            max_completion_tokens=7,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {}}},
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ],
        )
    )
    assert req.stop == ["END"] and req.budget(10) == 7 and req.messages[0].text() == "ab"
    assert req.response_format.json_schema.schema_ == {}
    with pytest.raises(ApiError, match="at most 5"):
        req.budget(5)


def job(key, n=1):
    return Job(prompt_ids=[1] * n, max_new_tokens=1, key=key)


def test_scheduler_batches_jobs_that_share_a_key_and_keeps_others_apart():
    batches: list[list[Job]] = []
    gate = threading.Event()

    def runner(batch):
        gate.wait(5)  # the first batch holds the worker while the rest queue up
        batches.append(batch.jobs)

    done = []
    s = Scheduler(runner, max_batch_size=3, max_wait_s=0.05, max_queue=10)
    s.start()
    first = job("a")
    s.submit(first, None, done.append)
    time.sleep(0.2)  # the worker took `first` alone and is waiting on the gate
    jobs = [job("a"), job("b"), job("a"), job("a"), job("a")]
    for j in jobs:
        s.submit(j, None, done.append)
    gate.set()
    s.stop()
    assert [len(b) for b in batches] == [1, 3, 1, 1]
    assert batches[1] == [jobs[0], jobs[2], jobs[3]]  # oldest first, same key only
    assert batches[2] == [jobs[1]] and batches[3] == [jobs[4]]
    assert len(done) == 6


def test_scheduler_refuses_beyond_its_queue_and_drops_cancelled_jobs():
    gate = threading.Event()
    ran: list[Job] = []

    def runner(batch):
        gate.wait(5)
        ran.extend(batch.jobs)

    done: list[Job] = []
    s = Scheduler(runner, max_batch_size=1, max_wait_s=0, max_queue=2)
    s.start()
    s.submit(job("a"), None, done.append)
    time.sleep(0.2)
    queued = [job("a"), job("a")]
    for j in queued:
        s.submit(j, None, done.append)
    with pytest.raises(QueueFull):
        s.submit(job("a"), None, done.append)
    s.cancel(queued[0])
    assert queued[0] in done and queued[0].finish_reason == "cancelled"
    gate.set()
    s.stop()
    assert queued[0] not in ran and queued[1] in ran


def test_a_failing_batch_fails_its_jobs_and_the_worker_lives_on():
    calls = []

    def runner(batch):
        calls.append(len(batch.jobs))
        if len(calls) == 1:
            raise RuntimeError("boom")

    done: list[Job] = []
    s = Scheduler(runner, max_batch_size=1, max_wait_s=0, max_queue=5)
    s.start()
    a, b = job("a"), job("a")
    s.submit(a, None, done.append)
    s.submit(b, None, done.append)
    s.stop()
    assert isinstance(a.error, RuntimeError) and b.error is None and len(done) == 2


def adapter(tmp_path: Path, **config) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    base = {"peft_type": "LORA", "r": 16, "target_modules": ["q_proj", "v_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps({**base, **config}))
    return folder


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "embedding/lm_head"),
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "LoRA only"),
        ({"r": 1024}, "rank 1024"),
    ],
)
def test_vllm_refuses_adapters_it_cannot_load(tmp_path, config, reason):
    with pytest.raises(vllm.VllmIncompatible, match=reason):
        vllm.check_adapter(adapter(tmp_path, **config))


def test_vllm_accepts_a_plain_lora_and_reports_its_rank(tmp_path):
    assert vllm.check_adapter(adapter(tmp_path, r=24, rank_pattern={"q_proj": 40})) == 40


def test_json_log_lines_carry_extras_but_not_uvicorns_colours():
    record = logging.LogRecord("temper.serve", logging.INFO, __file__, 1, "request", None, None)
    record.request_id, record.status, record.color_message = "abc", 200, "\x1b[36m"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "request" and line["request_id"] == "abc" and line["status"] == 200
    assert "color_message" not in line and line["level"] == "info"


def test_unreachable_registry_keeps_the_current_version_and_says_so(tmp_path, monkeypatch, caplog):
    """A real MLflow client against a port nobody listens on: the watch round fails, the
    served version stays, the log and `temper_registry_up` say so, and recovery is logged."""
    import mlflow
    from prometheus_client import generate_latest

    from temper.bundle import GenerationSettings
    from temper.online.serve.adapters import Loader, ModelTable, Served, Source
    from temper.online.serve.metrics import ServeMetrics
    from temper.task import load_task

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    source = Source.parse("models:/temper-clause-review@champion")
    metrics = ServeMetrics()
    table = ModelTable([source], Loader(tmp_path, None, engine=None), 1.0, metrics)
    task = load_task(Path(__file__).resolve().parents[1] / "configs/tasks/clause_review.yaml")
    current = Served(
        source, "3", None, None, task, GenerationSettings(max_new_tokens=8), {}, tmp_path
    )
    table.current["champion"] = current
    table.client = mlflow.MlflowClient(tracking_uri=dead, registry_uri=dead)
    with caplog.at_level(logging.WARNING, logger="temper.online.serve.adapters"):
        table.check()
        table.check()  # said once, not per round
    assert table.get("champion") is current and not table.registry_ok
    assert b"temper_registry_up 0.0" in generate_latest(metrics.registry)
    warnings = [r.getMessage() for r in caplog.records]
    assert (
        len(warnings) == 1 and "registry unreachable, keeping the current versions" in warnings[0]
    )
