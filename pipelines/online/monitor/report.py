"""`temper monitor report`: the checks as markdown with plots, report.json, and the gauges.

Outputs in `monitor.report_dir`: report.md, report.json (`MonitorResult`), quality.png
(judged accuracy per window with Wilson intervals, and the CUSUM path against its threshold),
traffic.png (tier shares and latency per window) and drift.png (each test's p-value against
alpha). The gauges go to `monitor.state_file` for `temper serve` to export at /metrics.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from ...io import atomic_open
from .checks import MonitorResult
from .gauges import write_state


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M")


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def gauges(result: MonitorResult) -> dict[str, list[tuple[dict[str, str], float]]]:
    q = result.quality
    out: dict[str, list[tuple[dict[str, str], float]]] = {
        "temper_monitor_quality_baseline": [({}, q["baseline_accuracy"])],
        "temper_monitor_judge_spend_usd": [({}, result.judge["spent_usd"])],
        "temper_monitor_judge_budget_usd": [({}, result.judge["budget_usd"])],
        "temper_monitor_drift_p_value": [({"test": t["name"]}, t["p_value"]) for t in result.drift],
        "temper_monitor_drift_alarm": [
            ({"test": t["name"]}, float(t["alarm"])) for t in result.drift
        ],
        "temper_monitor_quality": [],
        "temper_monitor_quality_low": [],
        "temper_monitor_quality_alarm": [],
        "temper_monitor_probe_agreement": [
            ({"tier": k}, v["agreement"]) for k, v in result.probes.items() if v["agreement"]
        ],
        "temper_monitor_probe_alarm": [
            ({"tier": k}, float(v["alarm"])) for k, v in result.probes.items()
        ],
    }
    for source in ("judge", "human"):
        ws = q.get(f"{source}_windows") or []
        if ws and ws[-1]["accuracy"] is not None:
            out["temper_monitor_quality"].append(({"source": source}, ws[-1]["accuracy"]))
            out["temper_monitor_quality_low"].append(({"source": source}, ws[-1]["low"]))
    if q.get("calibrated"):
        value, low, _ = q["calibrated"]
        out["temper_monitor_quality"].append(({"source": "calibrated"}, value))
        out["temper_monitor_quality_low"].append(({"source": "calibrated"}, low))
    if "cusum" in q:
        c = q["cusum"]
        out["temper_monitor_cusum"] = [({}, c["statistic"])]
        out["temper_monitor_cusum_threshold"] = [({}, c["h"])]
        out["temper_monitor_quality_alarm"].append(({"rule": "cusum"}, float(c["alarm"])))
    if "weekly" in q:
        out["temper_monitor_quality_alarm"].append(
            ({"rule": "weekly"}, float(q["weekly"]["alarm"]))
        )
    kappa = q["agreement"].get("kappa")
    if kappa is not None:
        out["temper_monitor_judge_agreement"] = [
            ({"stat": "kappa"}, kappa),
            ({"stat": "agreement"}, q["agreement"]["agreement"]),
        ]
    return out


def plots(result: MonitorResult, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    q = result.quality
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ws = q.get("judge_windows") or []
    if ws:
        x = [dt.datetime.fromtimestamp(w["start"], dt.UTC) for w in ws]
        acc = [w["accuracy"] if w["accuracy"] is not None else float("nan") for w in ws]
        lo = [
            a - w["low"] if w["accuracy"] is not None else 0 for a, w in zip(acc, ws, strict=True)
        ]
        hi = [
            w["high"] - a if w["accuracy"] is not None else 0 for a, w in zip(acc, ws, strict=True)
        ]
        axes[0].errorbar(x, acc, yerr=[lo, hi], fmt="o-", capsize=3, label="judged (95% Wilson)")
    axes[0].axhline(q["baseline_accuracy"], color="grey", ls="--", label="baseline")
    axes[0].set(title="Judged accuracy per window", ylim=(0, 1.02), ylabel="accuracy")
    axes[0].legend(loc="lower left", fontsize=8)
    axes[0].tick_params(axis="x", labelrotation=30, labelsize=7)
    if "cusum" in q:
        c = q["cusum"]
        axes[1].plot(range(1, len(c["path"]) + 1), c["path"], lw=1)
        axes[1].axhline(c["h"], color="red", ls="--", label=f"h = {c['h']:.2f}")
        axes[1].legend(fontsize=8)
    axes[1].set(title="Bernoulli CUSUM on judged errors", xlabel="judged answer", ylabel="S")
    fig.tight_layout()
    made.append(out / "quality.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    tw = result.traffic.get("windows") or []
    x = [dt.datetime.fromtimestamp(w["start"], dt.UTC) for w in tw]
    tiers = sorted({t for w in tw for t in w["tier_share"]})
    bottom = [0.0] * len(tw)
    for tier in tiers:  # stacked shares per window: self, the API tiers, the cache
        share = [w["tier_share"].get(tier, 0.0) for w in tw]
        axes[0].bar(
            x,
            share,
            bottom=bottom,
            width=0.8 * (tw[1]["start"] - tw[0]["start"]) / 86400 if len(tw) > 1 else 0.5,
            label=tier,
        )
        bottom = [b + v for b, v in zip(bottom, share, strict=True)]
    axes[0].set(title="Answers by tier per window", ylabel="share", ylim=(0, 1))
    if tiers:
        axes[0].legend(fontsize=8)
    for key, label in (("latency_ms_p50", "p50"), ("latency_ms_p95", "p95")):
        axes[1].plot(
            x, [w[key] if w[key] is not None else float("nan") for w in tw], "o-", label=label
        )
    axes[1].set(title="Latency per window (ms)")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    made.append(out / "traffic.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)

    if result.drift:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        names = [d["name"] for d in result.drift]
        ax.bar(names, [max(d["p_value"], 1e-6) for d in result.drift])
        ax.set_yscale("log")
        ax.axhline(0.01, color="red", ls="--", label="alpha")
        ax.set(title="Drift tests (p-value, log scale)")
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        made.append(out / "drift.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    return made


def markdown(result: MonitorResult) -> str:
    """report.md: traffic, quality, drift and probes, each section beside its plot."""
    j = result.judge
    lines = [
        *_head_lines(result),
        *_traffic_lines(result.traffic),
        *_quality_lines(result.quality),
        *_drift_lines(result),
        *_probe_lines(result),
        "",
        f"Judge spend ${j['spent_usd']:.4f} of ${j['budget_usd']:.2f}.",
        "",
    ]
    return "\n".join(lines)


def _head_lines(result: MonitorResult) -> list[str]:
    """The title, the period covered and the alarms, so the verdict comes first."""
    t = result.traffic
    return [
        "# Monitor report",
        "",
        f"Generated {when(result.generated)} UTC over {t['requests']} logged requests "
        f"({when(t['first'])} to {when(t['last'])}).",
        "",
        "**Alarms: " + (", ".join(result.alarms) if result.alarms else "none") + "**",
        "",
    ]


def _traffic_lines(t: dict[str, Any]) -> list[str]:
    """The traffic section: errors, cache and tier shares, latency, tokens."""
    return [
        "## Traffic",
        "",
        f"- answered {t['answered']}, server errors {t['server_errors']} "
        f"({pct(t['error_rate'])}); cache share {pct(t['cache_share'])}",
        "- tiers: " + ", ".join(f"{k} {pct(v)}" for k, v in t["tier_share"].items()),
        f"- latency p50 {t['latency_ms_p50'] or 0:.0f} ms, p95 {t['latency_ms_p95'] or 0:.0f} ms; "
        f"tokens {t['prompt_tokens']} in, {t['completion_tokens']} out",
        "",
        "![traffic](traffic.png)",
        "",
    ]


def _quality_lines(q: dict[str, Any]) -> list[str]:
    """The quality section: judged accuracy, the alarm rules, the per-window table."""
    lines = [
        "## Quality",
        "",
        f"Baseline accuracy {pct(q['baseline_accuracy'])}. Judged answers {q['judged']}: "
        f"accuracy {pct(q['judged_accuracy'])} [{pct(q['judged_interval'][0])}, "
        f"{pct(q['judged_interval'][1])}] (95% Wilson).",
        *_quality_notes(q),
        "",
        "| window start | judged | correct | accuracy | 95% interval |",
        "|---|---|---|---|---|",
    ]
    for w in q.get("judge_windows") or []:
        lines.append(
            f"| {when(w['start'])} | {w['judged']} | {w['correct']} | {pct(w['accuracy'])} | "
            f"[{pct(w['low'])}, {pct(w['high'])}] |"
        )
    return [*lines, "", "![quality](quality.png)", ""]


def _quality_notes(q: dict[str, Any]) -> list[str]:
    """The optional quality lines (judge agreement, calibration, CUSUM, weekly rule): each
    only when the check ran, so a report never shows a number that was not computed."""
    lines: list[str] = []
    a = q["agreement"]
    if a["n"]:
        kappa = "-" if a["kappa"] is None else f"{a['kappa']:.2f}"
        lines.append(
            f"Judge vs human on {a['n']} answers: agreement {pct(a['agreement'])}, "
            f"Cohen's kappa {kappa}."
        )
    if q.get("calibrated"):
        v, lo, hi = q["calibrated"]
        lines.append(
            f"Calibrated by the reviews of the random share: accuracy {pct(v)} "
            f"[{pct(lo)}, {pct(hi)}]."
        )
    if "cusum" in q:
        c = q["cusum"]
        state = f"ALARM at {when(c['alarm_at'])}" if c["alarm"] else "no alarm"
        lines.append(
            f"CUSUM (p0 {c['p0']:.3f} -> p1 {c['p1']:.3f}, h {c['h']:.2f}, designed for "
            f"{c['false_alarms_per_year']:g} false alarm(s) a year at {c['judged_per_day']:.0f} "
            f"judged a day): S = {c['statistic']:.2f}, {state}."
        )
    if "weekly" in q:
        lines.append(f"Weekly rule: {'ALARM' if q['weekly']['alarm'] else 'no alarm'}.")
    return lines


def _drift_lines(result: MonitorResult) -> list[str]:
    """The drift section: one row per test that ran, then the tests skipped and why."""
    lines = ["## Drift", ""]
    if result.drift:
        lines += ["| test | statistic | p-value | alarm |", "|---|---|---|---|"]
        for d in result.drift:
            lines.append(
                f"| {d['name']} | {d['statistic']:.4g} | {d['p_value']:.4g} | "
                f"{'yes' if d['alarm'] else 'no'} |"
            )
        lines += ["", "![drift](drift.png)"]
    return lines + [f"- skipped: {s}" for s in result.drift_skipped]


def _probe_lines(result: MonitorResult) -> list[str]:
    """The provider probes section (only when probes ran): agreement per API tier."""
    if not result.probes:
        return []
    lines = [
        "",
        "## Provider probes",
        "",
        "| tier | agreement | p-value | alarm |",
        "|---|---|---|---|",
    ]
    for tier, v in result.probes.items():
        lines.append(
            f"| {tier} | {pct(v['agreement'])} | {v['p_value']:.3g} | "
            f"{'yes' if v['alarm'] else 'no'} |"
        )
    return lines


def write_report(result: MonitorResult, report_dir: str | Path, state_file: str | Path) -> Path:
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots(result, out)
    result_path = out / "report.json"
    from ...io import write_json
    from ...results import finite

    write_json(result_path, finite(result.model_dump(mode="json")))
    with atomic_open(out / "report.md") as handle:
        handle.write(markdown(result))
    write_state(state_file, {k: v for k, v in gauges(result).items() if v})
    return out / "report.md"


def summary(result: MonitorResult) -> dict[str, Any]:
    return {"requests": result.requests, "alarms": result.alarms}
