"""Constrained decoding: a logits processor that lets a model write only schema-valid JSON.

Built from the task's `json_schema()` (the same definition providers and `validate_answer`
use) with llguidance, the grammar engine behind llama.cpp's and vLLM's structured output.
Why llguidance (checked December 2026 against torch 2.13 CPU, transformers 5.24, offline):
lm-format-enforcer 0.11.3 installs but its transformers integration fails to import on
transformers 5 (`transformers.tokenization_utils.PreTrainedTokenizerBase` is gone); outlines
1.3.3 installs too (with outlines-core and genson) but was not needed; llguidance 1.9.1 is one
binary wheel with no dependencies, full JSON Schema support (enums, nullable types, arrays),
reads the SmolLM2 tokenizer in about 0.4 s and needs no hub. Its own
`apply_token_bitmask_inplace` is `torch.compile`d (a C compiler on CPU), so the mask is applied
here in plain torch.

Usage (`generation.generate(..., schema=task.json_schema())` does this per batch):

    constraint = json_logits_processor(task, tokenizer)
    model.generate(**batch, logits_processor=LogitsProcessorList([constraint.processor()]))

Whitespace is fixed to the canonical answer format (`TaskConfig.format_answer`:
`{"a": 1, "b": 2}`), so an untrained model cannot spend its budget on blanks between fields.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from ..task import TaskConfig

# The separators of json.dumps, the canonical answer text the student is trained on.
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class JsonConstraint:
    """A compiled JSON-schema grammar and the tokenizer's token table, shared by batches."""

    def __init__(self, schema: dict[str, Any], tokenizer: Any):
        import llguidance

        self.schema = copy.deepcopy(schema)
        self.schema["x-guidance"] = dict(_COMPACT)
        self._ll = llguidance
        self.grammar = llguidance.LLMatcher.grammar_from_json_schema(self.schema)
        self.tokenizer = tokenizer
        self._tables: dict[int, Any] = {}  # logits width -> llguidance tokenizer
        failed, errors = llguidance.LLMatcher.validate_grammar_with_warnings(self.grammar)
        if failed:
            raise ValueError(f"JSON schema not usable for constrained decoding: {errors}")
        self._closers: dict[int, tuple[Any, Any, Any]] = {}
        self._reserve: dict[str | None, int] | None = None

    def table(self, n_vocab: int) -> Any:
        """llguidance's view of the tokenizer, sized to the model's logits (often padded)."""
        if n_vocab not in self._tables:
            import llguidance.hf

            self._tables[n_vocab] = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=n_vocab)
        return self._tables[n_vocab]

    def processor(self, max_new_tokens: int | None = None) -> JsonLogitsProcessor:
        """A fresh processor for one `model.generate` call (one matcher per row)."""
        return JsonLogitsProcessor(self, max_new_tokens)

    def matcher(self, n_vocab: int) -> Any:
        return self._ll.LLMatcher(self.table(n_vocab), self.grammar)

    def closers(self, n_vocab: int) -> tuple[Any, Any, Any]:
        """Token masks that end things: a string (`"`), a container (`}`/`]`), a value (`,`)."""
        if n_vocab not in self._closers:
            import torch

            texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            texts += [""] * (n_vocab - len(texts))
            quote = torch.tensor(['"' in t and "\\" not in t for t in texts[:n_vocab]])
            close = torch.tensor([("}" in t or "]" in t) for t in texts[:n_vocab]])
            comma = torch.tensor(["," in t for t in texts[:n_vocab]])
            self._closers[n_vocab] = (quote, close, comma)
        return self._closers[n_vocab]

    def reserve(self) -> dict[str | None, int]:
        if self._reserve is None:
            self._reserve = self._skeleton_tokens()
        return self._reserve

    def _skeleton_tokens(self) -> dict[str | None, int]:
        """Tokens that finishing the answer may still take once inside each field (None:
        before the first): the skeleton of the later fields (longest label, empty strings
        and lists, 0, false) plus two for the current value's end."""
        props = self.schema.get("properties", {})
        names = list(props)

        def shortest(spec: dict[str, Any]) -> Any:
            types = spec.get("type") if isinstance(spec.get("type"), list) else [spec.get("type")]
            if "enum" in spec:
                return max((v for v in spec["enum"] if v is not None), key=len, default=None)
            return {"array": [], "number": 0, "integer": 0, "boolean": False}.get(types[0], "")

        out: dict[str | None, int] = {}
        for i, name in enumerate([None, *names]):
            later = {n: shortest(props[n]) for n in names[i:]}
            tail = json.dumps(later, ensure_ascii=False)
            out[name] = len(self.tokenizer(tail, add_special_tokens=False)["input_ids"]) + 2
        return out


