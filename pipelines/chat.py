"""Chat prompts through a tokenizer's template, for templates without a system role too.

Some chat templates have no system role: Gemma's raises on a system message, others drop it
silently. For those, the system prompt is folded into the first user turn (system text, a blank
line, the user text; the convention of Gemma 3's own template), so the model still sees the
instructions. Every place that renders a prompt (generation, training data, token counts) goes
through here, so the student is trained, counted and scored on the same text.
"""

from __future__ import annotations

from typing import Any

_PROBE = "\x01temper-system-probe\x01"


def supports_system(tokenizer: Any) -> bool:
    """Whether the chat template renders a system message (it neither raises nor drops it)."""
    probe = [{"role": "system", "content": _PROBE}, {"role": "user", "content": "hi"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except (
        Exception
    ):  # jinja2's TemplateError from raise_exception(), or anything the template does
        return False
    return _PROBE in text


def fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """System messages moved into the first user turn (unchanged when there are none)."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if not system:
        return rest
    first_user = next((m for m in rest if m["role"] == "user"), None)
    if first_user is None:
        return [{"role": "user", "content": "\n\n".join(system)}, *rest]
    first_user["content"] = "\n\n".join([*system, first_user["content"]])
    return rest


def adapt(
    tokenizer: Any, messages: list[dict[str, str]], system_ok: bool | None = None
) -> list[dict[str, str]]:
    """`messages` as this template can take them (`system_ok`: a `supports_system` already
    computed, to spare a probe per record)."""
    ok = supports_system(tokenizer) if system_ok is None else system_ok
    return messages if ok else fold_system(messages)


def render(
    tokenizer: Any, messages: list[dict[str, str]], system_ok: bool | None = None, **kwargs: Any
) -> Any:
    """`tokenizer.apply_chat_template` on `adapt`ed messages."""
    return tokenizer.apply_chat_template(adapt(tokenizer, messages, system_ok), **kwargs)
