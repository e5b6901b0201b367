"""distil stage: real SDKs against a real HTTP server on loopback, real CUAD clauses."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from fake_api import FakeAPI, Faults, _text, messages_key

from temper.io import read_json, read_jsonl, write_jsonl
from temper.params import TemperParams
from temper.providers import ProviderConfig, estimate_tokens
from temper.records.sampling import pick_few_shot
from temper.stages import distil
from temper.stages.distil import DistilConfig, DistilError

ROOT = Path(__file__).resolve().parents[1]
BAD = "Not A Label"


def raw_prepared(task, out: Path, train: int, validation: int = 0, test: int = 0) -> Path:
    """Prepared-format records built straight from the raw CUAD file (no tokenizer needed)."""
    wanted = {"train": train, "validation": validation, "test": test}
    splits: dict[str, list] = {s: [] for s in wanted}
    seen = set()
    order = iter(s for s, n in wanted.items() for _ in range(n))
    split = next(order, None)
    for r in read_jsonl(ROOT / "data/raw/contracts/train.jsonl"):
        if split is None:
            break
        gold = {
            "clause_type": r["category"],
            "key_term": task.gold_value(task.by_name["key_term"], r["answer"]),
        }
        if r["clause"] in seen or task.validate_answer(gold):
            continue
        seen.add(r["clause"])
        splits[split].append(
            {
                "id": r["id"],
                "group": r["contract_id"],
                "split": split,
                "text": r["clause"],
                "prompt": task.messages(r["clause"]),
                "gold": gold,
                "gold_all": {"clause_type": r["labels"]},
                "n_tokens": 0,
            }
        )
        split = next(order, None)
    for name, records in splits.items():
        write_jsonl(out / f"{name}.jsonl", records)
    return out


class Teacher:
    """A deterministic fake teacher: gold answers, with planned disagreements and bad replies.

    bad (h % 4 == 0): the first reply has an invalid label; the repair fixes it unless
    h % 3 == 0 too (then the record is rejected). disagree (h % 5 == 0): a valid wrong label.
    """

    def __init__(self, task, records):
        self.task = task
        self.gold = {task.user_message(r["text"]): task.gold_answer(r) for r in records}

    @staticmethod
    def h(clause_message: str) -> int:
        return int(hashlib.sha256(clause_message.encode()).hexdigest(), 16)

    def plan(self, record) -> tuple[bool, bool, bool]:
        h = self.h(self.task.user_message(record["text"]))
        return h % 4 == 0, h % 4 == 0 and h % 3 == 0, h % 5 == 0  # bad, rejected, disagree

    def __call__(self, messages):
        users = [m["content"] for m in messages if m["role"] == "user"]
        repair = users[-1].startswith("Your answer is invalid")
        clause = users[-2] if repair else users[-1]
        h = self.h(clause)
        answer = dict(self.gold[clause])
        labels = self.task.by_name["clause_type"].labels
        if h % 5 == 0:
            answer["clause_type"] = next(x for x in labels if x != answer["clause_type"])
        if h % 4 == 0 and (not repair or h % 3 == 0):
            answer["clause_type"] = BAD
        return json.dumps(answer)


# The fake teacher rejects about 8% of records on purpose (above the 5% default that fails a
# run): the tests that use it allow more.
REJECT_RATE = 0.25


def cfg_for(tmp_path, prepared, provider: dict, **kw) -> DistilConfig:
    values = {
        "prepared_dir": str(prepared),
        "out_dir": str(tmp_path / "distilled"),
        "metrics": str(tmp_path / "metrics" / "distil.json"),
        "progress": False,
        "log_mlflow": False,
        "baseline_split": None,
        "max_reject_rate": REJECT_RATE,
        **kw,
        "provider": {
            "model": "teacher-x",
            "prices": {"teacher-x": {"input": 1.0, "output": 2.0}},
            "cache": str(tmp_path / "cache.sqlite"),
            "backoff_s": 0.01,
            "backoff_max_s": 0.05,
            **provider,
        },
    }
    return DistilConfig.model_validate(values)


def ids(path: Path) -> list[str]:
    return [r["id"] for r in read_jsonl(path)]


@pytest.mark.slow
def test_gold_default_labels_every_record_offline(tmp_path, prepared_dir, task):
    cfg = DistilConfig(
        prepared_dir=str(prepared_dir),
        out_dir=str(tmp_path / "d"),
        metrics=str(tmp_path / "m.json"),
        progress=False,
        log_mlflow=False,
    )
    assert cfg.provider.kind == "gold" and not cfg.provider.allow_external  # the defaults
    metrics = distil.run(cfg, task)
    for split in ("train", "validation"):
        rows = read_jsonl(tmp_path / "d" / f"{split}.jsonl")
        source = read_jsonl(prepared_dir / f"{split}.jsonl")
        assert [r["id"] for r in rows] == [r["id"] for r in source]
        for row, rec in zip(rows, source, strict=True):
            assert row["label_source"] == "gold" and row["teacher_model"] == "gold"
            assert row["prompt"] == rec["prompt"] and row["prompt_hash"] == task.prompt_hash
            assert row["answer"] == task.gold_answer(rec)
            assert row["completion"] == [
                {"role": "assistant", "content": task.format_answer(row["answer"])}
            ]
        assert metrics["records"][split]["labelled"] == len(source)
    assert not (tmp_path / "d" / "baseline_test.jsonl").exists()  # evaluate uses the base model
    assert metrics["requests"] == 0 and metrics["complete"] and metrics["rejects"] == 0


def test_anthropic_teacher_repairs_rejects_audits_and_reruns_from_cache(tmp_path, task):
    prepared = raw_prepared(task, tmp_path / "prepared", train=40, validation=10, test=20)
    records = {s: read_jsonl(prepared / f"{s}.jsonl") for s in ("train", "validation", "test")}
    teacher = Teacher(task, [r for rs in records.values() for r in rs])
    with FakeAPI(responder=teacher) as api:
        cfg = cfg_for(
            tmp_path,
            prepared,
            {"kind": "anthropic", "base_url": api.anthropic_url},
            baseline_split="test",
        )
        metrics = distil.run(cfg, task)
        first_requests = api.requests
        out = tmp_path / "distilled"
        labelled = records["train"] + records["validation"]
        expect_rejected = {r["id"] for r in labelled if teacher.plan(r)[1]}
        expect_repairs = sum(teacher.plan(r)[0] for r in labelled)
        assert expect_rejected and expect_repairs > len(expect_rejected)  # the plan bites
        rejects = read_jsonl(out / "rejects.jsonl")
        assert {r["id"] for r in rejects} == expect_rejected
        assert all(
            r["reason"].startswith("invalid answer: after one repair") and BAD in r["reason"]
            for r in rejects
        )
        got = ids(out / "train.jsonl") + ids(out / "validation.jsonl")
        assert sorted(got + [r["id"] for r in rejects]) == sorted(r["id"] for r in labelled)
        # Requests: one per record, one more per planned repair, one per baseline record.
        assert first_requests == len(labelled) + expect_repairs + len(records["test"])
        assert metrics["requests"] == first_requests and metrics["cache_hits"] == 0
        assert metrics["tokens_in"] > 0 and metrics["usd"] > 0
        assert metrics["latency_ms_p50"] <= metrics["latency_ms_p95"]
        row = read_jsonl(out / "train.jsonl")[0]
        assert row["label_source"] == "teacher" and row["teacher_model"] == "teacher-x"
        assert row["completion"][0]["content"] == task.format_answer(row["answer"])
        # Teacher audit: exact agreement with gold equals the planned disagreements.
        kept = [r for r in labelled if r["id"] not in expect_rejected]
        agree = sum(not teacher.plan(r)[2] for r in kept)
        assert metrics["teacher_agreement"]["clause_type"]["agree"] == agree
        assert metrics["teacher_agreement"]["key_term"]["rate"] == 1.0
        # The teacher prompt: labels in the system prompt, 3 deterministic few-shot turns.
        first = api.log[0]["messages"]
        assert "Allowed values of clause_type" in first[0]["content"] and len(first) == 8
        shots = pick_few_shot(task, records["train"], 3, cfg.few_shot_seed)
        assert metrics["few_shot_ids"] == [s["id"] for s in shots]
        # The API baseline on the test split: raw output, parsed answer, no repair.
        baseline = read_jsonl(out / "baseline_test.jsonl")
        assert [b["id"] for b in baseline] == [r["id"] for r in records["test"]]
        for b, rec in zip(baseline, records["test"], strict=True):
            assert set(b) == {
                "id",
                "output",
                "answer",
                "latency_ms",
                "input_tokens",
                "output_tokens",
                "usd",
            }
            assert b["answer"] == json.loads(teacher(task.messages(rec["text"])))
        assert metrics["baseline"]["records"] == 20

        # Re-run: zero calls, same bytes.
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        api.reset_counters()
        again = distil.run(cfg, task)
        assert api.requests == 0 and again["requests"] == 0
        assert again["cache_hits"] == again["calls"] == first_requests
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        # Replay (the CI/audit mode) gives the same outputs without a server.
        replay = cfg.model_copy(
            update={
                "provider": cfg.provider.model_copy(
                    update={"kind": "replay", "replay_kind": "anthropic"}
                )
            }
        )
        distil.run(replay, task)
        assert api.requests == 0
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_500_requests_with_20_percent_faults_lose_nothing(tmp_path, task):
    prepared = raw_prepared(task, tmp_path / "prepared", train=400, validation=100)
    labelled = read_jsonl(prepared / "train.jsonl") + read_jsonl(prepared / "validation.jsonl")
    faults = Faults(
        rate_429=0.05,
        rate_500=0.05,
        rate_slow=0.03,
        rate_malformed=0.04,
        rate_truncated=0.03,
        retry_after=0.05,
        slow_s=0.6,
        seed=3,
    )
    with FakeAPI(responder=Teacher(task, labelled), faults=faults) as api:
        cfg = cfg_for(
            tmp_path,
            prepared,
            {
                "kind": "openai",
                "base_url": api.openai_url,
                "concurrency": 32,
                "timeout_s": 0.3,
                "max_usd": 1.0,
            },
        )
        metrics = distil.run(cfg, task)
    out = tmp_path / "distilled"
    rejects = read_jsonl(out / "rejects.jsonl")
    got = ids(out / "train.jsonl") + ids(out / "validation.jsonl")
    # Every input record is labelled or rejected with a reason; none lost, none twice.
    assert sorted(got + [r["id"] for r in rejects]) == sorted(r["id"] for r in labelled)
    assert all(r["reason"] for r in rejects)
    assert metrics["complete"] and metrics["usd"] <= cfg.provider.max_usd
    assert api.requests >= 500 and 0.15 <= sum(api.faults_injected.values()) / api.requests <= 0.25
    assert set(api.faults_injected) == {"429", "500", "slow", "malformed", "truncated"}
    # The client counts every attempt it sends; under load a request can time out before the
    # server's handler ever runs, so the server may see fewer, never more.
    timeouts = metrics["errors"].get("APITimeoutError", 0)
    assert api.requests <= metrics["requests"] <= api.requests + timeouts
    assert metrics["retries"] > 0
    for row in read_jsonl(out / "train.jsonl"):
        assert task.validate_answer(row["answer"]) == []


def write_params(tmp_path, prepared, provider: dict, **distil_kw) -> Path:
    params = {
        "task": str(ROOT / "configs/tasks/clause_review.yaml"),
        "distil": {
            "prepared_dir": str(prepared),
            "out_dir": str(tmp_path / "distilled"),
            "metrics": str(tmp_path / "metrics" / "distil.json"),
            "progress": True,
            "log_mlflow": False,
            "baseline_split": None,
            "max_reject_rate": REJECT_RATE,
            **distil_kw,
            "provider": {
                "model": "teacher-x",
                "cache": str(tmp_path / "cache.sqlite"),
                "prices": {"teacher-x": {"input": 1.0, "output": 2.0}},
                "backoff_s": 0.01,
                **provider,
            },
        },
        "mlflow": {
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "artifact_root": str(tmp_path / "mlartifacts"),
        },
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def temper(params: Path, *args: str, env: dict | None = None, **kw):
    command = [sys.executable, "-m", "temper", "distil", "-p", str(params), *args]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        command, cwd=params.parent, env=full_env, capture_output=True, text=True, timeout=120, **kw
    )


@pytest.mark.slow
def test_kill_9_then_rerun_requests_only_the_missing_records(tmp_path, task):
    prepared = raw_prepared(task, tmp_path / "prepared", train=80, validation=16)
    records = read_jsonl(prepared / "train.jsonl") + read_jsonl(prepared / "validation.jsonl")
    gold_teacher = {
        task.user_message(r["text"]): task.format_answer(task.gold_answer(r)) for r in records
    }
    with FakeAPI(responder=lambda m: gold_teacher[m[-1]["content"]], latency_s=0.05) as api:
        params = write_params(
            tmp_path, prepared, {"kind": "openai", "base_url": api.openai_url, "concurrency": 4}
        )
        command = [sys.executable, "-m", "temper", "distil", "-p", str(params)]
        proc = subprocess.Popen(
            command,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while api.answered < 30 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        assert not (tmp_path / "distilled").exists()  # no half-written outputs
        rows = (
            sqlite3.connect(tmp_path / "cache.sqlite")
            .execute("SELECT request FROM completions")
            .fetchall()
        )
        cached = {messages_key(json.loads(r[0])["messages"]) for r in rows}
        # The server answered 30; those still on the wire when the client died are not cached.
        assert 20 <= len(cached) < len(records)

        api.reset_counters()
        done = temper(params)
        assert done.returncode == 0, done.stderr
        # Only the records missing from the cache were requested, each once.
        assert api.requests == len(records) - len(cached)
        assert not cached & set(api.hits) and max(api.hits.values()) == 1
        out = tmp_path / "distilled"
        assert len(ids(out / "train.jsonl")) + len(ids(out / "validation.jsonl")) == len(records)
        assert read_json(tmp_path / "metrics" / "distil.json")["cache_hits"] == len(cached)


@pytest.mark.slow
def test_budget_cap_stops_cleanly_with_exit_code_and_estimate_refuses(tmp_path, task):
    prepared = raw_prepared(task, tmp_path / "prepared", train=40, validation=10)
    teacher = Teacher(
        task, read_jsonl(prepared / "train.jsonl") + read_jsonl(prepared / "validation.jsonl")
    )
    with FakeAPI(responder=teacher) as api:
        params = write_params(
            tmp_path,
            prepared,
            {"kind": "openai", "base_url": api.openai_url, "max_requests": 12, "concurrency": 4},
        )
        refused = temper(params)  # 50 requests needed > max_requests: refused up front
        assert refused.returncode == distil.EXIT_ESTIMATE_REFUSED and api.requests == 0
        done = temper(params, "--force")  # forced past the estimate: the hard cap stops it
        assert done.returncode == distil.EXIT_BUDGET_STOP, done.stderr
        assert "budget cap reached" in done.stderr and "max_requests 12" in done.stderr
        assert api.requests == 12
        metrics = read_json(tmp_path / "metrics" / "distil.json")
        assert not metrics["complete"] and metrics["stopped_reason"] == "budget cap"
        kept = len(ids(tmp_path / "distilled" / "train.jsonl"))
        assert 0 < kept <= 12 and kept == metrics["records"]["train"]["labelled"]
        assert sum(c["not_labelled_budget"] for c in metrics["records"].values()) > 0
        # A progress bar with done/total went to stderr.
        assert "/40" in done.stderr or "/50" in done.stderr

        # The estimate: prices that make the job cost more than max_usd refuse up front.
        api.reset_counters()
        pricey = {
            "kind": "openai",
            "base_url": api.openai_url,
            "max_usd": 0.5,
            "prices": {"teacher-x": {"input": 100.0, "output": 100.0}},
        }
        params = write_params(tmp_path, prepared, pricey)
        refused = temper(params)
        assert refused.returncode == distil.EXIT_ESTIMATE_REFUSED, refused.stderr
        assert "exceeds the cap" in refused.stderr and "nothing was sent" in refused.stderr
        assert api.requests == 0
        # Forced, it runs and the spend cap stops it: spend stays within max_usd.
        forced = temper(params, "--force")
        assert forced.returncode == distil.EXIT_BUDGET_STOP, forced.stderr
        metrics = read_json(tmp_path / "metrics" / "distil.json")
        assert api.requests > 0 and 0 < metrics["usd"] <= 0.5


def non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent for UDP connect
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_allow_external_false_blocks_a_non_loopback_endpoint_with_zero_requests(
    tmp_path, task, monkeypatch
):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")  # an external endpoint needs a key
    ip = non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback address to test against")
    prepared = raw_prepared(task, tmp_path / "prepared", train=6)
    teacher = Teacher(task, read_jsonl(prepared / "train.jsonl"))
    with FakeAPI(responder=teacher, host="0.0.0.0") as api:
        url = f"http://{ip}:{api.port}/v1"
        cfg = cfg_for(tmp_path, prepared, {"kind": "openai", "base_url": url}, splits=["train"])
        with pytest.raises(DistilError, match="not on this machine") as err:
            distil.run(cfg, task)
        assert err.value.exit_code == distil.EXIT_PRIVACY
        assert api.requests == 0 and not (tmp_path / "distilled").exists()
        # The same endpoint, allowed, is reachable: the block above was the privacy check.
        allowed = cfg.model_copy(
            update={"provider": cfg.provider.model_copy(update={"allow_external": True})}
        )
        distil.run(allowed, task)
        assert api.requests >= 6


@pytest.mark.slow
def test_api_key_appears_in_no_log_output_metric_or_mlflow_param(tmp_path, task):
    key = f"sk-temper-{uuid.uuid4().hex}"
    prepared = raw_prepared(task, tmp_path / "prepared", train=8, validation=4, test=4)
    records = [
        r for s in ("train", "validation", "test") for r in read_jsonl(prepared / f"{s}.jsonl")
    ]
    with FakeAPI(responder=Teacher(task, records), api_key=key) as api:
        params = write_params(
            tmp_path,
            prepared,
            {"kind": "openai", "base_url": api.openai_url, "api_key_env": "TEMPER_TEST_KEY"},
            log_mlflow=True,
            baseline_split="test",
        )
        api.queue_faults(["429", "500"])  # error paths log too
        done = temper(
            params,
            env={
                "TEMPER_TEST_KEY": key,
                "TEMPER_LOG_LEVEL": "DEBUG",
                "MLFLOW_DISABLE_TELEMETRY": "true",
            },
        )
        assert done.returncode == 0, done.stderr
        assert api.requests > 0 and api.auth_failures == 0  # the key was used, and accepted
    assert key not in done.stdout + done.stderr
    scanned = 0
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
            scanned += 1
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "cache.sqlite").exists()
    assert scanned > 8
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`temper.stage` = 'distil'",
    )
    assert len(runs) == 1
    logged = runs[0].data
    assert logged.params["distil.provider.api_key_env"] == "TEMPER_TEST_KEY"
    assert logged.metrics["requests"] == api.requests
    assert all(key not in str(v) for v in [*logged.params.values(), *logged.tags.values()])


def test_bad_input_names_file_line_and_field(tmp_path, task):
    prepared = raw_prepared(task, tmp_path / "prepared", train=3, validation=1)
    rows = read_jsonl(prepared / "train.jsonl")
    del rows[1]["text"]
    write_jsonl(prepared / "train.jsonl", rows)
    cfg = cfg_for(tmp_path, prepared, {"kind": "gold"})
    with pytest.raises(DistilError, match=r"train.jsonl:2: .* no field 'text'"):
        distil.run(cfg, task)
    cfg = cfg_for(tmp_path, tmp_path / "nowhere", {"kind": "gold"})
    with pytest.raises(DistilError, match="file not found"):
        distil.run(cfg, task)


def test_few_shot_is_deterministic_distinct_and_from_train(tmp_path, task):
    prepared = raw_prepared(task, tmp_path / "prepared", train=60)
    train = read_jsonl(prepared / "train.jsonl")
    shots = pick_few_shot(task, train, 4, "salt")
    assert [s["id"] for s in shots] == [
        s["id"] for s in pick_few_shot(task, train[::-1], 4, "salt")
    ]
    assert len({s["gold"]["clause_type"] for s in shots}) == 4
    assert [s["id"] for s in shots] != [s["id"] for s in pick_few_shot(task, train, 4, "other")]
    assert pick_few_shot(task, train, 0, "salt") == []


def test_provider_config_in_params_yaml_loads(task):
    from temper.config import load_params

    cfg = TemperParams.of(load_params(ROOT / "params.yaml")).distil
    assert isinstance(cfg.provider, ProviderConfig) and cfg.provider.kind == "gold"
    assert not cfg.provider.allow_external


# --- bad days: outages, servers that ignore limits, names that are not this machine ----------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_total_outage_exits_nonzero_and_keeps_the_previous_outputs(tmp_path, task):
    """Before the fix: 0 of 50 labelled, `complete: true`, exit 0, and the previous 634-line
    train.jsonl replaced by an empty one."""
    prepared = raw_prepared(task, tmp_path / "prepared", train=40, validation=10)
    out, metrics_file = tmp_path / "distilled", tmp_path / "metrics" / "distil.json"
    out.mkdir()
    (out / "train.jsonl").write_text("".join(f'{{"id": "old{i}"}}\n' for i in range(634)))
    metrics_file.parent.mkdir()
    metrics_file.write_text('{"old": true}\n')
    before = {p: p.read_bytes() for p in (out / "train.jsonl", metrics_file)}
    url = f"http://127.0.0.1:{closed_port()}/v1"  # nothing listens: every request fails
    cfg = cfg_for(
        tmp_path,
        prepared,
        {"kind": "openai", "base_url": url, "max_retries": 1},
        max_reject_rate=0.05,
    )
    with pytest.raises(DistilError, match=r"50 of 50 records .* rejected or failed") as err:
        distil.run(cfg, task)
    assert err.value.exit_code == distil.EXIT_TOO_MANY_REJECTS
    assert "left as they were" in str(err.value) and "APIConnectionError" in str(err.value)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl"]  # no temp folders left
    assert err.value.metrics["reject_rate"] == 1.0 and err.value.metrics["usd"] == 0


@pytest.mark.slow
def test_oversized_replies_cannot_break_the_spend_cap(tmp_path, task):
    """A server that ignores max_tokens: 2 MB replies, or usage claims of 500k tokens. Before
    the fix, max_usd=0.05 spent $0.31 and the huge replies were accepted as answers."""
    prepared = raw_prepared(task, tmp_path / "prepared", train=30)
    teacher = Teacher(task, read_jsonl(prepared / "train.jsonl"))
    prices = {"teacher-x": {"input": 10.0, "output": 10.0}}
    with FakeAPI(responder=teacher, faults=Faults(rate_huge=0.5, rate_overbill=0.5)) as api:
        params = write_params(
            tmp_path,
            prepared,
            {
                "kind": "openai",
                "base_url": api.openai_url,
                "max_usd": 0.05,
                "prices": prices,
                "concurrency": 4,
            },
            splits=["train"],
        )
        done = temper(params, "--force")
        in_flight = api.in_flight
    assert done.returncode == distil.EXIT_BUDGET_STOP, done.stderr[-2000:]
    assert "budget cap reached" in done.stderr
    spent = float(re.search(r"spent \$(\d+\.\d+)", done.stderr).group(1))
    cfg = cfg_for(tmp_path, prepared, {"kind": "openai", "max_usd": 0.05, "prices": prices})
    messages = task.teacher_messages([], "x" * 2000)  # longer than any record here
    worst = cfg.provider.prices["teacher-x"].cost(estimate_tokens(messages), 256)
    assert 0 < spent <= 0.05 + 4 * worst
    assert spent <= 0.05  # charges never pass their reservations, reservations never the cap
    assert api.billed_usd(10.0, 10.0) > 1.0 and in_flight == 0
    # None of the oversized replies was kept as an answer.
    assert not (tmp_path / "distilled").exists()


PROBE = """
import json, sys
from pathlib import Path
calls = []
sys.addaudithook(lambda event, args: calls.append(event) if event in (
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
    "socket.connect", "socket.sendto", "socket.sendmsg") else None)
