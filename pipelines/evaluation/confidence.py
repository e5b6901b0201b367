"""Label confidence: how probable the model found the label it answered.

Definition (documented in the README too): for a label field whose answer is the string `v`
(or a boolean field whose answer is `true` / `false`, spelled without quotes),
the confidence is the product of the probabilities the model gave to the generated tokens
that spell `v` in its reply, i.e. `exp(sum log p(token))` over every generated token whose
characters overlap the characters of `v` inside the JSON string (a token that also carries the
opening quote counts). With greedy decoding this is the probability of that exact label
sequence given the prompt and the reply before it; it is 1.0 only when every token of the label
was certain. A null, missing or non-string value has no confidence (None).

The per-token log-probabilities come from `generation.generate(..., token_scores=True)` (raw
logits, before any logits processor). Hand-written: no library maps token scores onto the
characters of a JSON value.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ..task import TaskConfig


def token_ends(tokenizer: Any, ids: list[int]) -> list[int]:
    """Character end of each token in the decoded reply (decoding prefixes, so multi-byte
    characters split over tokens land on the token that completes them)."""
    return [len(tokenizer.decode(ids[: j + 1], skip_special_tokens=True)) for j in range(len(ids))]


def value_span(raw: str, name: str, value: str | bool) -> tuple[int, int] | None:
    """Characters of `value` (a string without its quotes, or a boolean literal) where the
    reply gives it for key `name`."""
    quotes = 0 if isinstance(value, bool) else 1
    for dumped in (json.dumps(value, ensure_ascii=False), json.dumps(value)):
        pattern = re.escape(json.dumps(name)) + r"\s*:\s*" + re.escape(dumped)
        m = re.search(pattern, raw)
        if m:
            end = m.end() - quotes  # before the closing quote
            return end - (len(dumped) - 2 * quotes), end
    return None


def confident_fields(task: TaskConfig) -> list[str]:
    """The fields that get a confidence: single labels and booleans (one value, one choice)."""
    return [
        f.name for f in task.fields if (f.kind == "label" and not f.multi) or f.kind == "boolean"
    ]


def label_tokens(
    task: TaskConfig, tokenizer: Any, ids: list[int], answer: dict[str, Any] | None
) -> dict[str, list[int]]:
    """{label field: the indexes of the reply's tokens that spell its value} (fields whose
    value is null, missing, not a string, or not found in the reply are left out)."""
    if not isinstance(answer, dict) or not ids:
        return {}
    raw = tokenizer.decode(ids, skip_special_tokens=True)
    ends = token_ends(tokenizer, ids)
    out: dict[str, list[int]] = {}
    for name in confident_fields(task):
        value = answer.get(name)
        known = isinstance(value, bool) or (isinstance(value, str) and value)
        span = value_span(raw, name, value) if known else None
        if span is None:
            continue
        start, stop = span
        hits = [j for j, end in enumerate(ends) if (ends[j - 1] if j else 0) < stop and end > start]
        if hits:
            out[name] = hits
    return out


def label_confidences(
    task: TaskConfig,
    tokenizer: Any,
    ids: list[int],
    logprobs: list[float],
    answer: dict[str, Any] | None,
) -> dict[str, float | None]:
    """{label field: confidence in [0, 1] or None} for one reply (see the module docstring)."""
    out: dict[str, float | None] = dict.fromkeys(confident_fields(task))
    for name, hits in label_tokens(task, tokenizer, ids, answer).items():
        out[name] = min(1.0, math.exp(sum(logprobs[j] for j in hits)))
    return out
