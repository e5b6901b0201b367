"""Moving off an OpenAI fine-tune: chat fine-tuning files and logged traffic, read as they are.

Unit tests read real CUAD clauses shaped into both formats (`data/raw/openai_chat`,
`data/raw/openai_log`, made by `scripts/make_openai_samples.py`), with malformed lines planted
among them: each gives a `file:line` error naming the turn or key, and in quarantine mode
lands in the ledger with every other line kept. The slow tests run each profile through real
`dvc exp run` in a copy of the project, as `tests/test_task_nli.py` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dvc_project import TINY, exp_run, make_repo, missing_outputs, profile_args

from temper.records.conversations import chat_records, log_records
from temper.records.sources import InputError, iter_numbered
from temper.stages.prepare import Ledger, PrepareConfig, read_records
from temper.task import load_task

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "data/raw/openai_chat/train.jsonl"
LOG = ROOT / "data/raw/openai_log/requests.jsonl"
TASK = load_task(ROOT / "configs/tasks/clause_chat.yaml")


def real_lines(path: Path, n: int) -> list[str]:
    with path.open(encoding="utf-8") as handle:
        return [next(handle).rstrip("\n") for _ in range(n)]


def planted(tmp_path: Path, source: Path, bad: dict[int, str], n: int = 20) -> Path:
    """The first n real lines with `bad` lines (1-based line number -> text) put in place."""
    lines = real_lines(source, n)
    for lineno, text in bad.items():
        lines[lineno - 1] = text
    path = tmp_path / source.name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read(path: Path, fmt: str, on_error: str = "quarantine") -> tuple[list, Ledger]:
    cfg = PrepareConfig(sources=[str(path)], format=fmt, on_error=on_error)
    ledger = Ledger(cfg)
    return read_records(cfg, TASK, ledger), ledger


def clause_line(**extra_turn) -> str:
    """A real chat line whose assistant turn is replaced by `extra_turn` keys."""
    row = json.loads(real_lines(CHAT, 1)[0])
    row["messages"][-1] = {**row["messages"][-1], **extra_turn}
    return json.dumps(row)


BAD_CHAT = {
    3: '{"messages": [{"role": "user", "content": "x"}',  # cut off
    5: json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "c"}]}),
    7: json.dumps({"messages": [{"role": "customer", "content": "c"}, {"role": "assistant", "content": "a"}]}),
    9: clause_line(content=42),
    11: clause_line(weight=2),
    13: json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}),
    15: json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}, {"role": "assistant", "content": "a"}]}),
}  # fmt: skip
EXPECTED_CHAT = {
    3: "malformed JSON",
    5: "no assistant turn",
    7: "messages[0].role: 'customer' is not one of",
    9: "messages[2].content: int, not a string",
    11: "messages[2].weight: 2 is not 0 or 1",
    13: "no user turn before the assistant turn",
    15: "messages[0].content[0]: 'image_url' part, only text is supported",
}


def test_malformed_chat_lines_name_file_and_line_and_nothing_is_lost(tmp_path):
    path = planted(tmp_path, CHAT, BAD_CHAT)
    records, ledger = read(path, "openai_chat")
    reasons = {int(q["where"].rsplit(":", 1)[1]): q["reason"] for q in ledger.quarantined}
    assert set(reasons) == set(EXPECTED_CHAT)
    for lineno, expected in EXPECTED_CHAT.items():
        assert reasons[lineno].startswith(f"{path}:{lineno}: "), reasons[lineno]
        assert expected in reasons[lineno], reasons[lineno]
    # Every other line is a record (a weighted two-turn line would be two): 13 good lines.
    good = {int(r["where"].rsplit(":", 1)[1]) for r in records}
    assert good == set(range(1, 21)) - set(EXPECTED_CHAT)
    assert ledger.read == [20]


def test_a_malformed_line_stops_prepare_in_fail_mode(tmp_path):
    path = planted(tmp_path, CHAT, {4: BAD_CHAT[9]})
    with pytest.raises(InputError, match=rf"^{path}:4: messages\[2\]\.content: int"):
        read(path, "openai_chat", on_error="fail")


def test_chat_targets_last_turn_or_every_weighted_turn_with_history_as_prompt():
    rows = [(w, n, r) for w, n, r in iter_numbered(CHAT)]
    by_line = {n: r for _, n, r in rows}
    # Line 5 (0-based 4) is two-turn without weights; line 10 two-turn with weights 1 and 1.
    last = chat_records(by_line[5], f"{CHAT}:5", TASK)
    assert len(last) == 1 and last[0]["id"] == "train.jsonl:5"
    assert [m["role"] for m in last[0]["prompt"]] == ["system", "user", "assistant", "user"]
    assert last[0]["gold"]["answer"] == by_line[5]["messages"][-1]["content"]
    both = chat_records(by_line[10], f"{CHAT}:10", TASK)
    assert [r["id"] for r in both] == ["train.jsonl:10#2", "train.jsonl:10#4"]
    assert [len(r["prompt"]) for r in both] == [2, 4]
    assert both[0]["gold"]["answer"] == by_line[10]["messages"][2]["content"]
    assert both[0]["group"] == both[1]["group"]  # one conversation: one split
    # Content parts (line 4) are joined into the text the student reads.
    parts = chat_records(by_line[4], f"{CHAT}:4", TASK)[0]
    assert parts["prompt"][1]["content"] == by_line[4]["messages"][1]["content"][0]["text"]


def test_every_chat_line_of_the_sample_reads_and_weighted_lines_give_two_examples():
    records, ledger = read(CHAT, "openai_chat", on_error="fail")
    assert ledger.read == [300] and not ledger.quarantined
    assert len(records) == 300 + 30  # 30 lines weight both assistant turns
    assert len({r["id"] for r in records}) == len(records)


def test_log_lines_keep_the_logged_reply_or_none_and_bad_lines_are_quarantined(tmp_path):
    lines = real_lines(LOG, 20)
    cases = {
        2: '{"request": ',
        4: json.dumps({"request": {"messages": "hello"}, "response": None}),
        6: json.dumps({"request": {"messages": [{"role": "user", "content": None}]}}),
        8: json.dumps(
            {
                "request": {"messages": [{"role": "user", "content": "c"}]},
                "response": {"choices": [{"message": {"role": "assistant"}, "x": 1}]},
            }
        ),
    }
    path = planted(tmp_path, LOG, cases)
    records, ledger = read(path, "openai_log")
    reasons = {int(q["where"].rsplit(":", 1)[1]): q["reason"] for q in ledger.quarantined}
    assert set(reasons) == {2, 4, 6}
    assert "malformed JSON" in reasons[2]
    assert "'messages' must be a non-empty list" in reasons[4]
    assert "messages[0].content: missing" in reasons[6]
    assert len(records) == 17  # the other lines, line 8 (a reply with no content) included
    by_line = {int(r["where"].rsplit(":", 1)[1]): r for r in records}
    assert "logged" not in by_line[8]  # no content: the teacher is asked
    for lineno, line in enumerate(lines, 1):
        if lineno in cases:
            continue
        row = json.loads(line)
        reply = row.get("answer") or ((row.get("response") or row).get("choices") or [{}])[0]
        reply = reply if isinstance(reply, str) else (reply.get("message") or {}).get("content")
        logged = by_line[lineno].get("logged")
        assert (logged or {}).get("answer") == reply, lineno


def test_every_log_shape_of_the_sample_reads_with_its_reply():
    records, ledger = read(LOG, "openai_log", on_error="fail")
    assert ledger.read == [300] and len(records) == 300
    assert sum("logged" in r for r in records) == 225  # 75 requests have no reply
    serve_rows = [r for r in records if r["id"].startswith("req-")]
    assert serve_rows and all(r["prompt"] == TASK.messages(r["text"]) for r in serve_rows)
    assert all(r["gold"]["answer"] for r in records)  # metadata.reference, or the reply


def test_a_log_request_must_end_with_a_user_turn():
    row = {"request": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}}  # fmt: skip
    with pytest.raises(InputError, match="^f:3: the request's last message is not a user turn"):
        log_records(row, "f:3", TASK)


def test_generated_csv_ids_count_data_rows_from_one_and_locations_keep_the_line(tmp_path):
    from temper.records.sources import FieldMap, extract

    source = tmp_path / "clauses.csv"
    clauses = [json.loads(line) for line in real_lines(ROOT / "data/raw/contracts/train.jsonl", 3)]
    rows = ["text,document_id,category"] + [
        '"{}",{},{}'.format(c["clause"].replace('"', '""'), c["contract_id"], c["category"])
        for c in clauses
    ]
    source.write_text("\n".join(rows) + "\n", encoding="utf-8")
    fmap = FieldMap(id=None)
    task = load_task(ROOT / "configs/tasks/clause_review.yaml")
    got = [extract(r, w, fmap, task, number=n) for w, n, r in iter_numbered(source)]
    assert [r["id"] for r in got] == ["clauses.csv:1", "clauses.csv:2", "clauses.csv:3"]
    assert [r["where"] for r in got] == [f"{source}:2", f"{source}:3", f"{source}:4"]


# --------------------------------------------------------------------------- end to end

SMALL = ["prepare.max_examples={train:24,validation:4,test:2}", *TINY]


def run_profile(
    tmp_path: Path, base_model_dir: Path, name: str, data: str, target: str | None = None
) -> Path:
    """`dvc exp run` of profile `name` (plus SMALL) in a fresh copy of the project, up to the
    stage `target` (else every stage)."""
    from temper.config import read_yaml

    repo = make_repo(tmp_path / "project", base_model_dir, [data])
    profile = read_yaml(ROOT / "configs" / "profiles" / f"{name}.yaml")
    exp_run(repo, profile_args(repo, profile) + SMALL, target=target)
    return repo


def registered(repo: Path, model_name: str) -> dict:
    import mlflow

    store = f"sqlite:///{repo / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    assert len(client.search_model_versions(f"name='{model_name}'")) == 1
    return json.loads((repo / "metrics" / "register.json").read_text())


@pytest.mark.slow
def test_openai_chat_file_runs_end_to_end_scored_by_rouge(tmp_path, base_model_dir):
    repo = run_profile(tmp_path, base_model_dir, "openai_chat", "data/raw/openai_chat")
    prepared = json.loads((repo / "metrics" / "prepare.json").read_text())
    assert prepared["task"]["name"] == "clause_chat" and prepared["read"] == 300
    evaluation = json.loads((repo / "metrics" / "eval.json").read_text())
    assert evaluation["primary_metric"] == "answer.rougeL"
    cand = evaluation["candidates"]["r16"]["metrics"]
    for metric in ("rouge1", "rouge2", "rougeL", "rougeLsum", "exact_match"):
        assert (
            f"answer.{metric}" in cand and f"answer.{metric}" in evaluation["baseline"]["metrics"]
        )
    assert not any("clause_type" in k for k in cand)
    # A task with no label-like field: no yardstick, an empty confusion matrix, and still every
    # output dvc.yaml declares (the per-class files say there is nothing to show).
    assert missing_outputs(repo) == []
    assert evaluation.get("classical") is None
    confusion = (repo / "reports" / "plots" / "confusion.csv").read_text().splitlines()
    assert confusion == ["actual,predicted"]
    register = registered(repo, "temper-clause-chat")
    assert register["registered"] and register["model_name"] == "temper-clause-chat"


@pytest.mark.slow
def test_logged_traffic_runs_through_distil_which_counts_logged_and_asked(tmp_path, base_model_dir):
    """What is the log's own runs through DVC: its prepare and the distil that keeps the logged
    replies. From train on, the `openai_log` profile is the `openai_chat` one (the same task
    and settings on distilled files of one format), which the test above runs to register."""
    repo = run_profile(tmp_path, base_model_dir, "openai_log", "data/raw/openai_log", "distil")
    distil = json.loads((repo / "metrics" / "distil.json").read_text())
    train = distil["records"]["train"]
    assert train["input"] == 24 and train["logged"] > 0 and train["asked"] > 0
    assert train["logged"] + train["logged_rejected"] + train["asked"] == train["input"]
    rows = [json.loads(line) for line in (repo / "data/distilled/train.jsonl").open()]
    sources = [r["label_source"] for r in rows]
    assert sources.count("logged") == train["logged"] and sources.count("gold") == train["asked"]
    for row in rows:
        assert [m["role"] for m in row["completion"]] == ["assistant"]  # what train reads
        assert row["prompt"][-1]["role"] == "user"
        if row["label_source"] == "logged":
            assert row["completion"][0]["content"] == row["logged"]["answer"].strip()
    assert not (repo / "models" / "candidates").exists()  # nothing past distil ran


def test_a_text_task_is_served_as_prose_with_no_json_schema_imposed():
    from types import SimpleNamespace

    from temper.online.serve.completions import extras, schema_for
    from temper.online.serve.config import ServeConfig
    from temper.online.serve.protocol import ChatRequest

    served = SimpleNamespace(
        task=TASK, generation=SimpleNamespace(constrained=True), version="1", label="v1"
    )
    clause = json.loads(real_lines(CHAT, 1)[0])["messages"][1]["content"]
    request = ChatRequest(model="m", messages=[{"role": "user", "content": clause}])
    assert schema_for(ServeConfig(), served, request) is None
    json_task = load_task(ROOT / "configs/tasks/clause_review.yaml")
    as_json = SimpleNamespace(**{**vars(served), "task": json_task})
    assert schema_for(ServeConfig(), as_json, request) == json_task.json_schema()
    reply = "This is a Governing Law clause. Key term: Delaware."
    job = SimpleNamespace(text=reply, token_ids=[], logprobs=[], rescored={})
    assert extras(served, job) == {"model_version": "1", "model_label": "v1"}
    assert TASK.parse(reply) == {"answer": reply} and TASK.parse("  ") is None


def test_a_cut_logged_reply_is_no_reference_and_distil_rejects_it_counted():
    from temper.teacher import logged_outcome

    row = json.loads(real_lines(LOG, 20)[10])  # a request/response line
    row.pop("metadata")
    row["response"]["choices"][0]["finish_reason"] = "length"
    (record,) = log_records(row, f"{LOG}:11", TASK)
    assert record["gold"] == {"answer": None} and record["logged"]["finish_reason"] == "length"
    outcome = logged_outcome(TASK, record)
    assert outcome.answer is None and "output truncated (finish_reason length)" in outcome.reason
    row["response"]["choices"][0]["finish_reason"] = "stop"
    (record,) = log_records(row, f"{LOG}:11", TASK)
    reply = row["response"]["choices"][0]["message"]["content"]
    assert record["gold"] == {"answer": reply} and logged_outcome(TASK, record).answer == {
        "answer": reply
    }