class JsonLogitsProcessor:
    """`transformers` logits processor: masks every token that would break the schema.

    It sees the whole sequence each step (prompt included: `generate` passes the shared
    prefix, the padding and each prompt); the first call's length is the prompt, and each
    later call feeds the row's newest token to its matcher. A row whose matcher rejects a
    token is one `generate` has already finished (it pads finished rows): it is left alone.

    With `max_new_tokens`, a row whose remaining budget only just covers the rest of the
    answer (`JsonConstraint.reserve`) is steered to close: inside a string only tokens that
    end it, elsewhere `}`/`]`, then `"`, then `,` where the grammar allows them. Without this
    an untrained model writes a string until the budget runs out and the JSON never closes.
    """

    def __init__(self, constraint: JsonConstraint, max_new_tokens: int | None = None):
        self.constraint = constraint
        self.max_new_tokens = max_new_tokens
        self.matchers: list[Any] | None = None
        self.alive: list[bool] = []
        self.texts: list[str] = []
        self.steps = 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        batch, n_vocab = scores.shape
        if self.matchers is None:
            self.matchers = [self.constraint.matcher(n_vocab) for _ in range(batch)]
            self.alive, self.texts = [True] * batch, [""] * batch
            if self.max_new_tokens is not None:
                self._reserve = self.constraint.reserve()
                self._names = [n for n in self._reserve if n is not None]
        else:
            self.steps += 1
            last = input_ids[:, -1].tolist()
            for row, matcher in enumerate(self.matchers):
                if self.alive[row] and not matcher.consume_token(last[row]):
                    self.alive[row] = False
                elif self.alive[row] and self.max_new_tokens is not None:
                    self.texts[row] += self.constraint.tokenizer.decode([last[row]])
        bitmask = torch.full((batch, (n_vocab + 31) // 32), -1, dtype=torch.int32)
        for row, matcher in enumerate(self.matchers):
            if self.alive[row] and not matcher.is_error():
                matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), bitmask.shape[1] * 4)
        bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
        allowed = bits.reshape(batch, -1)[:, :n_vocab].to(torch.bool)
        if self.max_new_tokens is not None:
            left = self.max_new_tokens - self.steps
            for row in range(batch):
                if self.alive[row] and left <= self._reserve[self.field_of(row)]:
                    allowed[row] = closing_set(
                        allowed[row], self.texts[row], self.constraint, n_vocab
                    )
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))

    def field_of(self, row: int) -> str | None:
        return field_of(self.texts[row], self._names)


def field_of(text: str, names: list[str]) -> str | None:
    """The last top-level field whose key `text` has written (None: none yet)."""
    spot, name = max(((text.rfind(json.dumps(n) + ":"), n) for n in names), default=(-1, None))
    return name if spot >= 0 else None


def _in_string(text: str) -> bool:
    """Whether JSON text ends inside a string (an odd number of unescaped quotes)."""
    inside = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and inside:
            escaped = True
        elif ch == '"':
            inside = not inside
    return inside


def closing_set(allowed: Any, text: str, constraint: JsonConstraint, n_vocab: int) -> Any:
    """The allowed tokens narrowed to those that bring the answer to its end soonest."""
    quote, close, comma = constraint.closers(n_vocab)
    tiers = (quote,) if _in_string(text) else (close, quote, comma)
    for tier in tiers:
        narrowed = allowed & tier
        if narrowed.any():
            return narrowed
    return allowed


def json_logits_processor(task: TaskConfig | dict[str, Any], tokenizer: Any) -> JsonConstraint:
    """The constraint for a task's answers (or any JSON schema); `.processor()` per batch."""
    schema = task.json_schema() if isinstance(task, TaskConfig) else task
    json.dumps(schema)  # fail here, not inside generation, on a schema that is not JSON
    return JsonConstraint(schema, tokenizer)
