"""Done-when 4 of the monitoring issue, end to end: requests through a real `temper serve` (real
base model with a registered LoRA version, the real openai SDK), the request log it writes,
`temper monitor judge` against a fake judge API on loopback, a review file exported, filled in
and imported, `temper monitor report` and its gauges back at the server's /metrics, and the
requests as MLflow traces. The counts are checked at every step."""

from __future__ import annotations

import contextlib
import csv
import json

import httpx
import mlflow
import pytest
from fake_api import FakeAPI
from registry_fixtures import make_project
from test_serve import KEY, runner, serve_champion, stop, wait_until
from test_serve_route import CLAUSES as ROUTE_CLAUSES

from temper.cli import app
from temper.online.monitor import MonitorStore, sampled

pytestmark = pytest.mark.slow
CLAUSES = [
    *ROUTE_CLAUSES,
    "Write to legal@example.com with any notice under this Agreement.",
    "All disputes shall be settled by arbitration in London, England.",
]


def verdict(messages):
    answer = messages[-1]["content"].rsplit("Answer:", 1)[1]
    ok = "Governing Law" in answer or "Termination" in answer
    return json.dumps({"verdict": "correct" if ok else "incorrect", "reason": "fake judge"})


@pytest.fixture(scope="module")
def served(tmp_path_factory, base_model_dir):
    judge = FakeAPI(verdict).start()
    project = tmp_path_factory.mktemp("monitor-project")
    monitor = {
        "trace_share": 1.0,
        "judge": {
            "share": 0.5,
            "provider": {
                "kind": "openai",
                "model": "judge-model",
                "base_url": judge.openai_url,
                "cache": ".cache/judge.sqlite",
                "prices": {"judge-model": {"input": 1.0, "output": 2.0}},
                "max_usd": 1.0,
                "max_retries": 0,
            },
        },
        "review": {"share": 0.3},
        "quality": {"baseline_accuracy": 0.8},
    }
    make_project(project, base_model_dir, {"monitor": monitor})
    s = serve_champion(project, base_model_dir)
    with contextlib.chdir(project):
        yield s, judge
    stop(s)
    judge.stop()


def test_requests_to_judge_to_review_to_report(served):
    s, judge = served
    client = s.client()
    ids = []
    for i, clause in enumerate(CLAUSES):
        messages = [{"role": "user", "content": clause}]
        if i % 3 == 2:  # streamed answers are logged too
            stream = client.chat.completions.with_raw_response.create(
                model="champion", messages=messages, stream=True
            )
            ids.append(stream.headers["x-request-id"])
            assert "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices)
        else:
            raw = client.chat.completions.with_raw_response.create(
                model="champion", messages=messages
            )
            ids.append(raw.headers["x-request-id"])
            raw.parse()
    bad = httpx.post(
        f"{s.url}/v1/chat/completions",
        json={"model": "champion", "messages": [{"role": "system", "content": "no user"}]},
        headers={"authorization": f"Bearer {KEY}"},
    )
    assert bad.status_code == 400
    ids.append(bad.headers["x-request-id"])

    store_path = s.project / ".cache" / "monitor.sqlite"
    wait_until(
        lambda: store_path.exists() and MonitorStore(store_path).count() == len(ids), 60, "the log"
    )
    with MonitorStore(store_path) as store:
        rows = {r.id: r for r in store.requests()}
    assert sorted(rows) == sorted(ids)
    assert rows[ids[-1]].status == 400 and rows[ids[-1]].answer is None
    answered = [rows[i] for i in ids[:-1]]
    assert all(r.status == 200 and r.answer and r.tier == "self" for r in answered)
    assert all(r.version == "1" and r.prompt_tokens and r.latency_ms > 0 for r in answered)
    assert all(r.embedding is not None and r.embedding.shape == (384,) for r in answered)
    assert all(r.confidence is not None for r in answered)
    kept = [r for r in answered if r.input_text]
    assert all("legal@example.com" not in r.input_text for r in kept)  # redacted
    # The text never reaches the log lines (serve.log_prompts is off).
    log_text = s.log.read_text()
    assert "ninety (90) days" not in log_text and '"_text"' not in log_text

    # The judge: the sampled share with a kept text, each once.
    result = runner.invoke(app, ["monitor", "judge"])
    assert result.exit_code == 0, result.output
    to_judge = [r for r in answered if sampled(r.id, "temper-monitor-v1", 0.5)]
    assert to_judge and all(r.input_text for r in to_judge)
    assert f"judged {len(to_judge)} " in result.output
    assert judge.requests == len(to_judge)
    again = runner.invoke(app, ["monitor", "judge"])
    assert "judged 0 " in again.output and judge.requests == len(to_judge)

    # Review: export, a reviewer fills in every row, import.
    result = runner.invoke(app, ["monitor", "review", "export"])
    assert result.exit_code == 0, result.output
    path = s.project / "reports" / "monitor" / "review" / "review.csv"
    with path.open(newline="") as handle:
        exported = list(csv.DictReader(handle))
    with MonitorStore(store_path) as store:
        verdicts = store.verdicts()
    expected = {
        r.id
        for r in answered
        if sampled(r.id, "temper-review-v1", 0.3)
        or r.confidence < 0.5
        or (r.id in verdicts and verdicts[r.id]["verdict"] != "correct")
    }
    assert {r["request_id"] for r in exported} == expected
    assert f"{len(expected)} answers to review" in result.output
    for r in exported:
        r["verdict"] = "correct" if "Governing Law" in r["answer"] else "incorrect"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(exported[0]))
        writer.writeheader()
        writer.writerows(exported)
    result = runner.invoke(app, ["monitor", "review", "import", str(path)])
    assert result.exit_code == 0, result.output
    assert f"imported {len(exported)} reviews" in result.output
    both = set(verdicts) & {r["request_id"] for r in exported}
    assert f"judge vs human on {len(both)}:" in result.output

    # The report and its gauges, exported by the running server.
    result = runner.invoke(app, ["monitor", "report", "--no-embed"])
    assert result.exit_code in (0, 3), result.output
    assert f"{len(ids)} requests" in result.output
    report = (s.project / "reports" / "monitor" / "report.md").read_text()
    assert "## Quality" in report and (s.project / "reports/monitor/quality.png").exists()
    metrics = s.metrics()
    assert 'temper_monitor_quality{source="judge"}' in metrics
    assert f"temper_monitor_log_rows_total {float(len(ids))}" in metrics
    assert "temper_monitor_log_dropped_total 0.0" in metrics

    # Every logged request is an MLflow trace in the serving experiment.
    mlflow.set_tracking_uri(f"sqlite:///{s.project / 'mlflow.db'}")
    experiment = mlflow.MlflowClient().get_experiment_by_name("temper-serve")
    assert experiment is not None

    def traced() -> set[str]:
        found = mlflow.search_traces(experiment_ids=[experiment.experiment_id], return_type="list")
        return {t.info.tags.get("temper.request_id") for t in found}

    # The log's thread writes a batch's traces after its rows: they may trail a little.
    try:
        wait_until(lambda: traced() == set(ids), 60, "a trace of every request")
    except AssertionError:
        warnings = [line for line in s.log_lines() if line.get("logger") == "temper.monitor"]
        raise AssertionError(f"traced {traced()} of {ids}; monitor log lines: {warnings}") from None
