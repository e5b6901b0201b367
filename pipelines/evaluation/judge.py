"""A pairwise LLM judge with its position bias taken out and its reliability measured.

Protocol, per sampled test example and candidate:
1. ask the judge twice, candidate as answer A then as answer B (baseline in the other slot);
2. map both verdicts to the candidate's view (win / tie / loss); if they differ the verdict
   depended on the order, so it counts as a tie (and as a position flip);
3. calibration: on the examples where gold decides (exactly one answer has the right label)
   count how often the final verdict names the gold winner. Below `min_agreement` (or with
   too few decided examples) the judge is *uncalibrated*: its win rate is reported but no
   gate counts it.

A judge that always prefers the first answer thus turns every verdict into a tie (flip rate
1.0) and fails calibration. All calls go through `pipelines/providers.py` (cache, budget,
retries, privacy check): a re-run answers from the cache and spends nothing.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np
from pydantic import Field

from ..config import Section
from ..io import stable_hash
from ..providers import Completion, ProviderConfig, open_provider
from ..task import TaskConfig, parse_answer
from .metrics import Resamples, estimate, mean_stats

log = logging.getLogger(__name__)

VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"winner": {"type": "string", "enum": ["A", "B", "tie"]}},
    "required": ["winner"],
    "additionalProperties": False,
}
# The judge's system prompt for a task without its own `judge_prompt`, filled from the task
# config: what the task is and what each answer field holds.
SYSTEM_TEMPLATE = (
    "You are an impartial expert judge of answers to this task: {description}\n"
    "An answer is a JSON object with these fields:\n{fields}\n"
    "Compare two answers to the same input. Judge correctness first, field by field in the "
    "order above, then completeness. Ignore which answer comes first and how long it is. "
    'Reply with JSON only: {{"winner": "A"}}, {{"winner": "B"}} or {{"winner": "tie"}}.'
)


def system_prompt(task: TaskConfig) -> str:
    """The judge's system prompt: the task's `judge_prompt`, else the template filled in."""
    if task.judge_prompt:
        return task.judge_prompt
    fields = "\n".join(
        f"- {f.name} ({f.kind}{', multi-label' if f.multi else ''}"
        f"{', may be null' if f.nullable else ''}): {f.description or 'no description'}"
        for f in task.fields
    )
    return SYSTEM_TEMPLATE.format(description=task.description or task.name, fields=fields)


def _default_provider() -> ProviderConfig:
    # replay: answers only from the cache, never sends anything (the safe offline default).
    return ProviderConfig(kind="replay", model="gpt-6-luna", max_tokens=16, max_usd=1.0)


class JudgeConfig(Section):
    """`judge:` in params.yaml."""

    enabled: bool = Field(
        False,
        description="Run the judge. Off by default: the offline pipeline needs no API. "
        "Point judge.provider at an API (or a local OpenAI-compatible server) to turn it on.",
    )
    provider: ProviderConfig = Field(
        default_factory=_default_provider,
        description="The judge's endpoint, cache and budget "
        "(same fields as distil.provider; kind openai, anthropic or replay).",
    )
    sample_frac: float = Field(0.2, gt=0, le=1, description="Share of test examples judged.")
    max_examples: int | None = Field(200, gt=0, description="Cap on judged examples.")
    seed: int = Field(0, description="Seed of the sample.")
    min_agreement: float = Field(
        0.7,
        ge=0,
        le=1,
        description="Minimum agreement with gold on gold-decided examples for "
        "the judge to count as calibrated.",
    )
    min_decided: int = Field(
        10, ge=1, description="Gold-decided examples needed before calibration can pass."
    )


def sample_indices(n: int, cfg: JudgeConfig) -> list[int]:
    """The judged examples: a seeded sample, the same for every candidate."""
    k = max(1, round(n * cfg.sample_frac))
    if cfg.max_examples:
        k = min(k, cfg.max_examples)
    rng = np.random.default_rng(cfg.seed)
    return sorted(rng.choice(n, size=min(k, n), replace=False).tolist())


def judge_messages(
    task: TaskConfig, text: str, answer_a: str, answer_b: str
) -> list[dict[str, str]]:
    user = (
        f"Task: {task.description}\n{task.label_list()}\n\n{task.user_message(text)}\n\n"
        f"Answer A:\n{answer_a}\n\nAnswer B:\n{answer_b}"
    )
    return [{"role": "system", "content": system_prompt(task)}, {"role": "user", "content": user}]


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'tie' from the judge's reply; None when it says none of them."""
    obj = parse_answer(text)
    if isinstance(obj, dict) and str(obj.get("winner", "")).strip() in ("A", "B", "tie"):
        return str(obj["winner"]).strip()
    match = re.fullmatch(r"\s*(A|B|tie)\s*\.?\s*", text or "", re.IGNORECASE)
    if match:
        word = match.group(1)
        return "tie" if word.lower() == "tie" else word.upper()
    return None


def views(first: str, second: str) -> tuple[int, int]:
    """The candidate's outcome (+1 win, 0 tie, -1 loss) in each order: (as A, as B)."""
    return {"A": 1, "B": -1, "tie": 0}[first], {"A": -1, "B": 1, "tie": 0}[second]


def combine(first: str, second: str) -> int:
    """Final outcome: the verdict if both orders agree, else a tie (it followed the position)."""
    as_a, as_b = views(first, second)
    return as_a if as_a == as_b else 0


