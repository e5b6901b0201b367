"""The Grafana dashboard of `temper serve` and its monitor, built from a table of panels.

`python -m temper.online.monitor.dashboard configs/grafana/temper.json` writes it; the
committed JSON is checked against this module by tests/test_monitor_prometheus.py, so the
two cannot drift apart, and every metric a panel queries must be one the server exports.

The datasource is the `${DS_PROMETHEUS}` input of Grafana's import dialog, and also a
datasource variable of the same name, so the file works provisioned too (Grafana does not
fill `__inputs` when provisioning: grafana/grafana#10786). The monitor gauges come from one
state file every replica exports, so panels take their max; serving metrics are summed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
RATE = "$__rate_interval"  # Grafana's: at least four scrape intervals, so rate() has points
WIDTH, HEIGHT = 12, 8  # two panels a row on Grafana's 24-column grid
GRAFANA_VERSION = "10.4.0"
DAY = 86400


def quantile(q: float, metric: str) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket[{RATE}])))"


def rate(metric: str, by: str = "") -> str:
    return f"sum{f' by ({by})' if by else ''} (rate({metric}[{RATE}]))"


class Panel(NamedTuple):
    """A panel: {legend: PromQL}, a Grafana unit, timeseries / stacked / stat, and a stat's
    colour steps as (from value, colour) after green."""

    title: str
    unit: str
    targets: dict[str, str]
    kind: str = "timeseries"
    steps: tuple[tuple[float, str], ...] = ()


LAT = "gen_ai_server_request_duration_seconds"
TTFT = "gen_ai_server_time_to_first_token_seconds"
ANSWERS = "temper_route_answers_total"
CHAT = 'temper_requests_total{route="/v1/chat/completions"}'

ROWS: dict[str, tuple[Panel, ...]] = {
    "Serving": (
        Panel("Request latency", "s", {  # the threshold: the recording rule in alerts.yml
            "p50": quantile(0.5, LAT),
            "p95": quantile(0.95, LAT),
            "p95 alert threshold": "temper:latency_p95_threshold_seconds",
        }),
        Panel("Time to first token, per output token", "s", {
            "TTFT p50": quantile(0.5, TTFT),
            "TTFT p95": quantile(0.95, TTFT),
            "per output token p95": quantile(0.95, "gen_ai_server_time_per_output_token_seconds"),
        }),
        Panel("Tokens per second", "short", {
            "{{gen_ai_token_type}}": rate("gen_ai_server_token_usage_total", "gen_ai_token_type"),
        }),
        Panel("Chat requests by status", "reqps", {"{{status}}": rate(CHAT, "status")}, "stacked"),
        Panel("Queue and batches", "short", {
            "queued requests": "sum(temper_queue_depth)",
            "mean batch": f"{rate('temper_batch_size_sum')} / {rate('temper_batch_size_count')}",
        }),
        Panel("Loaded adapters, registry", "short", {
            "v{{version}}": "sum by (registered_model, version) (temper_adapter_loaded)",
            "registry up": "min(temper_registry_up)",
        }),
    ),
    "Routing and cache": (
        Panel("Answers by tier", "percentunit", {
            "{{tier}}": f"{rate(ANSWERS, 'tier')} / ignoring (tier) group_left () {rate(ANSWERS)}",
        }, "stacked"),
        Panel("Cache hits", "reqps", {"{{kind}}": rate("temper_cache_hits_total", "kind")}, "stacked"),
        Panel("Route cost per hour", "currencyUSD", {
            "{{tier}}": f"{rate('temper_route_cost_usd_total', 'tier')} * 3600",
        }, "stacked"),
        Panel("Tier failures", "reqps", {
            "{{tier}} {{reason}}": rate("temper_route_tier_failures_total", "tier, reason"),
        }),
    ),
    "Monitor": (
        Panel("Request log", "short", {
            "rows/s written": rate("temper_monitor_log_rows_total"),
            "rows/s dropped": rate("temper_monitor_log_dropped_total"),
            "rows queued": "sum(temper_monitor_log_queue)",
        }),
        Panel("Alarms at the last report", "short", {
            "drift {{test}}": "max by (test) (temper_monitor_drift_alarm)",
            "quality {{rule}}": "max by (rule) (temper_monitor_quality_alarm)",
            "probe {{tier}}": "max by (tier) (temper_monitor_probe_alarm)",
        }, "stat", ((1, "red"),)),
        Panel("Drift p-values", "short", {
            "{{test}}": "max by (test) (temper_monitor_drift_p_value)",
        }),
        Panel("Quality", "percentunit", {
            "{{source}}": "max by (source) (temper_monitor_quality)",
            "{{source}} lower 95%": "max by (source) (temper_monitor_quality_low)",
            "baseline": "max(temper_monitor_quality_baseline)",
        }),
        Panel("CUSUM", "short", {
            "CUSUM": "max(temper_monitor_cusum)",
            "threshold h": "max(temper_monitor_cusum_threshold)",
        }),
        Panel("Judge spend", "currencyUSD", {
            "spent": "max(temper_monitor_judge_spend_usd)",
            "budget": "max(temper_monitor_judge_budget_usd)",
        }),
        Panel("Agreement (probe repeats; judge-human kappa)", "short", {
            "probe {{tier}}": "max by (tier) (temper_monitor_probe_agreement)",
            "judge-human {{stat}}": "max by (stat) (temper_monitor_judge_agreement)",
        }),
        # Red once TemperMonitorReportStale's two days have passed.
        Panel("Monitor report age", "s", {
            "age": "time() - max(temper_monitor_report_timestamp_seconds)",
        }, "stat", ((DAY, "yellow"), (2 * DAY, "red"))),
    ),
}  # fmt: skip


def _panel(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    stat = panel.kind == "stat"
    steps = [{"color": "green", "value": None}]
    steps += [{"color": color, "value": value} for value, color in panel.steps]
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "thresholds": {"mode": "absolute", "steps": steps},
    }
    if stat:
        options: dict[str, Any] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "textMode": "value_and_name",
        }
    else:
        stacked = panel.kind == "stacked"
        mode = "normal" if stacked else "none"
        custom = {"stacking": {"mode": mode, "group": "A"}, "fillOpacity": 30 if stacked else 0}
        defaults["custom"] = custom
        options = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "none"},
        }
    return {
        "id": pid,
        "type": "stat" if stat else "timeseries",
        "title": panel.title,
        "datasource": DS,
        "gridPos": {"h": HEIGHT, "w": WIDTH, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [
            {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(65 + i)}
            for i, (legend, expr) in enumerate(panel.targets.items())
        ],
    }


def panels() -> list[dict[str, Any]]:
    """Rows and their panels, ids numbered in table order, laid out two a row."""
    out: list[dict[str, Any]] = []
    y = 0
    for title, row in ROWS.items():
        grid = {"h": 1, "w": 24, "x": 0, "y": y}
        out.append({"id": len(out) + 1, "type": "row", "title": title, "collapsed": False})
        out[-1].update(gridPos=grid, panels=[])
        y += 1
        for i, panel in enumerate(row):
            out.append(_panel(panel, len(out) + 1, (i % 2) * WIDTH, y + (i // 2) * HEIGHT))
        y += (len(row) + 1) // 2 * HEIGHT
    return out


def dashboard() -> dict[str, Any]:
    """The dashboard in Grafana's export format (with `__inputs`: importable as is)."""
    source = {"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource"}
    plugin = {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"}
    requires = [{"type": "grafana", "id": "grafana", "name": "Grafana", "version": GRAFANA_VERSION}]
    requires += [
        plugin,
        *({"type": "panel", "id": k, "name": k, "version": ""} for k in ("stat", "timeseries")),
    ]
    return {
        "__inputs": [
            source | {"description": "", "pluginId": "prometheus", "pluginName": "Prometheus"}
        ],
        "__requires": requires,
        "annotations": {"list": []},
        "description": "temper serve: latency, tokens, routing, cache, and the monitor's gauges.",
        "editable": True,
        "graphTooltip": 1,  # a shared crosshair: latency, queue and errors line up in time
        "id": None,
        "links": [],
        "panels": panels(),
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["temper"],
        "templating": {"list": [source | {"query": "prometheus", "hide": 0, "current": {}}]},
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "Temper",
        "uid": "temper",
        "version": 1,
    }


def expressions(board: dict[str, Any] | None = None) -> list[str]:
    """Every PromQL expression of the dashboard."""
    board = dashboard() if board is None else board
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def render() -> str:
    """The dashboard's JSON text, as committed."""
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def write_dashboard(path: str | Path) -> Path:
    """Write the dashboard JSON to `path` (its folder created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(), encoding="utf-8")
    return out


if __name__ == "__main__":
    print(write_dashboard(sys.argv[1] if len(sys.argv) > 1 else "configs/grafana/temper.json"))
