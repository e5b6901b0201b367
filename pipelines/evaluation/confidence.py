"""Label confidence: how probable the model found the label it answered.

Definition (documented in the README too): for a label field whose answer is the string `v`,
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


def value_span(raw: str, name: str, value: str) -> tuple[int, int] | None:
    """Characters of `value` (without its quotes) where the reply gives it for key `name`."""
    for dumped in (json.dumps(value, ensure_ascii=False), json.dumps(value)):
        pattern = re.escape(json.dumps(name)) + r"\s*:\s*" + re.escape(dumped)
        m = re.search(pattern, raw)
        if m:
            end = m.end() - 1  # before the closing quote
            return end - (len(dumped) - 2), end
    return None


def label_confidences(
    task: TaskConfig,
    tokenizer: Any,
    ids: list[int],
    logprobs: list[float],
    answer: dict[str, Any] | None,
) -> dict[str, float | None]:
    """{label field: confidence in [0, 1] or None} for one reply (see the module docstring)."""
    labels = [f.name for f in task.fields if f.kind == "label"]
    out: dict[str, float | None] = dict.fromkeys(labels)
    if not isinstance(answer, dict) or not ids:
        return out
    raw = tokenizer.decode(ids, skip_special_tokens=True)
    ends = token_ends(tokenizer, ids)
    for name in labels:
        value = answer.get(name)
        span = value_span(raw, name, value) if isinstance(value, str) and value else None
        if span is None:
            continue
        start, stop = span
        total, hit = 0.0, False
        for j, end in enumerate(ends):
            begin = ends[j - 1] if j else 0
            if begin < stop and end > start:
                total += logprobs[j]
                hit = True
        out[name] = min(1.0, math.exp(total)) if hit else None
    return out