def run_judge(
    cfg: JudgeConfig,
    task: TaskConfig,
    records: list[dict[str, Any]],
    candidates: dict[str, list[dict[str, Any]]],
    baseline: list[dict[str, Any]],
    primary_correct: dict[str, np.ndarray],
    baseline_correct: np.ndarray,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    progress: bool = True,
    provider: Any = None,
) -> dict[str, dict[str, Any]]:
    """Judge every candidate against the baseline; one result dict per candidate."""
    idx = sample_indices(len(records), cfg)
    own = provider is None
    provider = provider or open_provider(cfg.provider)
    version = stable_hash(
        {"system": system_prompt(task), "task": task.prompt_hash, "protocol": 1}, 12
    )
    results: dict[str, dict[str, Any]] = {}
    try:
        for name, preds in candidates.items():
            jobs, slots = [], []
            for i in idx:
                cand, base = preds[i]["output"] or "", baseline[i]["output"] or ""
                if cand.strip() == base.strip():
                    continue  # identical answers: a tie without asking
                jobs += [
                    judge_messages(task, records[i]["text"], cand, base),
                    judge_messages(task, records[i]["text"], base, cand),
                ]
                slots.append(i)
            done = provider.complete_many(
                jobs,
                json_schema=VERDICT_SCHEMA,
                max_tokens=cfg.provider.max_tokens,
                prompt_version=version,
                desc=f"judge {name}" if progress else None,
            )
            results[name] = summarise(
                cfg,
                idx,
                slots,
                done,
                primary_correct[name],
                baseline_correct,
                n_resamples,
                confidence,
            )
            r = results[name]
            log.info(
                "judge %s: win rate %s, flips %s, agreement %s, calibrated %s",
                name,
                r["win_rate"]["value"],
                r["flip_rate"],
                r["agreement"],
                r["calibrated"],
            )
    finally:
        if own:
            provider.close()
    return results


def summarise(
    cfg: JudgeConfig,
    idx: list[int],
    slots: list[int],
    done: list[Completion | Exception],
    cand_correct: np.ndarray,
    base_correct: np.ndarray,
    n_resamples: int,
    confidence: float,
) -> dict[str, Any]:
    """Win/tie/loss with intervals, flip and first-position rates, calibration."""
    outcome = {i: 0 for i in idx}  # identical answers stay ties
    asked, flips, firsts, verdicts, errors, usd_new = 0, 0, 0, 0, [], 0.0
    for k, i in enumerate(slots):
        pair = done[2 * k : 2 * k + 2]
        parsed = []
        for reply in pair:
            if isinstance(reply, Exception):
                errors.append(f"{type(reply).__name__}: {reply}")
                parsed.append(None)
                continue
            usd_new += 0.0 if reply.cached else reply.usd
            parsed.append(parse_verdict(reply.text))
            if parsed[-1] is None:
                errors.append(f"unparseable verdict: {reply.text[:80]!r}")
        if None in parsed:
            outcome.pop(i)  # not judged: counted in `errors`, excluded from the rates
            continue
        asked += 1
        verdicts += 2
        firsts += sum(v == "A" for v in parsed)
        as_a, as_b = views(parsed[0], parsed[1])
        flips += as_a != as_b  # the candidate's outcome changed with the order
        outcome[i] = combine(parsed[0], parsed[1])
    judged = sorted(outcome)
    o = np.array([outcome[i] for i in judged], dtype=float)
    rs = Resamples.draw(len(o), n_resamples, cfg.seed, confidence)

    def rate(values: np.ndarray) -> dict[str, float]:
        if not len(values):
            return {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
        return estimate(values.mean(), mean_stats(values, rs), rs)

    cc, bc = cand_correct[judged].astype(bool), base_correct[judged].astype(bool)
    decided = cc != bc
    gold_winner = np.where(cc, 1, -1)
    agree = (o == gold_winner)[decided]
    agreement = float(agree.mean()) if decided.any() else None
    calibrated = bool(
        agreement is not None
        and int(decided.sum()) >= cfg.min_decided
        and agreement >= cfg.min_agreement
    )
    return {
        "n_sampled": len(idx),
        "n_judged": len(judged),
        "n_asked": asked,
        "n_identical": len(idx) - len(slots),
        "errors": len(errors),
        "error_examples": errors[:5],
        "win_rate": rate((o + 1) / 2),
        "win": rate((o == 1).astype(float)),
        "tie": rate((o == 0).astype(float)),
        "loss": rate((o == -1).astype(float)),
        "flip_rate": flips / asked if asked else None,
        "first_position_rate": firsts / verdicts if verdicts else None,
        "n_decided": int(decided.sum()),
        "agreement": agreement,
        "min_agreement": cfg.min_agreement,
        "calibrated": calibrated,
        "usd_new": round(usd_new, 6),
    }


def right_or_wrong(primary: str, scores: dict[str, Any]) -> str:
    """The per-example score the judge is calibrated against (>= 0.5 counts as right): the
    primary metric when it is per example (accuracy, ROUGE, set F1), else the first accuracy
    (macro-F1 and micro-F1 exist only over a whole set), else the first score."""
    if primary in scores:
        return primary
    return next((k for k in scores if k.endswith(".accuracy")), next(iter(scores)))