from temper.providers import privacy
from temper.stages import distil
from temper.task import load_task
privacy.HOSTS_FILE = Path(sys.argv[3])
cfg = distil.DistilConfig.model_validate(json.loads(sys.argv[1]))
try:
    distil.run(cfg, load_task(sys.argv[2]))
    outcome = "ran"
except distil.DistilError as err:
    outcome = err.exit_code
print(json.dumps({"outcome": outcome, "network_calls": calls}))
"""


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.localhost/v1",  # counted as loopback before the fix (and resolved)
        "http://teacher.localhost:8000/v1",
        "http://intranet-teacher:8000/v1",  # resolves to a private address (hosts file below)
        "http://localhost:8000/v1",  # ... and so does localhost itself, here
        "http://10.0.0.5.nip.io/v1",
    ],
)
def test_names_that_are_not_provably_local_are_refused_with_no_network_call(
    tmp_path, task, url, monkeypatch
):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    prepared = raw_prepared(task, tmp_path / "prepared", train=4)
    hosts = tmp_path / "hosts"
    hosts.write_text("10.20.30.40 intranet-teacher\n10.20.30.41 localhost\n")
    cfg = cfg_for(tmp_path, prepared, {"kind": "openai", "base_url": url}, splits=["train"])
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            PROBE,
            cfg.model_dump_json(),
            str(ROOT / "configs/tasks/clause_review.yaml"),
            str(hosts),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result == {"outcome": distil.EXIT_PRIVACY, "network_calls": []}
    assert not (tmp_path / "distilled").exists()


def test_a_teacher_with_a_shutdown_date_is_named_before_anything_is_sent(
    tmp_path, task, monkeypatch, caplog
):
    """The teacher priced in params (not the table) got no warning that it retires soon."""
    import logging
    import shutil

    prepared = raw_prepared(task, tmp_path / "prepared", train=4, validation=2)
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "prices.yaml", tmp_path / "configs" / "prices.yaml")
    monkeypatch.chdir(tmp_path)  # the table at its default place, configs/prices.yaml
    teacher = Teacher(
        task, read_jsonl(prepared / "train.jsonl") + read_jsonl(prepared / "validation.jsonl")
    )
    retiring = {"gpt-4o-mini": {"input": 0.15, "output": 0.60}}
    with FakeAPI(responder=teacher) as api, caplog.at_level(logging.WARNING):
        cfg = cfg_for(
            tmp_path,
            prepared,
            {
                "kind": "openai",
                "base_url": api.openai_url,
                "model": "gpt-4o-mini",
                "prices": retiring,
            },
        )
        distil.run(cfg, task)
    warned = [r.getMessage() for r in caplog.records if "gpt-4o-mini" in r.getMessage()]
    assert any("2027-01-14" in m and "successor" in m for m in warned), warned


def test_a_teacher_that_goes_down_mid_run_stops_distil_in_seconds(tmp_path, task):
    """Before the breaker: with the port closed every request was retried 5 times (524 s
    for 1,088 records). Here, at the default retries and backoff, the teacher stops after 20
    answers: distil exits 6 within 30 s, and the previous outputs are byte-identical."""
    prepared = raw_prepared(task, tmp_path / "prepared", train=300)
    teacher = Teacher(task, read_jsonl(prepared / "train.jsonl"))
    out, metrics_file = tmp_path / "distilled", tmp_path / "metrics" / "distil.json"
    out.mkdir()
    (out / "train.jsonl").write_text('{"id": "old"}\n')
    metrics_file.parent.mkdir()
    metrics_file.write_text('{"old": true}\n')
    before = {p: p.read_bytes() for p in (out / "train.jsonl", metrics_file)}
    api = FakeAPI(responder=teacher).start()
    cfg = cfg_for(tmp_path, prepared, {"kind": "openai", "base_url": api.openai_url})
    cfg = cfg.model_copy(  # the shipped retry settings, not the fast ones of cfg_for
        update={"provider": cfg.provider.model_copy(update={"backoff_s": 0.5, "backoff_max_s": 30})}
    )
    assert cfg.provider.max_retries == 4
    stopped: list[float] = []

    def outage() -> None:
        while api.requests < 20:
            time.sleep(0.01)
        api.stop()  # the port is closed from here on
        stopped.append(time.monotonic())

    threading.Thread(target=outage, daemon=True).start()
    with pytest.raises(DistilError, match="looks down") as err:
        distil.run(cfg, task)
    took = time.monotonic() - stopped[0]
    assert err.value.exit_code == distil.EXIT_TOO_MANY_REJECTS
    assert took < 30, f"{took:.0f} s after the outage"
    assert "connections in a row refused" in str(err.value) and "left as they were" in str(
        err.value
    )
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl"]


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_oversize_replies_are_rejected_alike_by_both_sdks_without_retries(tmp_path, task, kind):
    """A 2 MB reply: the openai SDK raised OverLimitReply (not retried); the anthropic SDK
    wrapped it in APIConnectionError, so it was retried and counted as abandoned. Now both:
    one request per record, the same over-limit count, the spend within the cap."""
    prepared = raw_prepared(task, tmp_path / "prepared", train=24)
    records = read_jsonl(prepared / "train.jsonl")
    gold = Teacher(task, records).gold  # user message -> gold answer: every answer valid
    huge = {task.user_message(r["text"]) for r in records[::3]}  # 8 of 24, whatever the order

    def last_user(messages) -> str:
        return _text([m for m in messages if m["role"] == "user"][-1]["content"])

    def fault(messages):
        return "huge" if last_user(messages) in huge else None

    def answer(messages):
        return json.dumps(gold[last_user(messages)])

    with FakeAPI(responder=answer, fault_fn=fault) as api:
        url = api.openai_url if kind == "openai" else api.anthropic_url
        cfg = cfg_for(
            tmp_path,
            prepared,
            {"kind": kind, "base_url": url, "max_usd": 0.5},
            splits=["train"],
            repair=False,
            max_reject_rate=0.5,
        )
        metrics = distil.run(cfg, task)
        sent = api.requests
    assert metrics["over_limit_replies"] == len(huge) == 8
    assert sent == len(records) and metrics["retries"] == 0  # not one retry
    assert metrics["abandoned_requests"] == 0
    rejects = read_jsonl(tmp_path / "distilled" / "rejects.jsonl")
    assert len(rejects) == 8 and all("over max_reply_bytes" in r["reason"] for r in rejects)
    assert metrics["usd"] <= 0.5


def test_a_rerun_after_failures_gives_the_same_outputs_unless_retry_failed(tmp_path, task):
    """Before: failures were not cached, so the first re-run sent them again and the outputs
    changed (16 -> 6 rejects). Now a re-run rejects them again unsent, byte for byte;
    `retry_failed: true` sends them (a choice), and the run after that reproduces it."""
    prepared = raw_prepared(task, tmp_path / "prepared", train=30)
    records = read_jsonl(prepared / "train.jsonl")
    gold = Teacher(task, records).gold
    down = {task.user_message(r["text"]) for r in records[::5]}  # 6 of 30
    healthy = threading.Event()

    def last_user(messages) -> str:
        return _text([m for m in messages if m["role"] == "user"][-1]["content"])

    def fault(messages):
        return None if healthy.is_set() or last_user(messages) not in down else "500"

    out = tmp_path / "distilled"

    def files() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in out.iterdir()}

    with FakeAPI(responder=lambda m: json.dumps(gold[last_user(m)]), fault_fn=fault) as api:
        cfg = cfg_for(tmp_path, prepared, {"kind": "openai", "base_url": api.openai_url})
        cfg = cfg.model_copy(update={"splits": ["train"]})
        first = distil.run(cfg, task)
        assert first["rejects"] == 6
        written = files()
        healthy.set()  # the server is fine now: only a re-run that asks would change the data
        api.reset_counters()
        again = distil.run(cfg, task)
        assert api.requests == 0 and files() == written
        assert again["failures_recalled"] == 6 and first["failures_recalled"] == 0
        retried = distil.run(cfg.model_copy(update={"retry_failed": True}), task)
        assert api.requests == 6 and retried["rejects"] == 0
        assert read_jsonl(out / "rejects.jsonl") == [] and len(ids(out / "train.jsonl")) == 30
        now = files()
        api.reset_counters()
        last = distil.run(cfg, task)
        assert api.requests == 0 and last["failures_recalled"] == 0 and files() == now
