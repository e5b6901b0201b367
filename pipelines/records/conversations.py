"""OpenAI chat files and logged API traffic, read as Temper records (`prepare.format`).

Two shapes a team leaving an OpenAI fine-tune already holds:

- `openai_chat`: a chat fine-tuning file, one `{"messages": [...]}` per line (system/developer,
  user and assistant turns, multi-turn allowed, optional `weight` 0/1 on assistant turns). The
  target is the last assistant turn, or with weights every assistant turn of weight 1 (one
  record each, with the turns before it as its prompt).
- `openai_log`: logged traffic, one request/response record per line: `{"request":
  {"messages": [...]}, "response": <chat completion>}`, a stored chat completion with its
  request's `messages` beside `choices`, or a row of `temper serve`'s request log
  (`input_text`, `answer`). The reply (`choices[0].message.content`) is the teacher's answer,
  already paid for: distil uses it as the label. A line without one is asked of the teacher.

Every problem is an `InputError` naming `file:line` and the turn or key, so prepare's ledger
stops or quarantines that line and nothing is lost silently.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .sources import InputError

if TYPE_CHECKING:
    from ..task import TaskConfig

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _content(message: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts joined (OpenAI's content parts)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InputError(f"{where}.content[{index}]: {kind!r} part, only text is supported")
            if not isinstance(part.get("text"), str):
                raise InputError(f"{where}.content[{index}].text: not a string")
            texts.append(part["text"])
        return "".join(texts)
    got = "missing" if content is None else f"{type(content).__name__}, not a string"
    raise InputError(f"{where}.content: {got} (a string or a list of text parts)")


def parse_messages(raw: Any, where: str, weights: bool) -> list[dict[str, Any]]:
    """Validated turns `{"role", "content"[, "weight"]}`; developer becomes system."""
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{where}: 'messages' must be a non-empty list")
    turns = []
    for index, message in enumerate(raw):
        at = f"{where}: messages[{index}]"
        if not isinstance(message, dict):
            raise InputError(f"{at}: not a JSON object")
        role = message.get("role")
        if role not in ROLES:
            raise InputError(
                f"{at}.role: {role!r} is not one of {sorted(ROLES)} (tool and function turns "
                "are not supported)"
            )
        turn: dict[str, Any] = {"role": ROLES[role], "content": _content(message, at)}
        if "weight" in message:
            if not weights or role != "assistant":
                raise InputError(f"{at}.weight: only assistant turns of a chat file take a weight")
            if message["weight"] not in (0, 1) or isinstance(message["weight"], bool):
                raise InputError(f"{at}.weight: {message['weight']!r} is not 0 or 1")
            turn["weight"] = message["weight"]
        turns.append(turn)
    return turns


def _text(prompt: list[dict[str, Any]]) -> str:
    """What a record's `text` holds (de-duplication, the teacher, the judge): the one user
    message of a single-turn prompt, else the conversation without its system prompt."""
    turns = [m for m in prompt if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)


def _group(prompt: list[dict[str, Any]]) -> str:
    """The first user turn's hash: every example of one conversation, and every copy of it,
    lands in one split."""
    first = next(m["content"] for m in prompt if m["role"] == "user")
    return hashlib.sha256(first.encode()).hexdigest()[:16]


def record_id(where: str) -> str:
    """`<file name>:<line>` of a location `path:line`."""
    path, _, line = where.rpartition(":")
    return f"{Path(path).name}:{line}"


def gold_of(task: TaskConfig, text: str, where: str) -> dict[str, Any]:
    """A reply as the task's gold answer; an error naming the problems when it does not fit."""
    answer = task.parse(text)
    if answer is None:
        what = "empty" if task.is_text else "no JSON object in it"
        raise InputError(f"{where}: {what} (task {task.name}, answer: {task.answer})")
    if problems := task.validate_answer(answer):
        raise InputError(f"{where}: {'; '.join(problems)} (task {task.name})")
    return {f.name: task.gold_value(f, answer.get(f.name)) for f in task.fields if f.gold}


