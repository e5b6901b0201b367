"""The Prometheus config, alert rules and Grafana dashboard (configs/prometheus, configs/grafana)
against the code: the committed dashboard is what dashboard.py generates, every metric they
query is one `temper serve` exports, and promtool accepts the files and passes the rules' unit
tests. The same files against a live server and Prometheus: test_monitor_prometheus_live.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from temper.online.monitor import dashboard
from temper.online.monitor.gauges import GAUGES
from temper.online.serve.metrics import ServeMetrics

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "configs" / "prometheus"
GRAFANA_JSON = ROOT / "configs" / "grafana" / "temper.json"
# Words of PromQL that look like metric names: keywords, and literals.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (a parser for the subset the files use)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # label values
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range selectors ([5m], [$__rate_interval])
    s = re.sub(GROUPING, " ", s)  # label names in by (...), on (...)
    names = set()
    for m in re.finditer(r"(?<![\w.:$])[A-Za-z_:][\w:]*", s):
        if m.group() not in KEYWORDS and not s[m.end() :].lstrip().startswith("("):
            names.add(m.group())  # not a function call
    return names


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def exported() -> set[str]:
    """Every series name `temper serve` can export, Prometheus's `up`, and the recorded rules."""
    names = {"up"} | set(GAUGES)
    for family in ServeMetrics().registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names | {rule["record"] for rule in alert_rules() if "record" in rule}


def test_committed_dashboard_is_what_the_code_generates():
    assert GRAFANA_JSON.read_text(encoding="utf-8") == dashboard.render(), (
        "configs/grafana/temper.json is stale: run "
        "`python -m temper.online.monitor.dashboard configs/grafana/temper.json`"
    )


def test_metric_names_are_parsed_out_of_promql():
    expr = (
        'sum by (le, route) (rate(a_bucket{route="/v1/x",status=~"5.."}[$__rate_interval])) '
        "/ ignoring (tier) group_left () max(b:rec) * 2.5e3 > bool scalar(c_total offset 5m)"
        " and time() - d > 2 * 86400"
    )
    assert metric_names(expr) == {"a_bucket", "b:rec", "c_total", "d"}


def test_every_metric_queried_is_exported():
    known = exported()
    # Sanity of the known set itself: ServeMetrics' names with prometheus_client's suffixes.
    assert {"temper_requests_total", "gen_ai_server_request_duration_seconds_bucket"} <= known
    queries = {f"dashboard: {e}": e for e in dashboard.expressions()}
    queries |= {
        f"alert {r['alert']}: {r['expr']}": r["expr"] for r in alert_rules() if "alert" in r
    }
    unknown = {}
    for where, expr in queries.items():
        names = metric_names(expr)
        assert names, f"no metric found in {where}"  # the parser must see something
        if names - known:
            unknown[where] = sorted(names - known)
    assert not unknown, unknown


def test_every_alert_is_labelled_and_explained():
    alerts = [r for r in alert_rules() if "alert" in r]
    names = [r["alert"] for r in alerts]
    assert len(names) == len(set(names))
    for rule in alerts:
        assert "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_dashboard_ids_are_unique_and_panels_do_not_overlap():
    board = dashboard.dashboard()
    assert board["uid"] == "temper" and board["schemaVersion"] == 39
    ids = [p["id"] for p in board["panels"]]
    assert ids == list(range(1, len(ids) + 1))
    cells = set()
    for p in board["panels"]:
        g = p["gridPos"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert g["x"] + g["w"] <= 24 and not cells & mine, p["title"]
        cells |= mine
    refs = {t["datasource"]["uid"] for p in board["panels"] for t in p.get("targets", [])}
    assert refs == {"${DS_PROMETHEUS}"}
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian package `prometheus`; .ci/run installs it)",
)
@pytest.mark.parametrize(
    "args",
    [
        ["check", "rules", "alerts.yml"],
        ["check", "config", "prometheus.yml"],
        ["test", "rules", "alerts_test.yml"],
    ],
    ids=" ".join,
)
def test_promtool_accepts_the_files(args):
    done = subprocess.run(
        ["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
