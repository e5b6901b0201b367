"""The shipped Prometheus files against a live stack: a real `temper serve` on loopback (the
real base model with a registered LoRA version, as in test_serve.py) driven by the `openai`
SDK, scraped every second by a real Prometheus loaded with configs/prometheus/alerts.yml. What
is tested is what an operator would see: the scraped counts equal the requests sent, the
monitor's state file arrives as gauges, the rules load and the drift alarm goes to pending,
and every dashboard query is valid PromQL on this Prometheus.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from registry_fixtures import make_project
from test_serve import free_port, serve_champion, stop, wait_until

from temper.online.monitor import dashboard, gauges

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="prometheus is not installed (Debian package `prometheus`; .ci/run installs it)",
    ),
]
ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "prometheus"
REQUESTS = 3
CHAT_200 = 'temper_requests_total{route="/v1/chat/completions",status="200"}'
CLAUSES = [
    "This Agreement shall be governed by the laws of the State of New York.",
    "Either party may terminate this Agreement upon ninety (90) days written notice.",
    "Licensee shall not assign this Agreement without the prior written consent of Licensor.",
]


class Prometheus:
    """A Prometheus process on loopback and its HTTP API."""

    def __init__(self, folder: Path, target_port: int):
        config = yaml.safe_load((SHIPPED / "prometheus.yml").read_text())
        # The shipped config, sped up (scrapes and rule evaluations every second) and pointed
        # at the test's server; the rule file is the shipped one, copied beside it.
        config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{target_port}"]}]
        shutil.copy(SHIPPED / "alerts.yml", folder / "alerts.yml")
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = folder / "prometheus.log"
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "w"),  # noqa: SIM115 - lives with the process
            start_new_session=True,
        )

    def api(self, path: str, **params: str) -> dict:
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, base_model_dir):
    """A served champion, the monitor's state file, a Prometheus scraping it; REQUESTS sent."""
    project = tmp_path_factory.mktemp("prometheus-project")
    make_project(project, base_model_dir)
    state_file = yaml.safe_load((project / "params.yaml").read_text())["monitor"]["state_file"]
    # What `temper monitor report` would leave: input drift alarmed, output drift did not.
    gauges.write_state(
        project / state_file,
        {
            "temper_monitor_drift_alarm": [({"test": "input_mmd"}, 1), ({"test": "output_mix"}, 0)],
            "temper_monitor_drift_p_value": [
                ({"test": "input_mmd"}, 0.001),
                ({"test": "output_mix"}, 0.4),
            ],
            "temper_monitor_judge_spend_usd": [({}, 1.0)],
            "temper_monitor_judge_budget_usd": [({}, 5.0)],
        },
    )
    prom = server = None
    try:
        server = serve_champion(project, base_model_dir)
        prom = Prometheus(tmp_path_factory.mktemp("prometheus"), server.port)
        wait_until(lambda: httpx.get(f"{prom.url}/-/ready").status_code == 200, 60, "prometheus")
        client = server.client()
        for text in CLAUSES[:REQUESTS]:
            client.chat.completions.create(
                model="champion", messages=[{"role": "user", "content": text}]
            )
        sent = time.time()
        # A scrape that started after the last answer has every request counted.
        wait_until(
            lambda: any(float(r["value"][1]) > sent for r in prom.query(f"timestamp({CHAT_200})")),
            60,
            "a scrape after the requests",
        )
        yield prom
    finally:
        if prom is not None:
            prom.stop()
        if server is not None:
            stop(server)


def test_scraped_values_are_what_the_server_did(stack):
    assert stack.value(CHAT_200) == REQUESTS
    assert stack.value('up{job="temper"}') == 1
    assert stack.value('temper_monitor_drift_alarm{test="input_mmd"}') == 1
    assert stack.value('temper_monitor_drift_alarm{test="output_mix"}') == 0
    tokens = stack.query("sum by (gen_ai_token_type) (gen_ai_server_token_usage_total)")
    assert {r["metric"]["gen_ai_token_type"] for r in tokens} == {"input", "output"}


def test_shipped_rules_load_and_the_drift_alert_goes_pending(stack):
    shipped = yaml.safe_load((SHIPPED / "alerts.yml").read_text())["groups"][0]["rules"]

    def evaluated() -> list[dict] | None:
        rules = [r for g in stack.api("rules")["groups"] for r in g["rules"]]
        drift = next((r for r in rules if r["name"] == "TemperDriftAlarm"), None)
        done = all(r["health"] != "unknown" for r in rules)
        return rules if done and drift and drift["state"] != "inactive" else None

    rules = wait_until(evaluated, 30, "the rules to be evaluated and the drift alert to go pending")
    assert [r["name"] for r in rules] == [r.get("alert") or r["record"] for r in shipped]
    assert {r["name"]: r["health"] for r in rules if r["health"] != "ok"} == {}
    drift = next(r for r in rules if r["name"] == "TemperDriftAlarm")
    assert drift["state"] in ("pending", "firing")  # pending for the shipped `for:`
    assert [a["labels"]["test"] for a in drift["alerts"]] == ["input_mmd"]
    down = next(r for r in rules if r["name"] == "TemperDown")
    assert down["state"] == "inactive"
    assert stack.value("temper:latency_p95_threshold_seconds") > 0  # the recording rule


def test_every_dashboard_query_is_valid_promql_here(stack):
    results = {}
    for expr in dashboard.expressions():
        # Grafana's interval variables, as Grafana would fill them in (stack.query checks
        # the status: a PromQL error fails here).
        filled = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
        results[expr] = stack.query(filled)
    chat = next(e for e in results if "temper_requests_total" in e)
    assert {r["metric"]["status"] for r in results[chat]} == {"200"}
    drift = next(e for e in results if "temper_monitor_drift_alarm" in e)
    assert {r["metric"]["test"]: r["value"][1] for r in results[drift]} == {
        "input_mmd": "1",
        "output_mix": "0",
    }