def _example(prompt: list[dict[str, Any]], where: str, rid: str) -> dict[str, Any]:
    if not any(m["role"] == "user" for m in prompt):
        raise InputError(f"{where}: no user turn before the assistant turn")
    clean = [{"role": m["role"], "content": m["content"]} for m in prompt]
    text, group = _text(prompt), _group(prompt)
    return {"id": rid, "group": group, "text": text, "where": where, "prompt": clean}


def chat_records(row: dict[str, Any], where: str, task: TaskConfig) -> list[dict[str, Any]]:
    """The examples of one chat fine-tuning line (one per target assistant turn)."""
    turns = parse_messages(row.get("messages"), where, weights=True)
    assistants = [i for i, m in enumerate(turns) if m["role"] == "assistant"]
    if not assistants:
        raise InputError(f"{where}: no assistant turn (the answer to learn)")
    if any("weight" in turns[i] for i in assistants):
        targets = [i for i in assistants if turns[i].get("weight") == 1]
        if not targets:
            raise InputError(f"{where}: every assistant turn has weight 0 (nothing to learn)")
    else:
        targets = [assistants[-1]]
    out = []
    for i in targets:
        rid = record_id(where) + (f"#{i}" if len(targets) > 1 else "")
        record = _example(turns[:i], where, rid)
        record["gold"] = gold_of(task, turns[i]["content"], f"{where}: messages[{i}]")
        record["gold_all"] = {}
        out.append(record)
    return out


def _reply(response: Any, where: str) -> dict[str, Any] | None:
    """`{"answer", "model", "finish_reason"}` of a chat completion; None when it has no reply."""
    if response is None:
        return None
    if not isinstance(response, dict):
        raise InputError(f"{where}: response: not a JSON object")
    choices = response.get("choices")
    if not choices:
        return None  # a request that failed or was not stored: the teacher is asked instead
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise InputError(f"{where}: response.choices[0].message: missing")
    if message.get("content") is None:
        return None  # a refusal or a tool call: no answer to learn from
    answer = _content(message, f"{where}: response.choices[0].message")
    return {
        "answer": answer,
        "model": response.get("model"),
        "finish_reason": choice.get("finish_reason"),
    }


def log_records(row: dict[str, Any], where: str, task: TaskConfig) -> list[dict[str, Any]]:
    """The one example of a logged request: its prompt, the logged reply (`logged`, or none)
    and its gold: `metadata.reference` when the log carries one, else the logged reply."""
    if "input_text" in row:  # temper serve's request log: the record's text, the task's prompt
        if not isinstance(row["input_text"], str):
            raise InputError(f"{where}: input_text: not a string")
        prompt = task.messages(row["input_text"])
        answer = row.get("answer")
        reply = None if answer is None else {"answer": str(answer), "model": row.get("model")}
    else:
        request = row.get("request", row)
        if not isinstance(request, dict):
            raise InputError(f"{where}: request: not a JSON object")
        prompt = parse_messages(request.get("messages"), where, weights=False)
        reply = _reply(row.get("response", row if "choices" in row else None), where)
    if prompt[-1]["role"] != "user":
        raise InputError(f"{where}: the request's last message is not a user turn")
    record = _example(prompt, where, str(row.get("id") or record_id(where)))
    metadata = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    reference = metadata.get("reference")
    record["gold"], record["gold_all"] = {f.name: None for f in task.fields if f.gold}, {}
    if reference is not None:
        record["gold"] = gold_of(task, str(reference), f"{where}: metadata.reference")
    elif reply is not None:  # an invalid or cut reply is no reference: distil rejects it
        parsed = task.parse(reply["answer"])
        cut = reply.get("finish_reason") in ("length", "max_tokens")
        if parsed is not None and not cut and not task.validate_answer(parsed):
            record["gold"] = gold_of(task, reply["answer"], f"{where}: response")
    if reply is not None:
        record["logged"] = reply
    return [record]
