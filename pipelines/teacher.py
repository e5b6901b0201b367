"""Asking a model for a schema-valid answer: validate, one repair turn, or a reason to reject.

The distil stage labels the training data this way and answers the test split for the API
baseline; the online router asks its mid-tier and frontier APIs the same way. Every reply is
parsed (`TaskConfig.parse`) and validated against the task's schema; a truncated reply counts
as invalid; an invalid one gets one repair turn (the reply and its problems are sent back),
and what is still invalid comes back with the reason, never silently dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .providers import BudgetExceeded, Cache, CacheMiss, Completion, Provider
from .providers.batch import BUDGET, Collected
from .task import TaskConfig

TRUNCATED = {"length", "max_tokens"}  # finish reasons of a reply cut at the limit
FAILED = "request failed: "  # a reject whose request got no usable reply (not an answer)


def repair_messages(
    messages: list[dict[str, str]], reply: str, problems: list[str]
) -> list[dict[str, str]]:
    return [
        *messages,
        {"role": "assistant", "content": reply},
        {
            "role": "user",
            "content": "Your answer is invalid: "
            + "; ".join(problems)
            + ". Reply again with the corrected JSON object only.",
        },
    ]


def check(task: TaskConfig, done: Completion) -> tuple[dict[str, Any] | None, list[str]]:
    """Parse and validate one reply: (answer, problems)."""
    answer = task.parse(done.text)
    missing = "empty reply" if task.is_text else "no JSON object in the reply"
    problems = task.validate_answer(answer) if answer is not None else [missing]
    if done.finish_reason in TRUNCATED:
        problems.append(f"output truncated (finish_reason {done.finish_reason})")
    return (answer if not problems else None), problems


@dataclass
class Outcome:
    """What happened to one record."""

    record: dict[str, Any]
    answer: dict[str, Any] | None = None
    reason: str | None = None  # set: rejected
    output: str | None = None  # the last raw reply
    budget_stop: bool = False  # not labelled because a cap was reached
    replies: list[Completion] = field(default_factory=list)
    source: str | None = None  # "logged": the prototype's logged reply, nobody was asked
    recalled: bool = False  # a failure remembered from an earlier run (`Recall`), not sent


def gold_outcome(task: TaskConfig, record: dict[str, Any]) -> Outcome:
    """The `gold` teacher: the answer built from the record's gold fields, checked likewise."""
    answer = task.gold_answer(record)
    if problems := task.validate_answer(answer):
        reason = "gold answer does not match the task schema: " + "; ".join(problems)
        return Outcome(record, None, reason, task.format_answer(answer))
    return Outcome(record, answer, None, task.format_answer(answer))


def logged_outcome(task: TaskConfig, record: dict[str, Any]) -> Outcome | None:
    """A record's logged reply (`prepare.format: openai_log`) checked as a teacher's reply is
    (no repair turn: the request is in the past); None when the record has none."""
    logged = record.get("logged")
    if not logged:
        return None
    out = Outcome(record, output=logged.get("answer"), source="logged")
    answer = task.parse(out.output)
    missing = "empty reply" if task.is_text else "no JSON object in the reply"
    problems = task.validate_answer(answer) if answer is not None else [missing]
    if logged.get("finish_reason") in TRUNCATED:
        problems.append(f"output truncated (finish_reason {logged['finish_reason']})")
    if problems:
        out.reason = "logged reply does not match the task schema: " + "; ".join(problems)
    else:
        out.answer = answer
    return out


def merge_logged(
    logged: dict[str, list[Outcome | None]], asked: dict[str, list[Outcome]]
) -> dict[str, list[Outcome]]:
    """Per split, the logged outcomes with the teacher's in the gaps, in the records' order."""
    out = {}
    for split, slots in logged.items():
        answers = iter(asked.get(split, []))
        out[split] = [o if o is not None else next(answers) for o in slots]
    return out


