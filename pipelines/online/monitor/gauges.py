"""The monitor's Prometheus gauges: `temper monitor report` writes them, `temper serve` exports them.

The checks run as commands (cron, CI), not inside the server, so their results travel through a
small JSON file (`monitor.state_file`, written atomically); the server's collector reads it at
each scrape. It is the node-exporter textfile pattern with the server as the exporter, so one
scrape target carries latency, tokens and quality together, and alert rules can also fire when
the file goes stale (`temper_monitor_report_timestamp_seconds`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from ...io import write_json

log = logging.getLogger("temper.monitor")

# name: (help, label names). The alert rules and the dashboard use these names; a test checks
# every name they use is exported.
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "temper_monitor_quality": (
        "Estimated accuracy of the last quality window (source: judge, human, calibrated).",
        ("source",),
    ),
    "temper_monitor_quality_low": (
        "Lower 95% Wilson bound of temper_monitor_quality.",
        ("source",),
    ),
    "temper_monitor_quality_baseline": ("Accuracy the quality alarms compare with.", ()),
    "temper_monitor_quality_alarm": ("1 when a quality rule alarmed (cusum, weekly).", ("rule",)),
    "temper_monitor_cusum": ("The Bernoulli CUSUM statistic on judged errors.", ()),
    "temper_monitor_cusum_threshold": ("The CUSUM's decision threshold h.", ()),
    "temper_monitor_drift_p_value": ("p-value of the last drift check, by test.", ("test",)),
    "temper_monitor_drift_alarm": ("1 when the last drift check alarmed, by test.", ("test",)),
    "temper_monitor_judge_spend_usd": ("What the monitor's judge has spent (USD).", ()),
    "temper_monitor_judge_budget_usd": ("The monitor judge's budget (USD).", ()),
    "temper_monitor_judge_agreement": (
        "Judge-human agreement (Cohen's kappa) on reviewed answers.",
        ("stat",),
    ),
    "temper_monitor_probe_agreement": (
        "Share of probe answers a tier repeated from its first recorded run.",
        ("tier",),
    ),
    "temper_monitor_probe_alarm": (
        "1 when a tier's probe answers changed beyond chance.",
        ("tier",),
    ),
    "temper_monitor_report_timestamp_seconds": ("When `temper monitor report` last ran.", ()),
}


def write_state(path: str | Path, values: dict[str, list[tuple[dict[str, str], float]]]) -> None:
    """Write the gauges (name -> [(labels, value)]) atomically; unknown names are errors."""
    unknown = sorted(set(values) - set(GAUGES))
    if unknown:
        raise ValueError(f"unknown monitor gauges: {unknown}")
    for name, rows in values.items():
        for labels, _ in rows:
            if set(labels) != set(GAUGES[name][1]):
                raise ValueError(f"{name}: labels {sorted(labels)}, expected {GAUGES[name][1]}")
    values = {**values, "temper_monitor_report_timestamp_seconds": [({}, time.time())]}
    body = {
        "gauges": {
            name: [{"labels": labels, "value": float(v)} for labels, v in rows]
            for name, rows in values.items()
        }
    }
    write_json(path, body)


def read_state(path: str | Path) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The gauges in a state file ({} when there is none yet)."""
    p = Path(path)
    if not p.exists():
        return {}
    data: Any = json.loads(p.read_text(encoding="utf-8"))
    return {
        name: [(dict(r["labels"]), float(r["value"])) for r in rows]
        for name, rows in data["gauges"].items()
        if name in GAUGES
    }


class StateCollector:
    """A prometheus_client collector that exports the state file at each scrape."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._warned = False

    def describe(self) -> list[Any]:
        return []  # nothing fixed: the file decides what exists

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            state = read_state(self.path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            if not self._warned:  # a bad file must not break /metrics
                log.warning("monitor: cannot read %s: %s", self.path, err)
                self._warned = True
            return
        for name, rows in sorted(state.items()):
            help_, labels = GAUGES[name]
            family = GaugeMetricFamily(name, help_, labels=list(labels))
            for values, value in rows:
                family.add_metric([values[k] for k in labels], value)
            yield family
