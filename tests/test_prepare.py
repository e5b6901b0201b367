"""prepare: normalisation, de-duplication, leak-free splits, bad input, real data."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.io import read_jsonl
from pipelines.prepare import (
    FieldMap,
    InputError,
    PrepareConfig,
    SplitConfig,
    assign_splits,
    dedup_key,
    near_duplicate_pairs,
    normalise_text,
    run,
    stratified_sample,
)

FIELDS = FieldMap(
    id="id",
    text="clause",
    group="contract_id",
    gold={"clause_type": "category", "key_term": "answer"},
    gold_all={"clause_type": "labels"},
)


def record(
    i: int,
    text: str,
    group: str = "c1",
    category: str = "Governing Law",
    answer: str | None = "New York",
    **extra,
) -> dict:
    return {
        "id": f"r{i}",
        "clause": text,
        "contract_id": group,
        "category": category,
        "labels": [category],
        "answer": answer,
        **extra,
    }


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def config(tmp_path: Path, sources: list[Path], **kw) -> PrepareConfig:
    kw.setdefault("fields", FIELDS)
    return PrepareConfig(
        sources=[str(s) for s in sources],
        out_dir=str(tmp_path / "out"),
        metrics=str(tmp_path / "out.json"),
        min_text_tokens=1,
        **kw,
    )


# --------------------------------------------------------------------------- units


def test_normalise_text():
    assert normalise_text("  Governed\u00a0by\tthe\n\nlaws\u200b of  NY. ") == (
        "Governed by the laws of NY."
    )
    assert normalise_text("Cafe\u0301") == "Caf\u00e9"  # NFC composes the accent
    assert normalise_text(" \u200b\n ") == ""


def test_dedup_key_ignores_case_punctuation_and_spacing():
    assert dedup_key("Governed by the Laws of New-York.") == dedup_key(
        "governed by the laws of new york"
    )
    assert dedup_key("Term: 90 days") != dedup_key("Term: 60 days")


def test_near_duplicates_found_and_verified():
    base = "This Agreement shall be governed by and construed in accordance with the laws of the State of"
    texts = [
        base + " Iowa without regard to conflicts of law principles.",
        base + " Texas without regard to conflicts of law principles.",
        "Licensee shall pay royalties of five percent of net sales each calendar quarter.",
    ]
    pairs = near_duplicate_pairs(texts, threshold=0.7)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1)]
    assert 0.7 <= pairs[0][2] < 1.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 30), st.sampled_from([None, "train", "test"])),
        min_size=1,
        max_size=80,
    )
)
def test_no_group_ever_crosses_splits(rows):
    """Property: whatever the groups, hash splitting keeps each group in exactly one split."""
    records = [{"id": str(i), "group": f"g{g}"} for i, (g, _) in enumerate(rows)]
    assign_splits(records, SplitConfig(validation=0.2, test=0.2))
    splits = defaultdict(set)
    for r in records:
        splits[r["group"]].add(r["split"])
    assert all(len(s) == 1 for s in splits.values())
    assert {r["split"] for r in records} <= {"train", "validation", "test"}


def test_source_split_that_leaks_a_group_is_an_error():
    records = [
        {"id": "a", "group": "g", "split": "train"},
        {"id": "b", "group": "g", "split": "test"},
    ]
    with pytest.raises(InputError, match="more than one split"):
        assign_splits(records, SplitConfig())


def test_stratified_sample_keeps_every_label_and_is_seeded():
    records = [
        {"id": f"{lab}{i}", "gold": {"t": lab}}
        for lab, n in (("a", 90), ("b", 9), ("c", 1))
        for i in range(n)
    ]
    one = stratified_sample(records, 20, "t", seed=1)
    assert len(one) == 20
    assert {r["gold"]["t"] for r in one} == {"a", "b", "c"}
    assert one == stratified_sample(records, 20, "t", seed=1)
    assert one != stratified_sample(records, 20, "t", seed=2)


# --------------------------------------------------------------------------- the stage


@pytest.mark.slow
def test_stage_dedups_filters_and_reports(tmp_path, task, base_model_dir):
    rows = [
        record(1, "This Agreement shall be governed by the laws of the State of New York.", "c1"),
        record(2, "THIS AGREEMENT shall be governed by the laws of the state of New-York!", "c2"),
        record(3, "   \u200b  ", "c3"),
        record(
            4,
            "Either party may terminate this Agreement upon ninety days notice.",
            "c4",
            category="Termination for Convenience",
            answer="Yes",
        ),
        record(5, "word " * 600, "c5"),
    ]
    cfg = config(
        tmp_path,
        [write_jsonl(tmp_path / "raw.jsonl", rows)],
        split=SplitConfig(validation=0.0, test=0.0),
        max_tokens=256,
    )
    stats = run(cfg, task, base_model_dir)
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert sorted(r["id"] for r in train) == ["r1", "r4"]
    assert stats["dropped"] == {"duplicate": 1, "empty": 1, "too_long": 1}
    dropped = {d["id"]: d for d in read_jsonl(tmp_path / "out" / "dropped.jsonl")}
    assert dropped["r2"]["duplicate_of"] == "r1"
    by_id = {r["id"]: r for r in train}
    assert by_id["r4"]["gold"] == {"clause_type": "Termination for Convenience", "key_term": None}
    assert by_id["r1"]["prompt"][0]["role"] == "system"
    assert by_id["r1"]["prompt"][1]["content"].endswith("State of New York.")
    assert json.loads((tmp_path / "out.json").read_text())["read"] == 5


@pytest.mark.slow
def test_duplicate_across_splits_is_kept_in_the_evaluation_split(tmp_path, task, base_model_dir):
    rows = [
        record(
            1,
            "Licensee shall maintain insurance of one million dollars.",
            "a",
            split="train",
            category="Insurance",
            answer="Yes",
        ),
        record(
            2,
            "Licensee shall maintain insurance of one million dollars",
            "b",
            split="test",
            category="Insurance",
            answer="Yes",
        ),
    ]
    fields = FIELDS.model_copy(update={"split": "split"})
    cfg = config(tmp_path, [write_jsonl(tmp_path / "raw.jsonl", rows)], fields=fields)
    run(cfg, task, base_model_dir)
    assert read_jsonl(tmp_path / "out" / "train.jsonl") == []
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "test.jsonl")] == ["r2"]


@pytest.mark.slow
def test_csv_and_parquet_sources(tmp_path, task, base_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        record(
            1,
            "Supplier warrants the products for twelve months after delivery.",
            "a",
            category="Warranty Duration",
            answer="12 months",
        ),
        record(
            2,
            "Neither party may assign this Agreement without prior written consent.",
            "b",
            category="Anti-Assignment",
            answer="Yes",
        ),
    ]
    csv_path = tmp_path / "raw.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerow({**rows[0], "labels": json.dumps(rows[0]["labels"])})
    pq.write_table(pa.Table.from_pylist([rows[1]]), tmp_path / "raw.parquet")
    cfg = config(
        tmp_path, [csv_path, tmp_path / "raw.parquet"], split=SplitConfig(validation=0.0, test=0.0)
    )
    run(cfg, task, base_model_dir)
    train = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "train.jsonl")}
    assert train["r1"]["gold"]["key_term"] == "12 months"
    assert train["r1"]["gold_all"]["clause_type"] == ["Warranty Duration"]
    assert train["r2"]["gold"]["clause_type"] == "Anti-Assignment"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"id": "r2", "clause": "broken"\n', r"raw.jsonl:2: malformed JSON"),
        (
            b'{"id": "r2", "contract_id": "c", "category": "Insurance", "labels": [], "answer": null}\n',
            r"raw.jsonl:2: missing field 'clause' \(prepare.fields.text\)",
        ),
        (
            b'{"id": "r2", "clause": "caf\xe9", "contract_id": "c"}\n',
            r"raw.jsonl:2: undecodable bytes",
        ),
        (
            b'{"id": "r2", "clause": "x", "contract_id": "c", "category": "Nope", "labels": [], '
            b'"answer": null}\n',
            r"raw.jsonl:2: field 'category': 'Nope' is not a label",
        ),
    ],
)
def test_bad_input_names_file_line_and_field(tmp_path, task, line, message):
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(
        json.dumps(record(1, "A good clause of several words.")).encode() + b"\n" + line
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.jsonl").write_text("previous output\n")
    with pytest.raises(InputError, match=message):
        run(config(tmp_path, [raw]), task, "unused-model-dir")
    # Nothing half-written: the previous output is untouched and no temp files remain.
    assert (out / "train.jsonl").read_text() == "previous output\n"
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl"]


@pytest.mark.slow
def test_quarantine_counts_bad_records_and_goes_on(tmp_path, task, base_model_dir):
    raw = tmp_path / "raw.jsonl"
    good = [
        json.dumps(record(i, f"Clause number {i} about the governing law of Delaware.", f"c{i}"))
        for i in range(3)
    ]
    raw.write_bytes(
        "\n".join(good).encode() + b"\n{not json\n" + b'{"id": "x", "clause": "\xff"}\n'
    )
    cfg = config(tmp_path, [raw], on_error="quarantine", split=SplitConfig(validation=0, test=0))
    stats = run(cfg, task, base_model_dir)
    assert stats["quarantined"]["total"] == 2
    quarantine = read_jsonl(tmp_path / "out" / "quarantine.jsonl")
    assert [q["where"] for q in quarantine] == [f"{raw}:4", f"{raw}:5"]
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) == 3


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_cuad_data_has_no_leakage(prepared_dir):
    splits = {s: read_jsonl(prepared_dir / f"{s}.jsonl") for s in ("train", "validation", "test")}
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [64, 32, 32]
    groups = {s: {r["group"] for r in rs} for s, rs in splits.items()}
    assert not groups["train"] & groups["test"]
    assert not groups["train"] & groups["validation"]
    assert not groups["validation"] & groups["test"]
    keys = {s: {dedup_key(r["text"]) for r in rs} for s, rs in splits.items()}
    assert not keys["train"] & keys["test"]
    stats = json.loads((prepared_dir / "prepare.json").read_text())
    assert stats["quarantined"]["total"] == 0
    assert stats["read"] == 5070 + 758 + 826
    # The stratified sample keeps many labels even at 64 records.
    assert len({r["gold"]["clause_type"] for r in splits["train"]}) >= 30
