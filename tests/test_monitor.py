"""The monitor's parts without the model: the request log's writer, the store, the judge against
a fake judge API on loopback (real openai SDK), review export / import, the gauges."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
from fake_api import FakeAPI
from prometheus_client import generate_latest
from sklearn.metrics import cohen_kappa_score

from temper.online.monitor import MonitorConfig, MonitorStore, RequestLog, sampled
from temper.online.monitor.gauges import GAUGES, read_state, write_state
from temper.online.monitor.judge import run_judge, windows
from temper.online.monitor.review import (
    ReviewError,
    agreement,
    cohen_kappa,
    export_reviews,
    import_reviews,
)
from temper.online.serve.metrics import ServeMetrics
from temper.providers import PrivacyError
from temper.task import load_task

ROOT = Path(__file__).resolve().parents[1]
GOOD = '{"clause_type": "Governing Law", "key_term": "New York"}'
BAD = '{"clause_type": "Termination For Convenience", "key_term": null}'


class Vectors:
    """A stand-in embedder (the real one is tested in test_cache and test_monitor_drift)."""

    name, max_tokens = "fake", 256

    def embed(self, texts):
        return np.ones((len(texts), 4), np.float32) / 2


def config(tmp: Path, **kw) -> MonitorConfig:
    return MonitorConfig.model_validate({"path": str(tmp / "monitor.sqlite"), **kw})


def info(i: int, answer: str = GOOD, text: str | None = None) -> dict:
    return {
        "model": "champion",
        "version": "3",
        "tier": "self",
        "prompt_tokens": 100 + i,
        "completion_tokens": 12,
        "_text": text or f"Clause {i}: governed by the laws of New York. Contact a{i}@x.com",
        "_answer": answer,
        "_confidence": 0.9 if i % 4 else 0.3,
    }


def fill(cfg: MonitorConfig, n: int, answer_of=lambda i: GOOD) -> RequestLog:
    log = RequestLog(cfg, embedder_factory=Vectors).start()
    for i in range(n):
        log.submit(f"req-{i:04d}", info(i, answer_of(i)), 200, 0.25)
    log.close()
    return log


def test_request_log_writes_every_row_off_the_request_path(tmp_path):
    cfg = config(tmp_path, judge={"share": 0.3}, review={"share": 0.1})
    log = fill(cfg, 50)
    assert (log.written, log.dropped) == (50, 0)
    with MonitorStore(cfg.path) as store:
        rows = store.requests()
    assert [r.id for r in rows] == [f"req-{i:04d}" for i in range(50)]
    r = rows[1]
    assert (r.model, r.version, r.tier, r.status, r.latency_ms) == (
        "champion",
        "3",
        "self",
        200,
        250,
    )
    assert r.prompt_tokens == 101 and r.answer == GOOD and r.confidence == 0.9
    assert r.embedding is not None and r.embedding.shape == (4,) and r.input_hash
    # The text is kept only where the judge or a reviewer will read it (and then redacted).
    for row in rows:
        wanted = (
            sampled(row.id, cfg.judge.salt, 0.3)
            or sampled(row.id, cfg.review.salt, 0.1)
            or row.confidence < cfg.review.low_confidence
        )
        assert (row.input_text is not None) == wanted, row.id
        if row.input_text:
            assert "@x.com" not in row.input_text and "New York" in row.input_text
    assert 0 < sum(r.input_text is not None for r in rows) < 50


def test_request_log_drops_and_counts_when_full_never_blocks(tmp_path):
    cfg = config(tmp_path, queue_size=2)
    metrics = ServeMetrics()
    log = RequestLog(cfg, on_dropped=metrics.log_dropped.inc, on_written=metrics.log_rows.inc)
    t0 = time.perf_counter()
    for i in range(5):  # the writer is not started: the queue fills
        log.submit(f"r{i}", info(i), 200, 0.1)
    assert time.perf_counter() - t0 < 0.5
    assert log.dropped == 3
    log.start().close()
    text = generate_latest(metrics.registry).decode()
    assert "temper_monitor_log_dropped_total 3.0" in text
    assert "temper_monitor_log_rows_total 2.0" in text


def test_a_failing_write_is_counted_and_the_writer_goes_on(tmp_path):
    cfg = config(tmp_path, embed=False)
    log = RequestLog(cfg).start()
    log.submit("ok-1", info(1), 200, 0.1)
    log.submit("bad", {"_answer": object()}, 200, 0.1)  # not storable: the batch fails
    time.sleep(0.3)
    log.submit("ok-2", info(2), 200, 0.1)
    log.close()
    with MonitorStore(cfg.path) as store:
        ids = [r.id for r in store.requests()]
    assert "ok-2" in ids and "bad" not in ids
    assert log.dropped >= 1 and log.written + log.dropped == 3


def test_prune_keeps_retention_and_row_cap(tmp_path):
    cfg = config(tmp_path, embed=False)
    fill(cfg, 10)
    with MonitorStore(cfg.path) as store:
        store.db.execute("UPDATE requests SET ts = ts - 40 * 86400 WHERE id < 'req-0003'")
        store.add_verdict("req-0001", "correct", "j", 0.0, False)
        assert store.prune(30 * 86400, 5) == 5  # 3 too old, then 2 over the cap
        assert [r.id for r in store.requests()] == [f"req-{i:04d}" for i in range(5, 10)]
        assert store.count("verdicts") == 0


def verdict_responder(messages):
    answer = messages[-1]["content"].rsplit("Answer:", 1)[1]
    return json.dumps(
        {"verdict": "correct" if "Governing Law" in answer else "incorrect", "reason": "checked"}
    )


@pytest.fixture()
def judged(tmp_path):
    """60 logged answers (every 5th wrong), a third judged by a fake judge on loopback."""
    with FakeAPI(verdict_responder) as api:
        provider = {
            "kind": "openai",
            "model": "judge-model",
            "base_url": api.openai_url,
            "cache": str(tmp_path / "llm.sqlite"),
            "prices": {"judge-model": {"input": 1.0, "output": 2.0}},
            "max_usd": 1.0,
            "max_retries": 0,
        }
        cfg = config(
            tmp_path,
            embed=False,
            judge={"share": 0.34, "provider": provider},
            review={"share": 0.2},
        )
        fill(cfg, 60, lambda i: BAD if i % 5 == 0 else GOOD)
        task = load_task(ROOT / "configs" / "tasks" / "clause_review.yaml")
        with MonitorStore(cfg.path) as store:
            first = run_judge(cfg, task, store, progress=False)
            asked = api.requests
            again = run_judge(cfg, task, store, progress=False)
            yield cfg, store, first, again, asked, api


def test_judge_checks_the_sampled_share_once_within_budget(judged):
    cfg, store, first, again, asked, api = judged
    picked = [r for r in store.requests() if sampled(r.id, cfg.judge.salt, 0.34)]
    assert first.judged == len(picked) == asked > 5 and first.failed == 0
    assert again.judged == 0 and api.requests == asked  # no row judged twice
    verdicts = store.verdicts()
    for r in picked:
        assert verdicts[r.id]["verdict"] == ("incorrect" if r.answer == BAD else "correct")
    assert 0 < first.usd <= cfg.judge.provider.max_usd
    assert again.spent_usd == pytest.approx(first.usd)
    (window,) = windows(store, 24)
    assert window.judged == first.judged
    assert window.correct == first.counts["correct"]


def test_judge_refuses_an_external_endpoint_unless_allowed(tmp_path):
    provider = {"kind": "openai", "model": "m", "base_url": "https://api.example.com/v1"}
    cfg = config(tmp_path, embed=False, judge={"share": 1.0, "provider": provider})
    fill(cfg, 3)
    task = load_task(ROOT / "configs" / "tasks" / "clause_review.yaml")
    with MonitorStore(cfg.path) as store, pytest.raises(PrivacyError):
        run_judge(cfg, task, store, progress=False)


def test_review_round_trip_agreement_and_calibration(judged, tmp_path):
    cfg, store, first, *_ = judged
    done = export_reviews(cfg, store, tmp_path / "review")
    with done.csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == done.rows == sum(done.by_reason.values()) > 0
    assert {r["reason"] for r in rows} <= {"sample", "low_confidence", "judge_disputed"}
    tasks = json.loads(done.label_studio.read_text())
    assert [t["data"]["request_id"] for t in tasks] == [r["request_id"] for r in rows]
    assert '<Choices name="verdict"' in done.label_config.read_text()
    # A reviewer marks the truth; one row is left blank (not reviewed yet).
    for r in rows:
        r["verdict"] = "incorrect" if r["answer"] == BAD else "correct"
        r["reviewer"] = "ana"
    rows[-1]["verdict"] = ""
    with done.csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert import_reviews(store, done.csv) == len(rows) - 1
    assert store.count("reviews") == len(rows) - 1
    assert export_reviews(cfg, store, tmp_path / "again").rows == 1  # only the blank one left
    a = agreement(cfg, store)
    both = sorted(set(store.verdicts()) & set(store.reviews()))
    judge = [store.verdicts()[k]["verdict"] for k in both]
    human = [store.reviews()[k]["verdict"] for k in both]
    assert a.n == len(both) > 0
    assert a.agreement == 1.0  # the fake judge is always right here
    if len(set(judge)) > 1:
        assert a.kappa == pytest.approx(cohen_kappa_score(judge, human))


def test_label_studio_export_is_read_back(judged, tmp_path):
    cfg, store, *_ = judged
    rid = store.requests()[0].id
    export = [
        {
            "data": {"request_id": rid},
            "annotations": [
                {
                    "completed_by": 7,
                    "result": [
                        {"from_name": "verdict", "value": {"choices": ["incorrect"]}},
                        {"from_name": "corrected_answer", "value": {"text": [GOOD]}},
                    ],
                }
            ],
        },
        {"data": {"request_id": "req-0002"}, "annotations": []},  # not labelled yet
    ]
    path = tmp_path / "ls.json"
    path.write_text(json.dumps(export))
    assert import_reviews(store, path) == 1
    row = store.reviews()[rid]
    assert (row["verdict"], row["corrected"], row["reviewer"]) == ("incorrect", GOOD, "7")


def test_a_bad_review_file_names_line_and_field_and_stores_nothing(judged, tmp_path):
    cfg, store, *_ = judged
    ids = [r.id for r in store.requests()[:3]]
    path = tmp_path / "bad.csv"
    path.write_text(f"request_id,verdict\n{ids[0]},correct\n{ids[1]},maybe\n{ids[2]},incorrect\n")
    with pytest.raises(ReviewError, match=r"bad\.csv:3: field 'verdict': 'maybe'"):
        import_reviews(store, path)
    path.write_text("request_id,verdict\nnope,correct\n")
    with pytest.raises(ReviewError, match=r"bad\.csv:2: field 'request_id': 'nope'"):
        import_reviews(store, path)
    assert store.count("reviews") == 0


def test_calibration_takes_the_judges_errors_out():
    from temper.online.monitor.review import Agreement

    a = Agreement(n=100, agreement=0.9, kappa=0.7, n_sample=100, true_pass=0.9, false_pass=0.2)
    # q = acc * 0.9 + (1 - acc) * 0.2 -> at acc = 0.8, q = 0.76
    value, low, high = a.calibrated(760, 1000)
    assert value == pytest.approx(0.8)
    assert low < value < high
    assert Agreement(10, 0.5, 0.0, 10, 0.5, 0.5).calibrated(5, 10) is None
    assert cohen_kappa(["correct"], ["correct"]) is None


def test_gauges_reach_the_servers_metrics(tmp_path):
    state = tmp_path / "state.json"
    write_state(
        state,
        {
            "temper_monitor_drift_alarm": [({"test": "input_mmd"}, 1.0)],
            "temper_monitor_cusum": [({}, 2.5)],
        },
    )
    assert read_state(state)["temper_monitor_cusum"] == [({}, 2.5)]
    text = generate_latest(ServeMetrics(str(state)).registry).decode()
    assert 'temper_monitor_drift_alarm{test="input_mmd"} 1.0' in text
    assert "temper_monitor_cusum 2.5" in text
    assert "temper_monitor_report_timestamp_seconds" in text
    with pytest.raises(ValueError, match="unknown monitor gauges"):
        write_state(state, {"nope": [({}, 1.0)]})
    with pytest.raises(ValueError, match="labels"):
        write_state(state, {"temper_monitor_drift_alarm": [({}, 1.0)]})
    state.write_text("{broken")
    assert "temper_monitor_cusum" not in generate_latest(ServeMetrics(str(state)).registry).decode()
    assert set(GAUGES) >= {"temper_monitor_quality", "temper_monitor_probe_alarm"}
