"""Monte-Carlo of the quality alarms: an 80% -> 75% accuracy drop, and false alarms without one.

    python scripts/simulate_monitor.py [--runs 2000] [--seed 0] \\
        [--out docs/results/monitor_sim.json] [--plot docs/monitor_sim.png]

Three rules on judged answers (temper.online.monitor.cusum):
  weekly_100      the common advice: 100 judged samples a week, alarm in a week below 75%;
  cusum_100_week  a Bernoulli CUSUM on the same 100 samples a week (equal work), designed for
                  1 false alarm a year;
  cusum_100_week_matched  the same, designed for the weekly rule's own false-alarm rate
                  (like for like: the weekly rule buys its speed with ~4.6 false alarms a year);
  cusum_15pct     the CUSUM at the default 15% judged share of 1,000 requests a day (150 a day),
                  1 false alarm a year.
For each: false alarms per year (in-control years), the chance of detecting the drop within 1,
2 and 4 weeks, and the median and 90th-percentile delay in days, with 95% intervals. Writes the
figures and every assumption as JSON and a plot; ends stdout with
`RESULT monitor_cusum_p90_delay_days <value>` (the 15% CUSUM's 90th-percentile delay).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from scipy import stats

from temper.online.monitor.cusum import BernoulliCusum, design, weekly_rule

BASELINE, DRIFTED = 0.80, 0.75
# The error rates, rounded: 0.2 rather than 1 - 0.8 = 0.19999999999999996 in the JSON.
P0, P1 = round(1 - BASELINE, 12), round(1 - DRIFTED, 12)
DROP = 0.05  # the weekly rule's bar: alarm below BASELINE - DROP
WEEK = 7.0
WEEKLY_SAMPLES = 100
VOLUME, SHARE = 1000, 0.15  # requests a day, judged share
FALSE_ALARMS_PER_YEAR = 1.0
WARMUP_DAYS = 28.0  # in control before the drop, so the charts start from a typical state
HORIZON_DAYS = 182.0  # followed after the drop; later detections count as never
WITHIN_DAYS = (7, 14, 28)
CHUNK = 2800  # observations per block (a multiple of WEEKLY_SAMPLES: weeks never split)


def wilson(k: int, n: int) -> list[float]:
    """95% Wilson interval of a proportion."""
    z, p = 1.959964, k / n
    mid, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [(mid - half) / (1 + z * z / n), (mid + half) / (1 + z * z / n)]


def quantile(delays: np.ndarray, q: float) -> dict[str, float | list[float]]:
    """The q-quantile with a distribution-free 95% interval from order statistics."""
    d, n = np.sort(delays), len(delays)
    lo = max(int(stats.binom.ppf(0.025, n, q)) - 1, 0)
    hi = min(int(stats.binom.ppf(0.975, n, q)), n - 1)
    value = float(np.quantile(d, q, method="inverted_cdf"))
    return {"value": _finite(value), "ci95": [_finite(d[lo]), _finite(d[hi])]}


def _finite(x: float) -> float | None:
    """None for "not detected within the horizon" (JSON has no infinity)."""
    return float(x) if math.isfinite(x) else None


def simulate_drop(
    charts: dict[str, BernoulliCusum],
    rate: float,
    runs: int,
    rng: np.random.Generator,
    weekly: str | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each rule's (delay in days, inf = not within the horizon; false alarm before the drop).

    All rules read the same judged stream. Observation j arrives at (j + 1) / rate days; the
    drop comes at a uniform time in the week after the warm-up, so its phase against the
    weekly check is random. A false alarm before the drop restarts a chart (investigated,
    nothing found). `weekly` names the weekly rule's entry (100 observations a week).
    """
    total = math.ceil((WARMUP_DAYS + WEEK + HORIZON_DAYS) * rate / WEEKLY_SAMPLES)
    total *= WEEKLY_SAMPLES
    tau = WARMUP_DAYS + WEEK * rng.random(runs)
    first_drifted = np.floor(tau * rate).astype(np.int64)  # first j with (j + 1) / rate > tau
    found = {k: np.full(runs, -1, dtype=np.int64) for k in charts}
    early = {k: np.zeros(runs, dtype=bool) for k in charts}
    state = {k: np.zeros(runs) for k in charts}
    week_errors = []
    for t0 in range(0, total, CHUNK):
        j = np.arange(t0, min(t0 + CHUNK, total))
        drifted = j[None, :] >= first_drifted[:, None]
        errors = rng.random((runs, len(j))) < np.where(drifted, P1, P0)
        for k, chart in charts.items():
            s = chart.path(errors, start=state[k], restart=True)
            state[k] = s[:, -1]
            alarm = s >= chart.threshold
            early[k] |= (alarm & ~drifted).any(axis=1)
            hit = alarm & drifted
            new = (found[k] < 0) & hit.any(axis=1)
            found[k][new] = j[hit[new].argmax(axis=1)]
        if weekly:
            week_errors.append(errors.reshape(runs, -1, WEEKLY_SAMPLES).sum(axis=2))
    out = {}
    for k in charts:
        delay = np.where(found[k] >= 0, (found[k] + 1) / rate - tau, np.inf)
        out[k] = (np.where(delay > HORIZON_DAYS, np.inf, delay), early[k])
    if weekly:
        counts = np.concatenate(week_errors, axis=1)
        ends = WEEK * np.arange(1, counts.shape[1] + 1)
        sizes = [WEEKLY_SAMPLES] * counts.shape[1]
        alarms = np.array(
            [weekly_rule(c, sizes, baseline_accuracy=BASELINE, drop=DROP) for c in counts.tolist()]
        )
        after = alarms & (ends[None, :] > tau[:, None])  # the week holding the drop counts
        delay = np.where(after.any(axis=1), ends[after.argmax(axis=1)] - tau, np.inf)
        before = (alarms & (ends[None, :] <= tau[:, None])).any(axis=1)
        out[weekly] = (np.where(delay > HORIZON_DAYS, np.inf, delay), before)
    return out


