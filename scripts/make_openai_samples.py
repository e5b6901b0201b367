"""Shape a small CUAD sample into the two files a team leaving an OpenAI fine-tune holds.

    python scripts/make_openai_samples.py   # writes data/raw/openai_chat/, data/raw/openai_log/

- `data/raw/openai_chat/train.jsonl`: an OpenAI chat fine-tuning file. Each line is one CUAD
  clause as a conversation (system prompt, the clause from the user, the reviewer's note from
  the assistant); every fifth line is two-turn (the note, then "What is its key term?"), half
  of those with `weight` on both assistant turns (two examples), half without (the last turn).
  Every seventh line sends its user content as a list of text parts.
- `data/raw/openai_log/requests.jsonl`: a prototype's logged traffic on other CUAD clauses, in
  the three shapes prepare reads: request/response records, stored chat completions (the
  request's `messages` beside `choices`) and rows of `temper serve`'s request log. About a
  quarter have no reply (a failed or unstored request): distil asks the teacher for those.

The replies are CUAD's gold annotations written as a reviewer's note (`note()`), not real
model outputs. Deterministic: the same CUAD files give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUAD = [ROOT / "data/raw/contracts" / f"{s}.jsonl" for s in ("train", "validation", "test")]
SYSTEM = (
    "You review commercial contracts. Read the clause and reply with a one-line note: the "
    "clause type, and its key term when it has one."
)
MODEL = "gpt-4o-2024-08-06"
N_CHAT, N_LOG = 300, 300


def note(record: dict) -> str:
    """The reviewer's note for a CUAD clause: its category, and the key term when there is one."""
    answer = (record.get("answer") or "").strip()
    if answer in ("", "Yes", "No", "[]"):
        return f"This is a {record['category']} clause."
    return f"This is a {record['category']} clause. Key term: {answer}."


def key(record: dict) -> str:
    return hashlib.sha256(f"openai-sample-v1|{record['id']}".encode()).hexdigest()


def sample() -> list[dict]:
    """Short clauses (<= 80 words), a fixed pseudo-random order, half of them with a key term."""
    rows = [json.loads(line) for path in CUAD for line in path.open(encoding="utf-8")]
    rows = sorted((r for r in rows if r["n_words"] <= 80), key=key)
    with_term = [r for r in rows if note(r).count("Key term")]
    without = [r for r in rows if not note(r).count("Key term")]
    half = (N_CHAT + N_LOG) // 2
    picked = with_term[:half] + without[: N_CHAT + N_LOG - len(with_term[:half])]
    return sorted(picked, key=key)


def chat_line(n: int, r: dict) -> dict:
    user: object = r["clause"]
    if n % 7 == 3:
        user = [{"type": "text", "text": r["clause"]}]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    if n % 5 == 4:
        term = (r.get("answer") or "").strip()
        term = term if term not in ("", "Yes", "No", "[]") else "None: the clause states no term."
        first = {"role": "assistant", "content": f"This is a {r['category']} clause."}
        last = {"role": "assistant", "content": term}
        if n % 10 == 9:
            first["weight"], last["weight"] = 1, 1
        follow = {"role": "user", "content": "What is its key term?"}
        return {"messages": [*messages, first, follow, last]}
    return {"messages": [*messages, {"role": "assistant", "content": note(r)}]}


def completion(n: int, reply: str, prompt_words: int) -> dict:
    return {
        "id": f"chatcmpl-sample{n:04d}",
        "object": "chat.completion",
        "created": 1767225600 + 60 * n,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 40 + prompt_words * 4 // 3, "completion_tokens": 20},
    }


def log_line(n: int, r: dict) -> dict:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["clause"]}]
    meta = {"cuad_id": r["id"], "reference": note(r)}
    reply = completion(n, note(r), r["n_words"])
    shape = n % 20
    if shape < 5:  # no reply logged (a timeout, a request that was not stored)
        error = {"message": "Request timed out.", "type": "timeout"}
        request = {"model": MODEL, "messages": messages}
        return {"request": request, "response": None, "error": error, "metadata": meta}
    if shape < 8:  # a stored chat completion, exported with its request's messages
        return {**reply, "messages": messages, "metadata": meta}
    if shape < 10:  # a row of temper serve's request log (the monitor's `requests` table)
        row = {"id": f"req-sample{n:04d}", "model": "temper-clause-chat"}
        return {**row, "input_text": r["clause"], "answer": note(r)}
    return {"request": {"model": MODEL, "messages": messages}, "response": reply, "metadata": meta}


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    tmp.replace(path)


def main() -> None:
    rows = sample()
    chat, logged = rows[:N_CHAT], rows[N_CHAT:]
    write(ROOT / "data/raw/openai_chat/train.jsonl", [chat_line(n, r) for n, r in enumerate(chat)])
    write(
        ROOT / "data/raw/openai_log/requests.jsonl", [log_line(n, r) for n, r in enumerate(logged)]
    )
    print(f"openai_chat: {len(chat)} lines; openai_log: {len(logged)} lines")


if __name__ == "__main__":
    main()
