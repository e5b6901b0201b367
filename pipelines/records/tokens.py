"""Chat-sequence token counts for many records at once (the prepare stage's length filter)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..chat import render, supports_system
from ..task import TaskConfig

log = logging.getLogger(__name__)

# Normalizers and pre-tokenizers that never delete or merge a character of a normalised text
# (NFC already; single spaces): each character stays, or grows into several. NFKC can merge
# (a half-width voiced mark joins the kana before it), BERT's cleanup deletes, `Whitespace`
# drops the spaces: with those a token may stand for more characters than its own string.
_KEEPS_NORMALIZER = {"NFC", "NFD", "Lowercase", "Prepend", "Replace", "Sequence"}
_KEEPS_PRE_TOKENIZER = {"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation", "Sequence"}


@dataclass(frozen=True)
class CharBound:
    """No token stands for more than `per_token` characters of a text, leaving out those that
    `untokenized` matches (characters without a token, which the tokenizer may drop or fold
    into one unknown token): a text with more of the others than `max_tokens * per_token`
    surely has more than `max_tokens` tokens, and needs no tokenizing to be dropped."""

    per_token: int
    untokenized: re.Pattern[str] | None = None

    def limit(self, max_tokens: int) -> int:
        return max_tokens * self.per_token

    def over(self, text: str, max_tokens: int) -> bool:
        """Whether `text` surely has more than `max_tokens` tokens (cheap: no tokenizing)."""
        limit = self.limit(max_tokens)
        if len(text) <= limit:
            return False
        return self.untokenized is None or len(self.untokenized.sub("", text)) > limit


def char_bound(tokenizer: Any) -> CharBound | None:
    """The `CharBound` of a fast tokenizer whose tokens cover every byte of a text (byte-level
    BPE, or a byte-fallback model): the longest token string, since a token's string is at
    least as long as the text it stands for (one character per byte, a `▁` per space, 6 for
    `<0x41>`). None (no bound: every text is tokenized) for any other tokenizer, e.g. a word
    level one whose unknown token stands for a whole word of any length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    keeps = _keeps(spec.get("normalizer"), _KEEPS_NORMALIZER) and _keeps(
        spec.get("pre_tokenizer"), _KEEPS_PRE_TOKENIZER
    )
    vocab = backend.get_vocab(with_added_tokens=True)
    if not keeps or not vocab:
        return None
    if model.get("type") == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer")):
        have = {byte for byte, char in _byte_chars().items() if char in vocab}
    elif model.get("byte_fallback"):
        have = {byte for byte in range(256) if f"<0x{byte:02X}>" in vocab}
    else:
        return None
    longest = max(map(len, vocab))
    if any(a.get("lstrip") or a.get("rstrip") for a in spec.get("added_tokens") or []):
        longest += 2  # such a token also takes the (single, normalised) space beside it
    return CharBound(longest, _untokenized(set(range(256)) - have))


def _keeps(part: dict[str, Any] | None, allowed: set[str]) -> bool:
    """Whether a normalizer or pre-tokenizer (spec) keeps every character, recursively."""
    if part is None:
        return True
    kind = part.get("type")
    if kind == "Sequence":
        inner = part.get("normalizers") or part.get("pretokenizers") or []
        return all(_keeps(p, allowed) for p in inner)
    if kind == "Replace":  # ` ` -> `▁` keeps; a replacement that shortens does not
        pattern = part.get("pattern") or {}
        return "String" in pattern and len(part.get("content", "")) >= len(pattern["String"])
    if kind in ("Split", "Punctuation"):
        return part.get("behavior") != "Removed"
    return kind in allowed


def _byte_chars() -> dict[int, str]:
    """Byte-level BPE's byte -> character table (GPT-2's: printable bytes stand for
    themselves, the others for 256, 257, ...)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _untokenized(missing: set[int]) -> re.Pattern[str] | None:
    """The characters whose UTF-8 form holds a byte without a token (None: there are none)."""
    spans = [span for byte in sorted(missing) if (span := _code_points(byte))]
    if not spans:
        return None
    return re.compile(
        "[" + "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in spans) + "]"
    )


def _code_points(byte: int) -> tuple[int, int] | None:
    """The code points (first, last) whose UTF-8 form holds `byte`, as its lead byte or, for
    a continuation byte, anywhere (every non-ASCII one); None where no UTF-8 text holds it."""
    if byte < 0x80:
        return byte, byte
    if byte < 0xC0:
        return 0x80, 0x10FFFF
    if 0xC2 <= byte <= 0xDF:
        return (byte & 0x1F) << 6, ((byte & 0x1F) << 6) + 0x3F
    if 0xE0 <= byte <= 0xEF:
        return max((byte & 0x0F) << 12, 0x800), ((byte & 0x0F) << 12) + 0xFFF
    if 0xF0 <= byte <= 0xF4:
        first = (byte & 0x07) << 18
        return max(first, 0x10000), min(first + 0x3FFFF, 0x10FFFF)
    return None  # 0xC0, 0xC1, 0xF5-0xFF


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
        self.bound = char_bound(tokenizer)  # None: no cheap bound, every text is tokenized
        self.system_ok = supports_system(tokenizer)  # else the system prompt joins the user turn
        rendered = self._render(self.TEXT, self.ANSWER)
        self.overhead: int | None = None  # None: the placeholders were not copied verbatim
        if rendered.count(self.TEXT) == rendered.count(self.ANSWER) == 1:
            before, rest = rendered.split(self.TEXT)
            if self.ANSWER in rest:
                self.overhead = sum(self.lengths([before, *rest.split(self.ANSWER)]))

    def surely_over(self, text: str, max_tokens: int) -> bool:
        """Whether the text alone, by its characters, has more than `max_tokens` tokens (so
        has its chat sequence, which holds it): then it need not be tokenized to be dropped."""
        return self.bound is not None and self.bound.over(text, max_tokens)

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