def in_control_years(
    chart: BernoulliCusum, rate: float, runs: int, rng: np.random.Generator
) -> np.ndarray:
    """False alarms in each of `runs` in-control years (after a warm-up; restart on alarm)."""
    warm, year = round(WARMUP_DAYS * rate), round(365 * rate)
    counts = np.zeros(runs, dtype=np.int64)
    state = np.zeros(runs)
    for t0 in range(0, warm + year, CHUNK):
        j = np.arange(t0, min(t0 + CHUNK, warm + year))
        s = chart.path(rng.random((runs, len(j))) < P0, start=state, restart=True)
        state = s[:, -1]
        counts += ((s >= chart.threshold) & (j >= warm)[None, :]).sum(axis=1)
    return counts


def weekly_years(runs: int, rng: np.random.Generator) -> np.ndarray:
    """False alarms of the weekly rule in each of `runs` in-control years of 52 weeks."""
    errors = rng.binomial(WEEKLY_SAMPLES, P0, size=(runs, 52))
    sizes = [WEEKLY_SAMPLES] * 52
    rule = [weekly_rule(e, sizes, baseline_accuracy=BASELINE, drop=DROP) for e in errors.tolist()]
    return np.asarray(rule).sum(axis=1) * 365 / 364  # 52 weeks are 364 days


def summarise(delays: np.ndarray, early: np.ndarray, years: np.ndarray) -> dict:
    n = len(delays)
    power = {
        str(d): {"value": float(np.mean(delays <= d)), "ci95": wilson(int(np.sum(delays <= d)), n)}
        for d in WITHIN_DAYS
    }
    sd = float(years.std(ddof=1)) / math.sqrt(len(years))
    return {
        "false_alarms_per_year": {
            "value": float(years.mean()),
            "ci95": [float(years.mean()) - 1.96 * sd, float(years.mean()) + 1.96 * sd],
        },
        "p_false_alarm_in_a_year": float(np.mean(years > 0)),
        "power_within_days": power,
        "delay_days": {"median": quantile(delays, 0.5), "p90": quantile(delays, 0.9)},
        "undetected_within_horizon": float(np.mean(~np.isfinite(delays))),
        "false_alarm_before_drop": float(np.mean(early)),
    }


