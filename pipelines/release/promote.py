"""Promotion in the model registry: challenger vs champion, and rollback.

`promote`: the `challenger` version replaces the `champion` only if its gates passed and it is
not worse than the champion on the same evaluation set: the paired bootstrap interval of
(challenger - champion) on the per-example scores of the primary metric must have its lower
bound at or above `-promote.margin`. Both versions' scores were stored at registration
(`temper/scores.jsonl`), so no model is re-run when both were evaluated on one set. When the
sets differ (`temper.eval_set`), `promote.rescore: auto` (or `--rescore`) generates the
champion's answers on the challenger's set (`release/rescore.py`) and pairs those instead. The decision goes on the challenger as tags
and into `reports/promotion.md`; the CLI turns it into an exit code for CI.

`rollback`: the champion alias goes back to the previous champion (history kept in the
registered model's tag `temper.champion_history`).

The gates are checked again here, from the evaluation recorded with the version
(`temper/eval.json`) and the `gates:` of the params in force, not only from the version's
`temper.gates_passed` tag: CI can tighten a gate, and a tag set by hand promotes nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from .. import tracking
from ..config import Section
from ..errors import TemperError
from ..evaluation.gates import GatesConfig, check
from ..io import atomic_open, read_jsonl
from ..results import EvalResult, ResultError

log = logging.getLogger(__name__)

HISTORY_TAG = "temper.champion_history"


class PromoteError(TemperError, ValueError):
    """Promotion cannot be decided (missing alias, missing scores, bad URI...)."""


class PromoteConfig(Section):
    """`promote:` in params.yaml (the model name comes from `register.model_name`)."""

    challenger_alias: str = Field("challenger", description="Alias of the version to promote.")
    champion_alias: str = Field("champion", description="Alias of the serving version.")
    margin: float = Field(
        0.05,
        ge=0,
        description="Non-inferiority margin: promote only if the lower bound of the "
        "paired interval of (challenger - champion) on the primary metric is >= -margin.",
    )
    confidence: float = Field(0.95, gt=0, lt=1, description="Confidence of the paired interval.")
    n_resamples: int = Field(2000, ge=100, description="Bootstrap resamples.")
    seed: int = Field(0, description="Bootstrap seed (the decision is reproducible).")
    report: str = Field("reports/promotion.md", description="Decision report (Markdown).")
    rescore: Literal["auto", "never", "always"] = Field(
        "auto",
        description="Re-score the champion on the challenger's evaluation set (its adapter "
        "from the registry, the base model here). auto: when the sets differ; never: refuse "
        "then; always: even when they are the same.",
    )


# (champion version, challenger's recorded evaluation, example ids) -> champion's scores.
Rescorer = Callable[[str, EvalResult, list[str]], dict[str, float]]


@dataclass
class Decision:
    """The outcome of one `temper promote`."""

    model_name: str
    challenger: str | None
    champion_before: str | None
    champion_after: str | None
    promoted: bool
    reason: str
    primary_metric: str | None = None
    challenger_value: float | None = None
    champion_value: float | None = None
    delta: float | None = None
    delta_low: float | None = None
    delta_high: float | None = None
    n_examples: int | None = None
    margin: float | None = None
    gates_passed: bool | None = None  # the version's tag, set by evaluate's gates
    gates_passed_now: bool | None = None  # False: the gates in force refuse its evaluation
    rescored: bool = False  # the champion's scores were generated now, on the challenger's set
    at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def paired_interval(
    a: list[float], b: list[float], confidence: float, n_resamples: int, seed: int
) -> tuple[float, float, float]:
    """Mean of a-b and its percentile bootstrap interval over examples (paired resampling).

    scipy's bootstrap resamples the per-example differences; the percentile method stays
    defined when every difference is equal (BCa returns NaN there).
    """
    import numpy as np
    from scipy.stats import bootstrap

    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if np.all(diff == diff[0]):
        return float(diff[0]), float(diff[0]), float(diff[0])
    res = bootstrap(
        (diff,),
        np.mean,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
        vectorized=True,
    )
    return (
        float(diff.mean()),
        float(res.confidence_interval.low),
        float(res.confidence_interval.high),
    )


def version_scores(client: Any, mv: Any) -> dict[str, float]:
    """The per-example primary-metric scores stored with a version at registration."""
    import mlflow

    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=mv.run_id, artifact_path="temper/scores.jsonl"
        )
    except Exception as err:  # MLflow raises several types for a missing artifact
        raise PromoteError(
            f"version {mv.version}: no temper/scores.jsonl in run {mv.run_id} "
            f"(not registered by `temper register`?): {err}"
        ) from err
    return {r["id"]: float(r["score"]) for r in read_jsonl(path)}


def history(client: Any, name: str) -> list[str]:
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG)
    return [str(v) for v in json.loads(raw)] if raw else []


def recorded_evaluation(mv: Any) -> EvalResult:
    """The evaluation stored with a version at registration (`temper/eval.json`)."""
    import mlflow

    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=mv.run_id, artifact_path="temper/eval.json"
        )
        return EvalResult.load(path)
    except ResultError as err:
        raise PromoteError(f"version {mv.version}: {err}") from None
    except Exception as err:  # MLflow raises several types for a missing artifact
        raise PromoteError(
            f"version {mv.version}: no temper/eval.json in run {mv.run_id} "
            f"(not registered by `temper register`?): {err}"
        ) from err


def recheck_gates(mv: Any, gates_cfg: GatesConfig) -> tuple[bool, str]:
    """(passed, failed gates) of the version's recorded evaluation under `gates_cfg`."""
    evaluation = recorded_evaluation(mv)
    candidate = mv.tags.get("temper.candidate")
    if candidate not in evaluation.candidates:
        raise PromoteError(
            f"version {mv.version}: its recorded evaluation has no candidate {candidate!r}"
        )
    kind = evaluation.baseline.kind if evaluation.baseline is not None else None
    gates = check(gates_cfg, evaluation.primary_metric, evaluation.candidates[candidate], kind)

    def why(c: Any) -> str:
        if c.value is None:
            return f"{c.gate} (no value in the recorded evaluation; needs {c.op} {c.threshold:g})"
        return f"{c.gate} ({c.value:.4g} {c.op} {c.threshold:g} is false)"

    return gates.passed, ", ".join(why(c) for c in gates.checks if not c.passed)


