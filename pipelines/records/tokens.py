"""Chat-sequence token counts for many records at once (the prepare stage's length filter)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..chat import render, supports_system
from ..task import TaskConfig

log = logging.getLogger(__name__)


class TokenCounter:
    """Chat-sequence token counts (prompt + answer through the chat template) for many records.

    Rendering the template per record costs more than tokenizing. It is rendered once with
    placeholders instead: a record's count is the template's own tokens + its text's + its
    answer's. That is exact when the template copies message contents verbatim and the
    tokenizer never merges across a content boundary (special tokens and the newline before
    each content split them); a sample of records is checked against the full render and, if
    any differs, every record is counted the slow, exact way (with a warning).
    """

    TEXT, ANSWER = "\x00TEXT\x00", "\x00ANSWER\x00"  # NUL never survives normalise_text
    BATCH = 4096

    def __init__(self, tokenizer: Any, task: TaskConfig) -> None:
        self.tokenizer, self.task = tokenizer, task
        self.system_ok = supports_system(tokenizer)  # else the system prompt joins the user turn
        rendered = self._render(self.TEXT, self.ANSWER)
        self.overhead: int | None = None  # None: the placeholders were not copied verbatim
        if rendered.count(self.TEXT) == rendered.count(self.ANSWER) == 1:
            before, rest = rendered.split(self.TEXT)
            if self.ANSWER in rest:
                self.overhead = sum(self.lengths([before, *rest.split(self.ANSWER)]))

    def _render(self, text: str, answer: str) -> str:
        messages = self.task.messages(text) + [{"role": "assistant", "content": answer}]
        return render(self.tokenizer, messages, self.system_ok, tokenize=False)

    def lengths(self, texts: list[str]) -> list[int]:
        """Token counts of plain texts (no special tokens added), in batches."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        encode = getattr(backend, "encode_batch_fast", None) or getattr(
            backend, "encode_batch", None
        )
        out: list[int] = []
        for start in range(0, len(texts), self.BATCH):
            batch = texts[start : start + self.BATCH]
            if encode is not None:  # only lengths: no Python lists of token ids
                out += [len(e) for e in encode(batch, add_special_tokens=False)]
            else:
                out += [
                    len(ids) for ids in self.tokenizer(batch, add_special_tokens=False)["input_ids"]
                ]
        return out

    def exact(self, records: list[dict[str, Any]]) -> list[int]:
        rendered = []
        for r in records:
            answer = [{"role": "assistant", "content": self.task.format_answer(r["gold"])}]
            messages = r.get("prompt") or self.task.messages(r["text"])  # a chat file's turns
            rendered.append(
                render(self.tokenizer, messages + answer, self.system_ok, tokenize=False)
            )
        return self.lengths(rendered)

    def count(self, records: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """(chat tokens, text tokens) of each record."""
        if not records:
            return [], []
        n_text = self.lengths([r["text"] for r in records])
        if any("prompt" in r for r in records):  # their own turns: no shared template to reuse
            return self.exact(records), n_text
        if self.overhead is None:
            log.warning("prepare: chat template not decomposable; rendering every record")
            return self.exact(records), n_text
        answers = [self.task.format_answer(r["gold"]) for r in records]
        distinct = list(dict.fromkeys(answers))
        answer_len = dict(zip(distinct, self.lengths(distinct), strict=True))
        n_chat = [self.overhead + t + answer_len[a] for t, a in zip(n_text, answers, strict=True)]
        sample = sorted(set(np.linspace(0, len(records) - 1, 32).astype(int).tolist()))
        if self.exact([records[i] for i in sample]) != [n_chat[i] for i in sample]:
            log.warning("prepare: chat tokens differ from the decomposed count; counting exactly")
            return self.exact(records), n_text
        return n_chat, n_text