def chart_info(chart: BernoulliCusum, rate: float) -> dict:
    arl0, arl1 = chart.arl(P0), chart.arl(P1)
    return {
        "p0": chart.p0,
        "p1": chart.p1,
        "h": chart.threshold,
        "weights": list(chart.weights),
        "arl0_observations": arl0,
        "arl0_days": arl0 / rate,
        "false_alarms_per_year_exact": 365 * rate / arl0,
        "arl1_zero_state_observations": arl1,
        "arl1_zero_state_days": arl1 / rate,
    }


def plot(results: dict, example: tuple[np.ndarray, np.ndarray, float, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    days = np.asarray(results["curve"]["days"])
    for name, label in LABELS.items():
        left.step(days, results["curve"][name], where="post", label=label)
    for d in WITHIN_DAYS:
        left.axvline(d, color="grey", lw=0.5, ls=":")
    left.set(xlabel="days since the drop", ylabel="P(alarm by then)", xlim=(0, 90), ylim=(0, 1))
    left.set_title("80% -> 75% accuracy: detection")
    left.legend(loc="lower right", fontsize=8)
    t, s, h, tau = example
    # Up to the first alarm after the drop (and two days on): what an operator would see.
    hits = np.flatnonzero((s >= h) & (t > tau))
    keep = t <= (t[hits[0]] + 2 if len(hits) else t[-1])
    right.plot(t[keep], s[keep], lw=0.8)
    alarms = keep & (s >= h)
    right.plot(t[alarms], s[alarms], "rx", label="alarm (then restart)")
    right.axhline(h, color="red", ls="--", label=f"h = {h:.2f}")
    right.axvline(tau, color="grey", ls=":", label="drop")
    right.set(xlabel="days", ylabel="S_t")
    right.set_title("CUSUM at 15% of 1,000 requests a day: one run")
    right.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


LABELS = {
    "weekly_100": "weekly rule, 100/week, alarm < 75%",
    "cusum_100_week": "CUSUM, same 100/week, 1 FA/yr",
    "cusum_100_week_matched": "CUSUM, same 100/week, the weekly rule's FA/yr",
    "cusum_15pct": "CUSUM, 15% of 1,000/day, 1 FA/yr",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000, help="runs per scenario")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/results/monitor_sim.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/monitor_sim.png"))
    args = parser.parse_args()
    started = time.perf_counter()
    p0, p1 = P0, P1
    rate_week, rate_share = WEEKLY_SAMPLES / WEEK, VOLUME * SHARE
    bar = math.ceil((BASELINE - DROP) * WEEKLY_SAMPLES - 1e-9)  # alarm below 75 of 100 correct
    weekly_exact = 365 / WEEK * float(stats.binom.cdf(bar - 1, WEEKLY_SAMPLES, BASELINE))
    charts = {
        "cusum_100_week": design(p0, p1, rate_week, FALSE_ALARMS_PER_YEAR),
        # The weekly rule's own false-alarm rate: the like-for-like comparison with it.
        "cusum_100_week_matched": design(p0, p1, rate_week, weekly_exact),
        "cusum_15pct": design(p0, p1, rate_share, FALSE_ALARMS_PER_YEAR),
    }
    rates = {"weekly_100": rate_week, "cusum_100_week": rate_week}
    rates |= {"cusum_100_week_matched": rate_week, "cusum_15pct": rate_share}
    # Seeds by scenario: a change to one leaves the others' draws as they were.
    rng = {k: np.random.default_rng([args.seed, i]) for i, k in enumerate(["drop", *LABELS])}
    weekly_charts = {k: charts[k] for k in ("cusum_100_week", "cusum_100_week_matched")}
    drops = simulate_drop(weekly_charts, rate_week, args.runs, rng["drop"], weekly="weekly_100")
    drops |= simulate_drop(
        {"cusum_15pct": charts["cusum_15pct"]}, rate_share, args.runs, rng["cusum_15pct"]
    )
    rules = {}
    for name in LABELS:
        if name == "weekly_100":
            years = weekly_years(args.runs, rng[name])
        else:
            years = in_control_years(charts[name], rates[name], args.runs, rng[name])
        rules[name] = summarise(*drops[name], years) | {"judged_per_day": rates[name]}
        if name in charts:
            rules[name]["chart"] = chart_info(charts[name], rates[name])
    rules["weekly_100"]["false_alarms_per_year_exact"] = weekly_exact
    days = np.arange(0, int(HORIZON_DAYS) + 1)
    delays = {k: drops[k][0] for k in LABELS}
    curve = {"days": days.tolist()} | {
        k: [float(np.mean(v <= d)) for d in days] for k, v in delays.items()
    }
    p90 = rules["cusum_15pct"]["delay_days"]["p90"]["value"]
    results = {
        "seed": args.seed,
        "runs": args.runs,
        "assumptions": {
            "baseline_accuracy": BASELINE,
            "drifted_accuracy": DRIFTED,
            "weekly_rule": f"alarm in a week whose accuracy on {WEEKLY_SAMPLES} samples < {BASELINE - DROP:.2f}",
            "weekly_samples": WEEKLY_SAMPLES,
            "volume_requests_per_day": VOLUME,
            "judged_share": SHARE,
            "false_alarms_per_year_design": FALSE_ALARMS_PER_YEAR,
            "cusum_p0": p0,
            "cusum_p1": p1,
            "days_per_year": 365,
            "warmup_days": WARMUP_DAYS,
            "drop_time": f"uniform in [{WARMUP_DAYS:g}, {WARMUP_DAYS + WEEK:g}) days",
            "horizon_days": HORIZON_DAYS,
            "arrivals": "observation j at (j + 1) / rate days: evenly spaced, the weekly rule's "
            "week k holds observations 100k .. 100k + 99 and is checked at its end",
            "errors": "independent Bernoulli; the judge's verdict is the truth",
            "restart": "a CUSUM restarts from 0 after every alarm (investigated, nothing found)",
            "delay": "days from the drop to the alarming observation (weekly rule: the end of "
            "the week that alarms; a week that holds the drop counts)",
            "in_control_years": "each year follows a warm-up of warmup_days (not counted)",
        },
        "rules": rules,
        "curve": curve,
        "result": {"monitor_cusum_p90_delay_days": p90},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")

    ex_rng = np.random.default_rng([args.seed, 99])
    n_ex, tau = round((WARMUP_DAYS + 30) * rate_share), WARMUP_DAYS + 3.5
    j = np.arange(n_ex)
    errs = ex_rng.random(n_ex) < np.where((j + 1) / rate_share > tau, p1, p0)
    chart = charts["cusum_15pct"]
    example = ((j + 1) / rate_share, chart.path(errs, restart=True), chart.threshold, tau)
    plot(results, example, args.plot)

    def ci(x: dict, fmt: str = "{:.2f}") -> str:
        def one(v: float | None) -> str:
            return f">{HORIZON_DAYS:g}" if v is None else fmt.format(v)

        lo, hi = x["ci95"]
        return f"{one(x['value'])} [{one(lo)}, {one(hi)}]"

    print(f"{args.runs} runs per scenario, seed {args.seed}; 95% intervals in brackets")
    head = f"{'rule':<24}{'judged/day':>11}{'false alarms/yr':>22}" + "".join(
        f"{'P(<=' + str(d) + 'd)':>22}" for d in WITHIN_DAYS
    )
    print(head + f"{'median delay d':>22}{'p90 delay d':>24}")
    for name, r in rules.items():
        cells = [ci(r["false_alarms_per_year"])] + [
            ci(r["power_within_days"][str(d)], "{:.3f}") for d in WITHIN_DAYS
        ]
        cells += [ci(r["delay_days"]["median"], "{:.1f}"), ci(r["delay_days"]["p90"], "{:.1f}")]
        print(
            f"{name:<24}{r['judged_per_day']:>11.1f}"
            + "".join(f"{c:>22}" for c in cells[:4])
            + f"{cells[4]:>22}{cells[5]:>24}"
        )
    for name in charts:
        c = rules[name]["chart"]
        print(
            f"{name}: h={c['h']:.3f}, ARL0={c['arl0_observations']:.0f} obs "
            f"({c['false_alarms_per_year_exact']:.3f} false alarms/yr exact), "
            f"zero-state ARL1={c['arl1_zero_state_days']:.1f} days"
        )
    print(
        f"weekly_100: exact false alarms/yr {rules['weekly_100']['false_alarms_per_year_exact']:.2f}"
    )
    print(f"wrote {args.out} and {args.plot} in {time.perf_counter() - started:.1f} s")
    print(f"RESULT monitor_cusum_p90_delay_days {p90:.2f}")


if __name__ == "__main__":
    main()