def decide(
    client: Any,
    name: str,
    cfg: PromoteConfig,
    gates_cfg: GatesConfig | None = None,
    rescorer: Rescorer | None = None,
) -> Decision:
    """Compare challenger with champion and move the champion alias if the rules allow
    (`rescorer`: how to re-score the champion when `cfg.rescore` asks for it)."""
    challenger = tracking.alias_version(client, name, cfg.challenger_alias)
    if challenger is None:
        raise PromoteError(f"{name}@{cfg.challenger_alias} does not exist (run `temper register`)")
    champion = tracking.alias_version(client, name, cfg.champion_alias)
    ch_v = tracking.version_str(challenger.version)
    cp_v = tracking.version_str(champion.version) if champion is not None else None
    tags = challenger.tags
    primary = tags.get("temper.primary_metric")
    gates_passed = tags.get("temper.gates_passed") == "true"
    base = dict(
        model_name=name,
        challenger=ch_v,
        champion_before=cp_v,
        primary_metric=primary,
        margin=cfg.margin,
        gates_passed=gates_passed,
    )

    if cp_v == ch_v:
        return Decision(
            **base,
            champion_after=cp_v,
            promoted=False,
            reason=f"version {ch_v} is already {cfg.champion_alias}: nothing to do",
        )
    if tags.get("temper.promotion") == "rolled_back":
        # Without this the next CI run would promote the version someone just rolled back.
        decision = Decision(
            **base,
            champion_after=cp_v,
            promoted=False,
            reason=f"version {ch_v} was rolled back; register a new version "
            "(or point the challenger alias elsewhere)",
        )
    elif not gates_passed:
        decision = Decision(
            **base, champion_after=cp_v, promoted=False, reason="challenger did not pass its gates"
        )
    elif not (recheck := recheck_gates(challenger, gates_cfg or GatesConfig()))[0]:
        decision = Decision(
            **base,
            champion_after=cp_v,
            promoted=False,
            gates_passed_now=False,
            reason=f"challenger fails the gates in force on its recorded evaluation: {recheck[1]}",
        )
    elif champion is None:
        decision = Decision(
            **base,
            champion_after=ch_v,
            promoted=True,
            gates_passed_now=True,
            reason="no champion yet and the challenger passed its gates "
            "(re-checked on its recorded evaluation)",
        )
    else:
        decision = compare(
            client, challenger, champion, cfg, {**base, "gates_passed_now": True}, rescorer
        )

    record(client, name, challenger, decision, cfg)
    return decision


