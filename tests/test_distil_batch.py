"""distil in batch mode: the real SDKs against the fake OpenAI Batch and Anthropic Message
Batches endpoints (tests/fake_batch.py), real CUAD clauses.

What must hold: every record is labelled or rejected with a reason (none lost, none twice)
through per-request errors and an expired batch; a stage killed after (or during) a
submission resumes the submitted batches by id and submits nothing twice; the estimate and
the cap use the batch prices; --status and --cancel work on the state file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from fake_api import FakeAPI
from test_distil import ROOT, Teacher, cfg_for, ids, raw_prepared, write_params

from temper.config import ConfigError
from temper.io import read_json, read_jsonl
from temper.providers import Price, ProviderConfig
from temper.stages import distil
from temper.stages.distil import DistilConfig, DistilError

BATCH_PRICES = {"teacher-x": {"input": 1.0, "output": 2.0, "batch_input": 0.5, "batch_output": 1.0}}


def batch_errors(cid: str, attempt: int) -> str | None:
    """Deterministic per-request errors: 2% refused for good (400), 5% a transient 500 on the
    first submission only."""
    h = int(cid[:8], 16)
    if h % 50 == 0:
        return "400"
    if h % 20 == 1 and attempt == 1:
        return "500"
    return None


def batch_provider(api: FakeAPI, kind: str, **batch) -> dict:
    url = api.openai_url if kind == "openai" else api.anthropic_url
    return {
        "kind": kind,
        "base_url": url,
        "mode": "batch",
        "prices": BATCH_PRICES,
        "batch": {"max_requests": 500, "poll_s": 0.05, "poll_max_s": 0.2, **batch},
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_2000_records_through_batches_with_errors_lose_nothing(tmp_path, task, kind):
    prepared = raw_prepared(task, tmp_path / "prepared", train=1800, validation=200)
    labelled = read_jsonl(prepared / "train.jsonl") + read_jsonl(prepared / "validation.jsonl")
    teacher = Teacher(task, labelled)
    with FakeAPI(
        responder=teacher,
        batch_error_fn=batch_errors,
        expire_batches=(1,),
        batch_max_requests=500,
        batch_delay_s=0.3,
    ) as api:
        cfg = cfg_for(tmp_path, prepared, {**batch_provider(api, kind), "max_usd": 50.0})
        metrics = distil.run(cfg, task)
        subs = api.batch.batch_submissions
        out = tmp_path / "distilled"
        rejects = read_jsonl(out / "rejects.jsonl")
        got = ids(out / "train.jsonl") + ids(out / "validation.jsonl")
        # Every record labelled or rejected with a reason: none lost, none twice.
        assert sorted(got + [r["id"] for r in rejects]) == sorted(r["id"] for r in labelled)
        assert len(set(got)) == len(got) and all(r["reason"] for r in rejects)
        # Chunks within the limit (the fake refuses more than 500), 4 first-round batches.
        sizes = [len(b["requests"]) for b in api.batch.batches.values()]
        assert max(sizes) <= 500 and len(subs) == 2000
        refused = {c for c in subs if batch_errors(c, 1) == "400"}
        transient = {c for c in subs if batch_errors(c, 1) == "500"}
        expired_batch = list(api.batch.batches.values())[1]
        expired = {c for c, r in expired_batch["results"].items() if "expired" in r}
        assert refused and transient and len(expired) == 250
        # Refused requests: rejected with the vendor's reason, never resubmitted.
        failed = [r for r in rejects if r["reason"].startswith("batch request failed")]
        assert len(failed) == len(refused) == metrics["batch"]["failed_for_good"]
        assert all("request refused" in r["reason"] for r in failed)
        # Transient errors and expired requests were resubmitted once; nothing else was.
        assert all(n == 1 + (c in transient or c in expired) for c, n in subs.items())
        # The repair turns ran synchronously (the chat endpoint): one per planned bad answer.
        answered = [r for r in labelled if r["id"] not in {f["id"] for f in failed}]
        assert api.requests == sum(teacher.plan(r)[0] for r in answered) > 0
        planned = {r["id"] for r in answered if teacher.plan(r)[1]}
        assert {r["id"] for r in rejects if r["reason"].startswith("invalid")} == planned
        # Priced at the batch rates: half of what the same tokens cost synchronously.
        b = metrics["batch"]
        assert b["answers"] == sum(
            "ok" in r for x in api.batch.batches.values() for r in x["results"].values()
        )
        assert metrics["usd"] > 0 and metrics["complete"]

        # A re-run: zero submissions, zero requests, same bytes.
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        total = sum(subs.values())
        api.reset_counters()
        again = distil.run(cfg, task)
        assert sum(subs.values()) == total and api.requests == 0 and again["requests"] == 0
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_batch_prices_estimate_and_cap_before_submission(tmp_path, task):
    prepared = raw_prepared(task, tmp_path / "prepared", train=40, validation=10)
    labelled = read_jsonl(prepared / "train.jsonl") + read_jsonl(prepared / "validation.jsonl")
    with FakeAPI(responder=Teacher(task, labelled), batch_delay_s=0.05) as api:
        provider = batch_provider(api, "openai", max_requests=20)
        sync = cfg_for(tmp_path, prepared, {**provider, "mode": "sync"})
        batch = cfg_for(tmp_path, prepared, provider)
        # The estimate at batch prices is half the sync one here (both rates halved).
        msgs = [task.teacher_messages([], r["text"]) for r in labelled]
        e_sync = distil.estimate_cost(distil.open_provider(sync.provider), task, msgs, "v")
        e_batch = distil.estimate_cost(distil.open_provider(batch.provider), task, msgs, "v")
        assert e_batch["usd"] == pytest.approx(e_sync["usd"] / 2, rel=1e-6)
        assert e_batch["usd_worst_case"] == pytest.approx(e_sync["usd_worst_case"] / 2, rel=1e-6)
        # A cap of 20 requests: the first batch of 20 goes, the next chunks never do.
        capped = cfg_for(
            tmp_path, prepared, {**provider, "max_requests": 20}, force=True, repair=False
        )
        with pytest.raises(DistilError) as stop:
            distil.run(capped, task)
        assert stop.value.exit_code == distil.EXIT_BUDGET_STOP
        assert len(api.batch.batch_submissions) == 20 and len(api.batch.batches) == 1
        m = stop.value.metrics
        assert sum(c["not_labelled_budget"] for c in m["records"].values()) == 30
        assert m["batch"]["not_submitted_budget"] == 30
        # A spend cap below one request's worst case: nothing is submitted at all.
        broke = cfg_for(tmp_path, prepared, {**provider, "max_usd": 1e-6}, force=True)
        with pytest.raises(DistilError) as stop:
            distil.run(broke, task)
        assert stop.value.exit_code == distil.EXIT_BUDGET_STOP and len(api.batch.batches) == 1


def test_batch_mode_needs_an_api_teacher_and_batch_prices(tmp_path, task):
    with pytest.raises(ValueError, match="mode: batch needs kind openai or anthropic"):
        ProviderConfig(kind="gold", mode="batch")
    with pytest.raises(ValueError, match="mode: batch needs kind openai or anthropic"):
        ProviderConfig(kind="replay", mode="batch")
    assert Price(input=1, output=2, batch_input=0.5, batch_output=1, cached_input=0.1).batch() == (
        Price(input=0.5, output=1, cached_input=0.05)
    )
    prepared = raw_prepared(task, tmp_path / "prepared", train=4)
    with FakeAPI() as api:
        cfg = cfg_for(
            tmp_path,
            prepared,
            {**batch_provider(api, "openai"), "prices": {"teacher-x": {"input": 1, "output": 2}}},
        )
        with pytest.raises(ConfigError, match="no batch_input/batch_output"):
            distil.run(cfg, task)
        assert api.batch.batch_submissions == Counter()
    # The shipped params keep the offline default.
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert DistilConfig.model_validate(params["distil"]).provider.mode == "sync"


def temper(params: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "temper", "distil", "-p", str(params), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        command, cwd=params.parent, env=env, capture_output=True, text=True, timeout=timeout
    )


def state_entries(folder: Path) -> list[dict]:
    files = list(folder.glob("cache.sqlite.batches/*.json"))
    if not files:
        return []
    try:
        return read_json(files[0])["batches"]
    except (ValueError, OSError):
        return []


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "distilled").iterdir())}


def run_case(folder: Path, task, kind: str, kill: str | None) -> tuple[Counter, dict, dict]:
    """One stage run (uninterrupted, or killed then re-run) against a fresh fake API."""
    folder.mkdir()
    prepared = raw_prepared(task, folder / "prepared", train=160, validation=40)
    labelled = read_jsonl(prepared / "train.jsonl") + read_jsonl(prepared / "validation.jsonl")
    delay = 1.5 if kill == "during" else 0.0
    with FakeAPI(
        responder=Teacher(task, labelled),
        batch_error_fn=batch_errors,
        expire_batches=(1,),
        batch_delay_s=1.0,
        submit_delay_s=delay,
    ) as api:
        provider = batch_provider(api, kind, max_requests=50)
        params = write_params(folder, prepared, provider)
        if kill:
            proc = subprocess.Popen(
                [sys.executable, "-m", "temper", "distil", "-p", str(params)],
                cwd=folder,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 60
            want = (lambda e: e["id"] is None) if kill == "during" else (lambda e: e["id"])
            while proc.poll() is None and time.monotonic() < deadline:
                # "during": the vendor made the batch, the client has not heard back yet.
                made = kill != "during" or api.batch.created > 0
                if made and any(want(e) for e in state_entries(folder)):
                    break
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            assert proc.returncode == -signal.SIGKILL
            assert not (folder / "distilled").exists()
            entries = state_entries(folder)
            assert entries and (kill != "during" or entries[-1]["id"] is None)
            api.submit_delay_s = 0.0
        done = temper(params)
        assert done.returncode == 0, done.stderr
        again = temper(params)  # and a third run: nothing left to submit
        assert again.returncode == 0, again.stderr
        return (
            Counter(api.batch.batch_submissions),
            outputs(folder),
            read_json(folder / "metrics" / "distil.json"),
        )


@pytest.fixture(scope="module")
def uninterrupted() -> dict[str, tuple[Counter, dict, dict]]:
    """The uninterrupted run of each provider's case (provider -> `run_case`'s result)."""
    return {}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "kill"),
    [("openai", "after"), ("openai", "during"), ("anthropic", "after"), ("anthropic", "during")],
)
def test_kill_9_after_or_during_submission_resumes_without_duplicates(
    tmp_path, task, kind, kill, uninterrupted
):
    if kind not in uninterrupted:  # one reference run per provider, for both kill points
        uninterrupted[kind] = run_case(tmp_path / "ref", task, kind, None)
    ref_subs, ref_out, _ = uninterrupted[kind]
    subs, out, metrics = run_case(tmp_path / "killed", task, kind, kill)
    assert subs == ref_subs  # zero duplicate submissions: the same count per custom_id
    assert len(subs) == 200 and max(subs.values()) <= 3
    assert out == ref_out  # the same outputs as the uninterrupted run
    assert metrics["batch"]["submitted_requests"] == 0  # the last run found it all done


@pytest.mark.slow
def test_status_and_cancel_then_rerun_resubmits_the_cancelled(tmp_path, task, monkeypatch):
    monkeypatch.setenv("TEMPER_BATCH_KEY", "sk-batch-secret")
    prepared = raw_prepared(task, tmp_path / "prepared", train=30, validation=10)
    labelled = read_jsonl(prepared / "train.jsonl") + read_jsonl(prepared / "validation.jsonl")
    key = "sk-batch-secret"
    with FakeAPI(responder=Teacher(task, labelled), batch_delay_s=600, api_key=key) as api:
        provider = {
            **batch_provider(api, "anthropic", max_requests=25, max_wait_s=0.3),
            "api_key_env": "TEMPER_BATCH_KEY",
        }
        params = write_params(tmp_path, prepared, provider)
        cfg = DistilConfig.model_validate(yaml.safe_load(params.read_text())["distil"])
        with pytest.raises(DistilError) as pending:
            distil.run(cfg, task)
        assert pending.value.exit_code == distil.EXIT_BATCH_PENDING
        assert "re-run to collect" in str(pending.value)
        shown = temper(params, "--status")
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.count("in_progress") == 2 and "2 batch(es)" in shown.stdout
        gone = temper(params, "--cancel")
        assert gone.returncode == 0, gone.stderr
        assert all(b.get("cancelling") for b in api.batch.batches.values())
        api.batch_delay_s = 0.05
        metrics = distil.run(cfg, task)
        assert metrics["complete"]
        # Cancelled requests were submitted again (a cancel is not an attempt), once each.
        assert set(api.batch.batch_submissions.values()) == {2}
        state = next(tmp_path.glob("cache.sqlite.batches/*.json")).read_text()
        assert key not in state + shown.stdout + shown.stderr + gone.stdout
        assert api.auth_failures == 0  # the SDKs sent the key on every batch call


def test_a_refused_key_stops_with_exit_1_and_never_shows_the_key(tmp_path, task, monkeypatch):
    monkeypatch.setenv("TEMPER_BATCH_KEY", "sk-wrong-batch-key")
    prepared = raw_prepared(task, tmp_path / "prepared", train=6)
    with FakeAPI(api_key="sk-right") as api:
        provider = {**batch_provider(api, "openai"), "api_key_env": "TEMPER_BATCH_KEY"}
        with pytest.raises(DistilError) as err:
            distil.run(cfg_for(tmp_path, prepared, provider), task)
        assert err.value.exit_code == 1 and "AuthenticationError" in str(err.value)
        assert "sk-wrong-batch-key" not in str(err.value) and api.auth_failures == 1
        # The submission never reached the vendor: the next run drops it and submits afresh.
        entries = state_entries(tmp_path)
        assert len(entries) == 1 and entries[0]["id"] is None
