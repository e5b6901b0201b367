"""`temper monitor report` and `temper monitor probe` through the CLI, without the model: a
store of logged requests with verdicts whose error rate rises, answers whose label mix moved,
and API tiers that are fake vendor servers on loopback (real openai / anthropic SDKs)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import yaml
from fake_api import FakeAPI
from typer.testing import CliRunner

from temper.cli import app
from temper.online.monitor import LoggedRequest, MonitorStore
from temper.online.monitor.gauges import read_state

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
DAY = 86400.0


def write_params(tmp: Path, monitor: dict, route: dict | None = None) -> Path:
    params = {
        "task": str(ROOT / "configs" / "tasks" / "clause_review.yaml"),
        "monitor": {
            "path": str(tmp / "monitor.sqlite"),
            "report_dir": str(tmp / "report"),
            "state_file": str(tmp / "state.json"),
            **monitor,
        },
    }
    if route:
        params["route"] = route
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def logged(tmp: Path, n_days: int, per_day: int, error_rate, label_of) -> None:
    """Logged answers over `n_days`, each judged: wrong with `error_rate(day)`."""
    rng = np.random.default_rng(0)
    t0 = time.time() - n_days * DAY
    with MonitorStore(tmp / "monitor.sqlite") as store:
        rows = []
        for day in range(n_days):
            for i in range(per_day):
                rid = f"d{day:02d}-{i:03d}"
                label = label_of(day, i)
                rows.append(
                    LoggedRequest(
                        id=rid,
                        ts=t0 + day * DAY + i * DAY / per_day,
                        tier="self",
                        status=200,
                        latency_ms=300.0 + i,
                        answer=json.dumps({"clause_type": label}),
                        labels={"clause_type": label},
                        confidence=0.9,
                    )
                )
        store.add_requests(rows)
        for r in rows:
            day = int(r.id[1:3])
            wrong = rng.random() < error_rate(day)
            store.add_verdict(r.id, "incorrect" if wrong else "correct", "judge", 0.0, False)


def reference(tmp: Path) -> Path:
    labels = ["Governing Law"] * 60 + ["Termination For Convenience"] * 40
    path = tmp / "predictions.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": i, "answer": {"clause_type": x}, "confidence": {"clause_type": 0.9}})
            + "\n"
            for i, x in enumerate(labels)
        )
    )
    return path


def test_report_raises_the_quality_and_output_alarms(tmp_path):
    # 80% accurate for 10 days, then 60% for 4; the label mix turns to one label at the end.
    logged(
        tmp_path,
        14,
        40,
        lambda d: 0.2 if d < 10 else 0.4,
        lambda d, i: "Governing Law" if d >= 9 or i % 5 < 3 else "Termination For Convenience",
    )
    params = write_params(
        tmp_path,
        {
            "quality": {"baseline_accuracy": 0.8, "rule": "both"},
            "drift": {"reference_predictions": str(reference(tmp_path)), "window": 100},
        },
    )
    result = runner.invoke(app, ["monitor", "report", "-p", str(params), "--no-embed"])
    assert result.exit_code == 3, result.output
    assert "quality:cusum" in result.output and "drift:output_labels" in result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    c = report["quality"]["cusum"]
    assert c["alarm"] and c["statistic"] >= c["h"]
    # The alarm comes after the drop, not before it.
    assert c["alarm_at"] > time.time() - 4 * DAY - 60
    assert len(report["quality"]["judge_windows"]) in (14, 15)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "ALARM" in md and "input drift: no embedder" in md
    for png in ("quality.png", "traffic.png", "drift.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000
    state = read_state(tmp_path / "state.json")
    assert state["temper_monitor_quality_alarm"] == [
        ({"rule": "cusum"}, 1.0),
        ({"rule": "weekly"}, 1.0),
    ]
    assert ({"test": "output_labels"}, 1.0) in state["temper_monitor_drift_alarm"]


def test_report_is_quiet_in_control(tmp_path):
    logged(
        tmp_path,
        14,
        40,
        lambda d: 0.2,
        lambda d, i: "Governing Law" if i % 5 < 3 else "Termination For Convenience",
    )
    params = write_params(
        tmp_path,
        {
            "quality": {"baseline_accuracy": 0.8},
            "drift": {"reference_predictions": str(reference(tmp_path)), "window": 100},
        },
    )
    result = runner.invoke(app, ["monitor", "report", "-p", str(params), "--no-embed"])
    assert result.exit_code == 0, result.output
    assert "alarms: none" in result.output


def test_report_without_a_log_is_a_clear_error(tmp_path):
    params = write_params(tmp_path, {})
    result = runner.invoke(app, ["monitor", "report", "-p", str(params), "--no-embed"])
    assert result.exit_code == 2
    assert "monitor.sqlite does not exist" in result.output


def test_probe_sees_a_silent_vendor_update(tmp_path):
    source = tmp_path / "validation.jsonl"
    source.write_text(
        "".join(
            json.dumps({"id": f"v{i}", "text": f"Clause number {i}."}) + "\n" for i in range(30)
        )
    )
    answer = {"label": "Governing Law"}

    def responder(messages):
        return json.dumps({"clause_type": answer["label"], "key_term": None})

    with FakeAPI(responder) as api:
        tier = {
            "name": "frontier",
            "provider": {
                "kind": "anthropic",
                "model": "claude-x",
                "base_url": api.anthropic_url,
                "cache": str(tmp_path / "llm.sqlite"),
                "prices": {"claude-x": {"input": 1.0, "output": 5.0}},
                "max_retries": 0,
            },
        }
        params = write_params(
            tmp_path,
            {"probe": {"source": str(source), "size": 20}},
            {"tiers": [tier]},
        )
        first = runner.invoke(app, ["monitor", "probe", "-p", str(params)])
        assert first.exit_code == 0, first.output
        assert "20/20 answered; recorded as the reference run" in first.output
        same = runner.invoke(app, ["monitor", "probe", "-p", str(params)])
        assert same.exit_code == 0, same.output
        assert "20 of 20 repeat the reference" in same.output
        assert api.requests == 40  # each run asks afresh: no cached probe answers
        answer["label"] = "Termination For Convenience"  # the vendor's quiet update
        changed = runner.invoke(app, ["monitor", "probe", "-p", str(params)])
        assert changed.exit_code == 3, changed.output
        assert "0 of 20 repeat the reference" in changed.output and "ALARM" in changed.output
        report = runner.invoke(app, ["monitor", "report", "-p", str(params), "--no-embed"])
    assert "probe:frontier" in report.output


def test_probe_refuses_the_offline_oracle_and_no_tiers(tmp_path):
    gold = {"tiers": [{"name": "mid", "provider": {"kind": "gold", "model": "gold"}}]}
    result = runner.invoke(app, ["monitor", "probe", "-p", str(write_params(tmp_path, {}, gold))])
    assert result.exit_code == 2
    assert "['mid'] are `gold` (the offline oracle)" in result.output
    result = runner.invoke(app, ["monitor", "probe", "-p", str(write_params(tmp_path, {}))])
    assert result.exit_code == 2
    assert "no API tier to probe" in result.output


class HashVectors:
    """Embeds a text as a seeded Gaussian vector (the same text, the same vector)."""

    name, max_tokens = "hash-vectors", 256

    def embed(self, texts):
        import hashlib

        return np.stack(
            [
                np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))
                .normal(size=8)
                .astype(np.float32)
                for t in texts
            ]
        )


def test_report_runs_input_drift_against_the_grouped_reference(tmp_path):
    prepared = tmp_path / "train.jsonl"
    prepared.write_text(
        "".join(
            json.dumps({"id": i, "text": f"reference clause {i}", "group": f"contract-{i // 4}"})
            + "\n"
            for i in range(240)
        )
    )
    rng = np.random.default_rng(3)
    monitor = {
        "quality": {"baseline_accuracy": 0.8},
        "drift": {
            "reference": [str(prepared)],
            "reference_predictions": str(reference(tmp_path)),
            "window": 60,
        },
    }
    params = write_params(tmp_path, monitor)
    from temper.online.monitor import MonitorConfig
    from temper.online.monitor.checks import run_checks
    from temper.task import load_task

    cfg = MonitorConfig.model_validate(yaml.safe_load(params.read_text())["monitor"])
    task = load_task(ROOT / "configs" / "tasks" / "clause_review.yaml")
    found = {}
    for shift in (0.0, 1.0):
        with MonitorStore(tmp_path / f"m-{shift}.sqlite") as store:
            store.add_requests(
                [
                    LoggedRequest(
                        id=f"r{i}",
                        ts=1e9 + i,
                        status=200,
                        tier="self",
                        embedding=(rng.normal(size=8) + shift).astype(np.float32),
                    )
                    for i in range(60)
                ]
            )
            result = run_checks(cfg, task, store, HashVectors())
        found[shift] = {d["name"]: d["alarm"] for d in result.drift}
    assert set(found[0.0]) >= {"input_mmd", "input_classifier"}
    assert not any(found[0.0].values()), found
    assert found[1.0]["input_mmd"] and found[1.0]["input_classifier"], found
    assert list((tmp_path / "report").glob("reference-*.npy"))  # the reference is cached