def compare(
    client: Any,
    challenger: Any,
    champion: Any,
    cfg: PromoteConfig,
    base: dict[str, Any],
    rescorer: Rescorer | None = None,
) -> Decision:
    ch_tags, cp_tags = challenger.tags, champion.tags
    cp_v = base["champion_before"]
    primary = base["primary_metric"]
    if primary != cp_tags.get("temper.primary_metric"):
        return Decision(
            **base,
            champion_after=cp_v,
            promoted=False,
            reason=f"primary metrics differ ({primary} vs "
            f"{cp_tags.get('temper.primary_metric')}): not comparable",
        )
    same_set = ch_tags.get("temper.eval_set") == cp_tags.get("temper.eval_set")
    rescore = cfg.rescore == "always" or (cfg.rescore == "auto" and not same_set)
    if not same_set and not rescore:
        return Decision(
            **base,
            champion_after=cp_v,
            promoted=False,
            reason="challenger and champion were evaluated on different sets "
            "(temper.eval_set differs): re-evaluate on one set first, or re-score the "
            "champion on the challenger's set (`temper promote --rescore`)",
        )
    a = version_scores(client, challenger)
    ids = sorted(a)
    if rescore:
        if rescorer is None:
            raise PromoteError("re-scoring the champion needs the base model and the task")
        b = rescorer(cp_v, recorded_evaluation(challenger), ids)
        base = {**base, "rescored": True}
    else:
        b = version_scores(client, champion)
        if sorted(b) != ids:
            raise PromoteError("score files disagree with temper.eval_set (same hash, other ids)")
    paired = ch_tags.get("temper.paired_metric") or primary
    if paired != primary:  # a corpus-level metric (macro-F1) is paired per example through this
        primary = f"{paired} (per-example companion of {primary})"
    delta, lo, hi = paired_interval(
        [a[i] for i in ids], [b[i] for i in ids], cfg.confidence, cfg.n_resamples, cfg.seed
    )
    fields = dict(
        challenger_value=sum(a.values()) / len(a),
        champion_value=sum(b.values()) / len(b),
        delta=delta,
        delta_low=lo,
        delta_high=hi,
        n_examples=len(ids),
    )
    pct = round(cfg.confidence * 100)
    how = f" (champion re-scored on the challenger's {len(ids)} examples)" if rescore else ""
    if lo >= -cfg.margin:
        return Decision(
            **base,
            **fields,
            champion_after=base["challenger"],
            promoted=True,
            reason=f"not worse: {pct}% paired interval of {primary} difference "
            f"[{lo:+.4f}, {hi:+.4f}] has lower bound >= -{cfg.margin}{how}",
        )
    return Decision(
        **base,
        **fields,
        champion_after=cp_v,
        promoted=False,
        reason=f"worse than champion v{cp_v}: {pct}% paired interval of {primary} "
        f"difference [{lo:+.4f}, {hi:+.4f}] goes below -{cfg.margin}{how}",
    )