async def label_one(
    provider: Provider,
    task: TaskConfig,
    record: dict[str, Any],
    messages: list[dict[str, str]],
    repair: bool,
    version: str,
) -> Outcome:
    out = Outcome(record)
    schema = task.answer_schema()
    try:
        done = await provider.acomplete(messages, json_schema=schema, prompt_version=version)
        out.replies.append(done)
        out.output = done.text
        out.answer, problems = check(task, done)
        if problems and repair:
            fixed = await provider.acomplete(
                repair_messages(messages, done.text, problems),
                json_schema=schema,
                prompt_version=version,
            )
            out.replies.append(fixed)
            out.output = fixed.text
            out.answer, again = check(task, fixed)
            problems = [f"after one repair: {p}" for p in again]
        if problems:
            out.reason = "invalid answer: " + "; ".join(problems)
    except BudgetExceeded:
        out.budget_stop, out.answer = True, None
    except CacheMiss:
        raise
    except Exception as err:  # ProviderError after retries: a reject with its reason
        out.answer, out.reason = None, f"{FAILED}{err}"
    return out


@dataclass
class Recall:
    """Requests that failed for good in an earlier run that wrote its outputs.

    An answer is cached, a failure (a timeout, a 5xx after every retry, an oversize reply) is
    not, so a re-run used to send those requests again and silently change the data. They are
    remembered (the response cache's `failures` table, written only once a run's outputs are)
    and, unless `retry_failed`, rejected again with the same reason without being sent.
    """

    provider: Provider
    schema: dict[str, Any]
    version: str
    retry_failed: bool

    def key(self, messages: list[dict[str, str]]) -> str:
        return self.provider.request_key(
            messages, json_schema=self.schema, prompt_version=self.version
        )

    def outcome(self, record: dict[str, Any], messages: list[dict[str, str]]) -> Outcome | None:
        """The remembered reject of this request (None: ask the teacher)."""
        if self.retry_failed:
            return None
        key = self.key(messages)
        cache = self.provider.cache
        if cache.get(key) is not None or (hit := cache.failure(key)) is None:
            return None  # never failed, or answered since (by a run with retry_failed)
        return Outcome(record, reason=hit[0], output=hit[1], recalled=True)

    def new_failures(
        self, done: list[tuple[list[dict[str, str]], Outcome]]
    ) -> dict[str, tuple[str, str | None]]:
        """This run's failed requests (messages, outcome) by key, to remember once written."""
        return {
            self.key(messages): (o.reason, o.output)
            for messages, o in done
            if o.reason is not None and o.reason.startswith(FAILED) and not o.recalled
        }


def remember_failures(cache_path: str, failed: dict[str, tuple[str, str | None]]) -> None:
    """Store a finished run's failed requests (see `Recall`)."""
    if failed:
        cache = Cache(cache_path)
        try:
            cache.put_failures(failed)
        finally:
            cache.close()


async def label_after_batch(
    done: Collected,
    provider: Provider,
    task: TaskConfig,
    record: dict[str, Any],
    messages: list[dict[str, str]],
    repair: bool,
    version: str,
) -> Outcome:
    """`label_one` after batch mode (`providers.batch.collect`) has filled the cache.

    An answered request is a cache hit, validated as ever, and its repair turn (if any) runs
    synchronously. A request that failed for good in its batch, or was never submitted
    because of a cap, is not sent again here: it is a reject with its reason, or a budget stop.
    """
    verdict = done.verdict(messages, task.answer_schema(), version)
    if verdict == BUDGET:
        return Outcome(record, budget_stop=True)
    if verdict is not None:
        return Outcome(record, reason=f"batch request failed: {verdict}")
    return await label_one(provider, task, record, messages, repair, version)


def normalise(value: Any) -> Any:
    if isinstance(value, str):
        return re.sub(r"\s+", " ", value).strip().strip(".").casefold()
    return value


def agreement(
    task: TaskConfig, pairs: list[tuple[dict[str, Any], dict[str, Any]]]
) -> dict[str, Any]:
    """Teacher vs gold per gold field: exact (normalised) rate, and any-gold-label for labels."""
    report: dict[str, Any] = {}
    for f in (f for f in task.fields if f.gold):
        n = agree = any_label = 0
        for answer, record in pairs:
            gold = task.gold_answer(record)[f.name]
            n += 1
            agree += normalise(answer.get(f.name)) == normalise(gold)
            all_gold = (record.get("gold_all") or {}).get(f.name) or [gold]
            any_label += answer.get(f.name) in all_gold
        entry: dict[str, Any] = {"n": n, "agree": agree, "rate": round(agree / n, 4) if n else None}
        if f.kind == "label":
            entry["any_gold_label_rate"] = round(any_label / n, 4) if n else None
        report[f.name] = entry
    return report
