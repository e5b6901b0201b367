"""`temper monitor judge`: an LLM's verdict on a sampled share of logged answers.

Pointwise, not the evaluate stage's pairwise protocol: production has no second answer to
compare with, so the judge reads the clause and the one answer and says correct / incorrect /
unsure. Its verdicts are only as good as the judge, which is why human reviews calibrate it
(review.py). Every call goes through the provider layer (cache, budget, retries, privacy
guard); the budget is the judge's total over all runs (`provider.max_usd` less what the
stored verdicts cost), so a cron job cannot spend it again every night.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from ...io import stable_hash
from ...providers import BudgetExceeded, open_provider
from ...task import TaskConfig, parse_answer
from .config import MonitorConfig
from .store import LoggedRequest, MonitorStore, sampled

log = logging.getLogger("temper.monitor")

VERDICT_SCHEMA = {
    "type": "object",
    "properties": {
        "verdict": {"type": "string", "enum": ["correct", "incorrect", "unsure"]},
        "reason": {"type": "string"},
    },
    "required": ["verdict", "reason"],
    "additionalProperties": False,
}
SYSTEM = (
    "You check answers to this task: {description}\n"
    "An answer is a JSON object with these fields:\n{fields}\n"
    "Given the input and one answer, decide whether the answer is correct: every field right "
    "for this input. Reply with JSON only: "
    '{{"verdict": "correct" | "incorrect" | "unsure", "reason": "<a few words>"}}.'
)


def judge_messages(task: TaskConfig, text: str, answer: str) -> list[dict[str, str]]:
    fields = "\n".join(
        f"- {f.name} ({f.kind}{', may be null' if f.nullable else ''}): {f.description or ''}"
        for f in task.fields
    )
    system = SYSTEM.format(description=task.description or task.name, fields=fields)
    user = f"{task.label_list()}\n\n{task.user_message(text)}\n\nAnswer:\n{answer}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_verdict(text: str) -> tuple[str, str] | None:
    obj = parse_answer(text)
    if isinstance(obj, dict) and obj.get("verdict") in ("correct", "incorrect", "unsure"):
        return str(obj["verdict"]), str(obj.get("reason") or "")[:300]
    return None


def to_judge(cfg: MonitorConfig, store: MonitorStore) -> tuple[list[LoggedRequest], int]:
    """The sampled rows not judged yet, oldest first, and how many sampled rows lack the text
    (logged before sampling kept it, or with no answer) and so cannot be judged."""
    done = store.verdicts()
    todo, missing = [], 0
    for row in store.requests():
        if row.id in done or not sampled(row.id, cfg.judge.salt, cfg.judge.share):
            continue
        if row.status != 200 or not row.answer or not row.input_text:
            missing += 1
            continue
        todo.append(row)
    return todo, missing


def spent(store: MonitorStore) -> float:
    return float(store.db.execute("SELECT COALESCE(SUM(usd), 0) FROM verdicts").fetchone()[0])


@dataclass
class JudgeRun:
    """What one `temper monitor judge` did."""

    judged: int = 0
    failed: int = 0
    unjudgeable: int = 0
    left: int = 0  # sampled rows still to judge (max_per_run, or the budget stopped it)
    usd: float = 0.0
    spent_usd: float = 0.0
    budget_usd: float = 0.0
    budget_stop: bool = False
    counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def run_judge(
    cfg: MonitorConfig,
    task: TaskConfig,
    store: MonitorStore,
    provider: Any = None,
    progress: bool = True,
) -> JudgeRun:
    """Judge the sampled rows without a verdict (up to `judge.max_per_run`)."""
    jcfg = cfg.judge
    todo, missing = to_judge(cfg, store)
    run = JudgeRun(unjudgeable=missing, budget_usd=jcfg.provider.max_usd)
    before = spent(store)
    left_usd = max(0.0, jcfg.provider.max_usd - before)
    batch = todo[: jcfg.max_per_run] if jcfg.max_per_run else todo
    run.left = len(todo) - len(batch)
    if batch and left_usd <= 0:
        run.budget_stop, run.left = True, len(todo)
        batch = []
    if batch:
        own = provider is None
        if own:  # the run's cap is what is left of the judge's total budget
            provider = open_provider(jcfg.provider.model_copy(update={"max_usd": left_usd}))
        version = stable_hash({"system": SYSTEM, "task": task.prompt_hash, "monitor": 1}, 12)
        try:
            done = provider.complete_many(
                [judge_messages(task, r.input_text or "", r.answer or "") for r in batch],
                json_schema=VERDICT_SCHEMA,
                max_tokens=jcfg.provider.max_tokens,
                prompt_version=version,
                desc="monitor judge" if progress else None,
            )
        finally:
            if own:
                provider.close()
        for row, out in zip(batch, done, strict=True):
            if isinstance(out, BudgetExceeded):
                run.budget_stop = True
                run.left += 1
                continue
            verdict = None if isinstance(out, Exception) else parse_verdict(out.text)
            if verdict is None:
                run.failed += 1
                log.warning("monitor judge: no verdict for %s: %s", row.id, str(out)[:200])
                continue
            usd = 0.0 if out.cached else out.usd
            store.add_verdict(row.id, verdict[0], jcfg.provider.model, usd, out.cached, verdict[1])
            run.judged += 1
            run.usd += usd
            run.counts[verdict[0]] = run.counts.get(verdict[0], 0) + 1
    run.spent_usd = before + run.usd
    return run


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (n = 0: the whole of [0, 1])."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Window:
    """Judged quality in one time window: correct of the decided verdicts (unsure left out)."""

    start: float
    end: float
    judged: int
    correct: int
    unsure: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.judged if self.judged else None

    def interval(self) -> tuple[float, float]:
        return wilson(self.correct, self.judged)


def judged_errors(store: MonitorStore, source: str = "judge") -> list[tuple[float, bool, str]]:
    """(request time, is an error, request id) of every decided verdict, in time order;
    `source`: judge verdicts, or human reviews where a reviewer labelled the row."""
    table = "verdicts" if source == "judge" else "reviews"
    rows = store.db.execute(
        f"SELECT r.ts, v.verdict, r.id FROM {table} v JOIN requests r ON r.id = v.request_id "
        "WHERE v.verdict != 'unsure' ORDER BY r.ts, r.id"
    ).fetchall()
    return [(float(ts), verdict == "incorrect", rid) for ts, verdict, rid in rows]


def windows(store: MonitorStore, hours: float, source: str = "judge") -> list[Window]:
    """Quality per window of `hours`, from the first judged request to the last."""
    table = "verdicts" if source == "judge" else "reviews"
    rows = store.db.execute(
        f"SELECT r.ts, v.verdict FROM {table} v JOIN requests r ON r.id = v.request_id "
        "ORDER BY r.ts"
    ).fetchall()
    if not rows:
        return []
    width = hours * 3600
    start = rows[0][0]
    out: dict[int, list[int]] = {}
    for ts, verdict in rows:
        k = int((ts - start) // width)
        slot = out.setdefault(k, [0, 0, 0])
        if verdict == "unsure":
            slot[2] += 1
        else:
            slot[0] += 1
            slot[1] += verdict == "correct"
    return [
        Window(start + k * width, start + (k + 1) * width, n, c, u)
        for k, (n, c, u) in sorted(out.items())
    ]