def record(client: Any, name: str, challenger: Any, d: Decision, cfg: PromoteConfig) -> None:
    """Move the alias (if promoted) and write the decision on the challenger version."""
    v = d.challenger
    if d.promoted:
        hist = history(client, name)
        if d.champion_before and (not hist or hist[-1] != d.champion_before):
            hist.append(d.champion_before)  # a champion set by hand joins the history
        hist.append(v)
        client.set_registered_model_alias(name, cfg.champion_alias, v)
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(hist))
    client.set_model_version_tag(
        name, v, "temper.promotion", "promoted" if d.promoted else "refused"
    )
    client.set_model_version_tag(name, v, "temper.promotion.reason", d.reason)
    client.set_model_version_tag(name, v, "temper.promotion.at", d.at)
    client.set_model_version_tag(name, v, "temper.promotion.vs", d.champion_before or "none")
    client.set_model_version_tag(name, v, "temper.promotion.rescored", str(d.rescored).lower())
    if d.delta is not None:
        client.set_model_version_tag(
            name,
            v,
            "temper.promotion.delta",
            f"{d.delta:+.4f} [{d.delta_low:+.4f}, {d.delta_high:+.4f}]",
        )


def rollback(client: Any, name: str, cfg: PromoteConfig) -> Decision:
    """Point the champion alias back at the previous champion."""
    champion = tracking.alias_version(client, name, cfg.champion_alias)
    if champion is None:
        raise PromoteError(f"{name}@{cfg.champion_alias} does not exist: nothing to roll back")
    current = tracking.version_str(champion.version)
    hist = history(client, name)
    if hist and hist[-1] == current:
        hist.pop()
    if not hist:
        raise PromoteError(f"{name}: no previous champion before version {current}")
    previous = hist[-1]
    client.set_registered_model_alias(name, cfg.champion_alias, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(hist))
    reason = f"rolled back: champion v{current} -> v{previous}"
    client.set_model_version_tag(name, current, "temper.promotion", "rolled_back")
    client.set_model_version_tag(name, current, "temper.promotion.reason", reason)
    return Decision(
        model_name=name,
        challenger=None,
        champion_before=current,
        champion_after=previous,
        promoted=False,
        reason=reason,
    )


def write_report(path: str | Path, d: Decision, action: str, hist: list[str]) -> None:
    """`reports/promotion.md`: the last decision, readable in a CI log or a PR."""

    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    verdict = {"promote": "PROMOTED" if d.promoted else "REFUSED", "rollback": "ROLLED BACK"}[
        action
    ]
    if action == "promote" and d.promoted is False and d.champion_after == d.challenger:
        verdict = "NO CHANGE"
    lines = [
        f"# Promotion: {d.model_name}",
        "",
        f"**{verdict}** at {d.at}",
        "",
        f"{d.reason}",
        "",
        "| | version | " + (d.primary_metric or "primary metric") + " |",
        "| --- | --- | --- |",
        f"| challenger | {d.challenger or '-'} | {num(d.challenger_value)} |",
        f"| champion before | {d.champion_before or '-'} | {num(d.champion_value)} |",
        f"| champion after | {d.champion_after or '-'} | |",
        "",
    ]
    if d.delta is not None:
        lines += [
            f"Paired difference (challenger - champion) over {d.n_examples} examples: "
            f"{d.delta:+.4f}, interval [{d.delta_low:+.4f}, {d.delta_high:+.4f}]; "
            f"rule: lower bound >= -{d.margin}."
            + (
                " The champion was re-scored now on the challenger's evaluation set "
                "(the sets differed)."
                if d.rescored
                else ""
            ),
            "",
        ]
    if d.gates_passed is not None:
        text = "passed" if d.gates_passed else "FAILED"
        if d.gates_passed_now is not None:
            text += " at evaluation; re-checked with the gates in force: " + (
                "passed" if d.gates_passed_now else "FAILED"
            )
        lines += [f"Challenger gates: {text}.", ""]
    lines += [
        f"Champion history (oldest first): {', '.join(hist) or '-'}",
        "",
        "```json",
        json.dumps(asdict(d), indent=2),
        "```",
        "",
    ]
    with atomic_open(path) as handle:
        handle.write("\n".join(lines))
