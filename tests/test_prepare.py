"""prepare: normalisation, de-duplication, leak-free splits, bad input, real data."""

from __future__ import annotations

import csv
import json
import time
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from temper.io import read_jsonl
from temper.records.neardup import dedup_key
from temper.records.sampling import stratified_sample
from temper.records.sources import FieldMap, InputError, normalise_text
from temper.records.splits import SplitConfig, assign_splits, hash_split
from temper.stages import prepare
from temper.stages.prepare import PrepareConfig, run

FIELDS = FieldMap(
    id="id",
    text="clause",
    group="contract_id",
    gold={"clause_type": "category", "key_term": "answer"},
    gold_all={"clause_type": "labels"},
)
# The same mapping with the source's own split column (rows from `three_splits`).
SPLIT_FIELDS = FIELDS.model_copy(update={"split": "split"})
SPLITS = ("train", "validation", "test")

# Distinct clauses, no two of them near-duplicates.
CLAUSES = [
    "This Agreement shall be governed by the laws of the State of New York.",
    "Either party may terminate this Agreement upon ninety days written notice.",
    "Licensee shall maintain general liability insurance of one million dollars.",
    "Supplier warrants the products for twelve months after delivery.",
    "Neither party may assign this Agreement without prior written consent.",
    "The Company may audit the books and records of the Distributor once per year.",
    "Royalties equal five percent of net sales, payable each calendar quarter.",
    "The initial term renews automatically for successive one year periods.",
    "Employees of either party shall not be solicited during the term.",
]


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


def three_splits(n: int = 6, start: int = 0) -> list[dict]:
    """`n` distinct rows, one document each, spread over train/validation/test (split column)."""
    return [
        record(i, CLAUSES[i % len(CLAUSES)] + f" Section {i}.", f"c{i}", split=SPLITS[i % 3])
        for i in range(start, start + n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict], encoding: str = "utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "labels": json.dumps(row["labels"])})
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


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A word-level tokenizer with a chat template: the stage runs in milliseconds, without
    the real base model (tests that need real token counts use `base_model_dir`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    )
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    tokenizer.save_pretrained(out)
    return out


NO_TOKEN = "\u0104"  # byte 0x04 in byte-level BPE's byte table: this vocabulary lacks it


@pytest.fixture(scope="module")
def byte_model_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (as the real base model's) whose longest token is 4
    characters ("abcd"), without a token for byte 0x04 (as the real one): the stage's
    character bound is 4 per token, not counting the character 0x04."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = [c for c in pre_tokenizers.ByteLevel.alphabet() if c != NO_TOKEN]
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    for token in ("ab", "cd", "abcd"):
        vocab[token] = len(vocab)
    merges = [("a", "b"), ("c", "d"), ("ab", "cd")]
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    )
    out = tmp_path_factory.mktemp("byte-tokenizer")
    tokenizer.save_pretrained(out)
    return out


def previous_outputs(tmp_path: Path) -> dict[Path, str]:
    """A complete previous output set (split files, quarantine, dropped, metrics)."""
    out = tmp_path / "out"
    out.mkdir()
    files = {out / f"{name}.jsonl": f"previous {name}\n" for name in [*SPLITS, "quarantine"]}
    files[out / "dropped.jsonl"] = "previous dropped\n"
    files[tmp_path / "out.json"] = '{"previous": true}\n'
    for path, text in files.items():
        path.write_text(text)
    return files


def assert_untouched(tmp_path: Path, files: dict[Path, str]) -> None:
    """The previous set is intact and no temporary file or folder is left behind."""
    for path, text in files.items():
        assert path.read_text() == text, f"{path} was overwritten"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in files if p.parent.name == "out"
    )
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left: {leftovers}"


# --------------------------------------------------------------------------- units


def test_normalise_text():
    assert normalise_text("  Governed\u00a0by\tthe\n\nlaws\u200b of  NY. ") == (
        "Governed by the laws of NY."
    )
    assert normalise_text("Cafe\u0301") == "Caf\u00e9"  # NFC composes the accent
    assert normalise_text(" \u200b\n ") == ""


def test_normalise_text_removes_nul():
    assert normalise_text("Gov\x00erned by\x00 law.\x00") == "Governed by law."
    assert normalise_text("\x00\x00") == ""


def test_dedup_key_ignores_case_punctuation_and_spacing():
    assert dedup_key("Governed by the Laws of New-York.") == dedup_key(
        "governed by the laws of new york"
    )
    assert dedup_key("Term: 90 days") != dedup_key("Term: 60 days")


def test_near_duplicates_found_and_verified():
    from temper.records.neardup import near_duplicate_pairs

    base = "This Agreement shall be governed by and construed in accordance with the laws of the State of"
    texts = [
        base + " Iowa without regard to conflicts of law principles.",
        base + " Texas without regard to conflicts of law principles.",
        "Licensee shall pay royalties of five percent of net sales each calendar quarter.",
    ]
    pairs = near_duplicate_pairs(texts, threshold=0.7)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1)]
    assert 0.7 <= pairs[0][2] < 1.0


def test_minhash_signatures_are_datasketchs():
    """The vectorised MinHash gives datasketch's signatures bit for bit (so its LSH buckets
    and the near-duplicate report are unchanged by the rewrite)."""
    from datasketch import MinHash

    from temper.records.neardup import shingle_hashes, shingles, signatures

    texts = [CLAUSES[0], CLAUSES[1] + " " + CLAUSES[2], "two words", "one"]
    hashes = [shingle_hashes(t) for t in texts]
    ours = signatures(hashes, num_perm=64)
    for text, sig in zip(texts, ours, strict=True):
        theirs = MinHash(num_perm=64)
        theirs.update_batch([s.encode() for s in shingles(text)])
        if theirs.scheme != "affine32":
            pytest.skip(f"datasketch {theirs.scheme} scheme: compared for affine32 only")
        assert sig.tolist() == theirs.hashvalues.tolist()


def test_near_duplicate_candidates_per_record_are_capped_and_counted():
    """3,000 variants of one boilerplate clause all collide in LSH: the search stays bounded
    (at most `max_candidates` verified per record) and counts the records it cut short."""
    from temper.records.neardup import find_near_duplicates

    base = (
        "The parties agree that this Agreement and every dispute arising out of it shall be "
        "governed by and construed in accordance with the laws of the State of Delaware, without "
        "regard to its conflict of laws rules, and that notices go to office"
    )
    texts = [f"{base} {i} of the Licensee." for i in range(3000)]
    start = time.perf_counter()
    result = find_near_duplicates(texts, threshold=0.8, num_perm=64, max_candidates=20)
    assert time.perf_counter() - start < 30
    assert result.capped > 2000  # every record after the first 20 or so
    assert result.checked <= 20 * len(texts)
    assert 0 < len(result.pairs) <= result.checked
    uncapped = find_near_duplicates(texts[:200], threshold=0.8, num_perm=64, max_candidates=1000)
    assert uncapped.capped == 0
    # LSH is probabilistic: a few of the 19,900 pairs share no band and are never candidates.
    assert len(uncapped.pairs) == uncapped.checked > 0.99 * 200 * 199 // 2


def test_near_duplicates_are_the_ones_datasketch_lsh_finds(root):
    """Below the cap the search finds exactly the pairs of the datasketch MinHashLSH query
    loop (with exact Jaccard on shingle sets) that it replaces, on real clauses."""
    from datasketch import MinHash, MinHashLSH

    from temper.records.neardup import find_near_duplicates, shingles

    rows = read_jsonl(root / "data/raw/contracts/train.jsonl")
    texts = [normalise_text(r["clause"]) for r in rows]
    texts = list({dedup_key(t): t for t in texts}.values())  # the stage removes exact dups first
    sets = [shingles(t) for t in texts]
    lsh = MinHashLSH(threshold=0.6, num_perm=64)
    expected = []
    for i, mh in enumerate(MinHash.bulk([[s.encode() for s in sh] for sh in sets], num_perm=64)):
        if sets[i]:
            for j in lsh.query(mh):
                jac = len(sets[i] & sets[j]) / len(sets[i] | sets[j])
                if jac >= 0.8:
                    expected.append((j, i, round(jac, 4)))
        lsh.insert(i, mh)
    found = find_near_duplicates(texts, threshold=0.8, num_perm=64)
    assert found.capped == 0 and len(expected) > 50
    assert found.pairs == sorted(expected)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 30), st.sampled_from([None, "train", "test"])),
        min_size=1,
        max_size=80,
    )
)
def test_no_group_ever_crosses_splits(rows):
    """Property: a source split column is kept as given, records without one are split by a
    hash of their group, and a group never ends up in two splits: where the source's own
    column would put it in two, the stage refuses with an error instead."""
    cfg = SplitConfig(validation=0.2, test=0.2)
    records = [
        {"id": str(i), "group": f"g{g}", **({"split": s} if s else {})}
        for i, (g, s) in enumerate(rows)
    ]
    expected = [r.get("split") or hash_split(r["group"], cfg) for r in records]
    by_group = defaultdict(set)
    for r, split in zip(records, expected, strict=True):
        by_group[r["group"]].add(split)
    if any(len(s) > 1 for s in by_group.values()):
        with pytest.raises(InputError, match="more than one split"):
            assign_splits(records, cfg)
        return
    assign_splits(records, cfg)
    assert [r["split"] for r in records] == expected  # source splits kept, the rest hashed
    assert all(len({r["split"] for r in records if r["group"] == g}) == 1 for g in by_group)
    assert {r["split"] for r in records} <= {"train", "validation", "test"}


def test_source_split_that_leaks_a_group_is_an_error():
    records = [
        {"id": "a", "group": "g", "split": "train"},
        {"id": "b", "group": "g", "split": "test"},
    ]
    with pytest.raises(InputError, match="more than one split"):
        assign_splits(records, SplitConfig())


def test_split_fractions_that_leave_nothing_for_train_are_rejected():
    with pytest.raises(ValidationError, match="validation \\+ test"):
        SplitConfig(validation=0.5, test=0.5)
    with pytest.raises(ValidationError, match="validation \\+ test"):
        SplitConfig(validation=0.3, test=0.9)
    SplitConfig(validation=0.45, test=0.45)


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


def test_max_examples_null_means_everything():
    cfg = PrepareConfig(sources=["x.jsonl"], max_examples=None)
    assert cfg.max_examples == {}


# --------------------------------------------------------------------------- reading


def test_utf8_bom_is_accepted_in_jsonl_and_csv_header(tmp_path, task, tiny_model_dir):
    rows = three_splits(6)
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows[:3]).encode())
    csv_path = write_csv(tmp_path / "bom.csv", rows[3:], encoding="utf-8-sig")
    assert csv_path.read_bytes().startswith(b"\xef\xbb\xbfid,")
    stats = run(config(tmp_path, [jsonl, csv_path], fields=SPLIT_FIELDS), task, tiny_model_dir)
    assert stats["read"] == 6 and stats["quarantined"]["total"] == 0
    ids = sorted(r["id"] for s in SPLITS for r in read_jsonl(tmp_path / "out" / f"{s}.jsonl"))
    assert ids == [f"r{i}" for i in range(6)]


def test_csv_field_over_the_csv_modules_default_limit_is_read(tmp_path, task, tiny_model_dir):
    rows = three_splits(6)
    rows[0]["clause"] = "word " * 40_000  # 200,000 characters: over csv's 131,072 default
    source = write_csv(tmp_path / "big.csv", rows)
    stats = run(config(tmp_path, [source], fields=SPLIT_FIELDS), task, tiny_model_dir)
    assert stats["read"] == 6
    dropped = read_jsonl(tmp_path / "out" / "dropped.jsonl")
    assert [(d["id"], d["reason"]) for d in dropped] == [("r0", "too_long")]


def test_csv_undecodable_row_is_quarantined_with_file_and_line(tmp_path, task, tiny_model_dir):
    source = write_csv(tmp_path / "raw.csv", three_splits(7))
    lines = source.read_bytes().split(b"\r\n")
    lines[3] = lines[3].replace(b"Licensee", b"Licens\xe9e")  # a Latin-1 byte in row r2
    source.write_bytes(b"\r\n".join(lines))
    cfg = config(tmp_path, [source], fields=SPLIT_FIELDS, on_error="quarantine")
    stats = run(cfg, task, tiny_model_dir)
    assert stats["read"] == 7 and stats["quarantined"]["total"] == 1
    quarantine = read_jsonl(tmp_path / "out" / "quarantine.jsonl")
    assert quarantine[0]["where"] == f"{source}:4"
    assert "undecodable bytes" in quarantine[0]["reason"]
    ids = {r["id"] for s in SPLITS for r in read_jsonl(tmp_path / "out" / f"{s}.jsonl")}
    assert ids == {f"r{i}" for i in range(7)} - {"r2"}
    with pytest.raises(InputError, match=r"raw.csv:4: undecodable bytes"):
        run(cfg.model_copy(update={"on_error": "fail"}), task, tiny_model_dir)


def test_csv_rows_are_numbered_by_their_first_line_and_checked_for_width(tmp_path):
    from temper.records.sources import iter_rows

    source = tmp_path / "raw.csv"
    source.write_text('id,clause\nr1,"two\nlines"\nr2,short\nr3,a,extra\n', encoding="utf-8")
    rows = list(iter_rows(source))
    assert [where for where, _ in rows] == [f"{source}:{n}" for n in (2, 4, 5)]
    assert rows[0][1] == {"id": "r1", "clause": "two\nlines"}
    assert isinstance(rows[2][1], InputError)
    assert "3 fields, the header has 2" in str(rows[2][1])


def write_csv_without(path: Path, rows: list[dict], *columns: str) -> Path:
    """A CSV export of `rows` whose header lacks `columns` (CUAD's `labels`, say)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        names = [c for c in rows[0] if c not in columns]
        writer = csv.DictWriter(handle, fieldnames=names, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_csv_without_the_labels_column_uses_the_single_label(
    tmp_path, task, tiny_model_dir, caplog
):
    categories = ["Governing Law", "Insurance", "Cap on Liability"]
    rows = [{**r, "category": categories[i % 3]} for i, r in enumerate(three_splits(6))]
    source = write_csv_without(tmp_path / "quoted.csv", rows, "labels")
    cfg = config(tmp_path, [source], fields=SPLIT_FIELDS)
    with caplog.at_level("WARNING", logger="temper.stages.prepare"):
        records = prepare.read_records(cfg, task, prepare.Ledger(cfg))
    assert [r["gold_all"] for r in records] == [
        {"clause_type": [categories[i % 3]]} for i in range(6)
    ]
    said = [r.getMessage() for r in caplog.records if "multi-label" in r.getMessage()]
    assert len(said) == 1 and "quoted.csv" in said[0] and "'labels' -> 'category'" in said[0]
    stats = run(cfg, task, tiny_model_dir)
    assert stats["fallbacks"] == {str(source): {"labels": "category"}}
    assert json.loads(Path(cfg.metrics).read_text())["fallbacks"] == stats["fallbacks"]
    prepared = [r for s in SPLITS for r in read_jsonl(tmp_path / "out" / f"{s}.jsonl")]
    assert len(prepared) == 6
    assert all(r["gold_all"] == {"clause_type": [r["gold"]["clause_type"]]} for r in prepared)
    # A source that has the column keeps using it; nothing is said about it.
    full_csv = write_csv(tmp_path / "full.csv", rows)
    full = run(config(tmp_path, [full_csv], fields=SPLIT_FIELDS), task, tiny_model_dir)
    assert full["fallbacks"] == {}


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        (("clause",), r"quoted.csv:2: missing field 'clause' \(prepare.fields.text\)"),
        (("id", "labels"), r"quoted.csv:2: missing field 'id' \(prepare.fields.id\)"),
        (("labels", "category"), r"quoted.csv:2: missing field 'category' \(prepare.fields.gold"),
    ],
)
def test_csv_without_a_required_column_is_still_refused(tmp_path, task, missing, message):
    source = write_csv_without(tmp_path / "quoted.csv", three_splits(3), *missing)
    with pytest.raises(InputError, match=message):
        run(config(tmp_path, [source], fields=SPLIT_FIELDS), task, "unused-model-dir")


def test_jsonl_row_missing_labels_after_a_first_row_with_them_is_refused(tmp_path, task):
    """The source's first row decides: a later row without the column is a bad row."""
    rows = three_splits(3)
    del rows[1]["labels"]
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    with pytest.raises(InputError, match=r"raw.jsonl:2: missing field 'labels'"):
        run(config(tmp_path, [raw], fields=SPLIT_FIELDS), task, "unused-model-dir")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_missing_source_file_says_why(tmp_path, task, suffix):
    missing = tmp_path / f"missing{suffix}"
    with pytest.raises(InputError, match=rf"missing\{suffix}: file not found \(prepare.sources\)"):
        run(config(tmp_path, [missing]), task, "unused-model-dir")


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
        allow_empty_splits=True,
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
    cfg = config(
        tmp_path,
        [write_jsonl(tmp_path / "raw.jsonl", rows + three_splits(3, start=3))],
        fields=SPLIT_FIELDS,
    )
    run(cfg, task, base_model_dir)
    assert "r1" not in {r["id"] for r in read_jsonl(tmp_path / "out" / "train.jsonl")}
    assert "r2" in {r["id"] for r in read_jsonl(tmp_path / "out" / "test.jsonl")}
    dropped = read_jsonl(tmp_path / "out" / "dropped.jsonl")
    assert [(d["id"], d["reason"], d["duplicate_of"]) for d in dropped] == [
        ("r1", "duplicate", "r2")
    ]


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
    csv_path = write_csv(tmp_path / "raw.csv", rows[:1])
    pq.write_table(pa.Table.from_pylist([rows[1]]), tmp_path / "raw.parquet")
    cfg = config(
        tmp_path,
        [csv_path, tmp_path / "raw.parquet"],
        split=SplitConfig(validation=0.0, test=0.0),
        allow_empty_splits=True,
    )
    run(cfg, task, base_model_dir)
    train = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "train.jsonl")}
    assert train["r1"]["gold"]["key_term"] == "12 months"
    assert train["r1"]["gold_all"]["clause_type"] == ["Warranty Duration"]
    assert train["r2"]["gold"]["clause_type"] == "Anti-Assignment"


def test_every_read_record_is_accounted_for(tmp_path, task, tiny_model_dir):
    rows = three_splits(9)
    rows[1]["clause"] = " \u200b "  # empty after normalising
    rows[4]["clause"] = rows[7]["clause"].upper()  # exact duplicate
    rows[5]["clause"] = "word " * 600  # too long
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode() + b"{not json\n")
    cfg = config(tmp_path, [raw], fields=SPLIT_FIELDS, on_error="quarantine")
    stats = run(cfg, task, tiny_model_dir)
    kept = sum(s["records"] for s in stats["splits"].values())
    assert stats["read"] == 10
    assert stats["dropped"] == {"empty": 1, "duplicate": 1, "too_long": 1}
    assert stats["read"] == kept + sum(stats["dropped"].values()) + stats["quarantined"]["total"]


def test_huge_text_is_dropped_by_its_length_without_being_tokenized(
    tmp_path, task, byte_model_dir, monkeypatch
):
    from temper.records.tokens import TokenCounter

    seen: list[int] = []
    lengths = TokenCounter.lengths

    def spy(self, texts):
        seen.extend(len(t) for t in texts)
        return lengths(self, texts)

    monkeypatch.setattr(TokenCounter, "lengths", spy)
    rows = three_splits(6)
    rows[0]["clause"] = "Confidential " + "x" * 2_000_000  # a 2 MB clause
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    stats = run(config(tmp_path, [raw], fields=SPLIT_FIELDS), task, byte_model_dir)
    assert seen and max(seen) < 1000, "the 2 MB text reached the tokenizer"
    assert stats["dropped"] == {"too_long": 1} and stats["read"] == 6
    [dropped] = read_jsonl(tmp_path / "out" / "dropped.jsonl")
    assert dropped == {
        "id": "r0",
        "where": f"{raw}:1",
        "reason": "too_long",
        "n_chars": 2_000_013,
        "max_chars": 512 * 4,  # max_tokens x the longest token
    }


def test_length_filter_keeps_the_token_counts_decisions_at_the_border(task, byte_model_dir):
    """Texts around `max_tokens x 4` characters, of 4-character tokens, of 1-character ones,
    and padded with a character the tokenizer has no token for (it drops it: 2 MB of it is
    still a short text): the same records kept and the same reasons as counting every one."""
    from transformers import AutoTokenizer

    from temper.records.tokens import TokenCounter

    counter = TokenCounter(AutoTokenizer.from_pretrained(byte_model_dir), task)
    assert counter.bound is not None and counter.bound.per_token == 4
    [answer] = counter.lengths([task.format_answer({})])
    cfg = PrepareConfig(sources=["f"], min_text_tokens=3, max_tokens=counter.overhead + answer + 16)
    limit = 4 * cfg.max_tokens
    texts = []
    for n in (8, 24, limit - 4, limit - 1, limit, limit + 1, limit + 4, 3 * limit):
        texts += ["abcd" * (n // 4) + "a" * (n % 4), "z" * n, "ab cd " * (n // 6)]
    texts += ["abcd" + "\x04" * 2_000_000, "abcd" * 3 + "\x04" * limit]
    records = [
        {"id": f"r{i}", "where": f"f:{i}", "source": 0, "text": t, "gold": {}}
        for i, t in enumerate(texts)
    ]
    over = [f"r{i}" for i, t in enumerate(texts) if counter.surely_over(t, cfg.max_tokens)]
    assert over == [f"r{i}" for i, t in enumerate(texts[:-2]) if len(t) > limit]
    assert len(over) >= 6

    def decisions(bound):
        counter.bound = bound
        ledger = prepare.Ledger(cfg)
        kept = prepare.length_filter([dict(r) for r in records], counter, cfg, ledger)
        return [r["id"] for r in kept], {d["id"]: d["reason"] for d in ledger.dropped}

    kept, dropped = decisions(counter.bound)
    assert (kept, dropped) == decisions(None)
    untokenized = [f"r{len(texts) - 2}", f"r{len(texts) - 1}"]
    assert dropped[untokenized[0]] == "too_short" and untokenized[1] in kept
    assert {"r1", "r3"} <= set(kept) and all(dropped[r] == "too_long" for r in over)


def test_no_character_bound_where_a_token_may_stand_for_a_whole_word(tiny_model_dir):
    """A word-level tokenizer's unknown token is one token for a word of any length: no
    number of characters makes a text surely too long, so every text is tokenized."""
    from transformers import AutoTokenizer

    from temper.records.tokens import char_bound

    assert char_bound(AutoTokenizer.from_pretrained(tiny_model_dir)) is None


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
        (
            b'{"id": "r2", "clause": "x", "contract_id": "c", "category": "Insurance", '
            b'"labels": ["Insurance", "Nope"], "answer": null}\n',
            r"raw.jsonl:2: field 'labels': 'Nope' is not a label of clause_review.clause_type",
        ),
        (
            b'{"id": "r1", "clause": "Another clause.", "contract_id": "c", '
            b'"category": "Insurance", "labels": [], "answer": null}\n',
            r"raw.jsonl:2: duplicate id 'r1' \(first at .*raw.jsonl:1\) \(prepare.fields.id\)",
        ),
    ],
)
def test_bad_input_names_file_line_and_field(tmp_path, task, line, message):
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(
        json.dumps(record(1, "A good clause of several words.")).encode() + b"\n" + line
    )
    files = previous_outputs(tmp_path)
    with pytest.raises(InputError, match=message):
        run(config(tmp_path, [raw]), task, "unused-model-dir")
    assert_untouched(tmp_path, files)


@pytest.mark.parametrize("fail_at", ["dropped.jsonl", "metrics"])
def test_outputs_are_replaced_as_one_set_or_not_at_all(
    tmp_path, task, tiny_model_dir, monkeypatch, fail_at
):
    """A failure after the split files are written (at dropped.jsonl or at the metrics
    file) leaves the whole previous set in place: nothing half-written, no temp files."""
    files = previous_outputs(tmp_path)
    cfg = config(
        tmp_path, [write_jsonl(tmp_path / "raw.jsonl", three_splits(6))], fields=SPLIT_FIELDS
    )
    written: list[str] = []
    real_jsonl, real_json = prepare.write_jsonl, prepare.write_json

    def jsonl(path, rows):
        if Path(path).name == fail_at:
            raise OSError(f"injected failure writing {path}")
        written.append(Path(path).name)
        return real_jsonl(path, rows)

    def metrics(path, data):
        if fail_at == "metrics":
            raise OSError(f"injected failure writing {path}")
        return real_json(path, data)

    monkeypatch.setattr(prepare, "write_jsonl", jsonl)
    monkeypatch.setattr(prepare, "write_json", metrics)
    with pytest.raises(OSError, match="injected failure"):
        run(cfg, task, tiny_model_dir)
    assert {"train.jsonl", "validation.jsonl", "test.jsonl"} <= set(written)
    assert_untouched(tmp_path, files)
    # And a run that succeeds replaces the whole set.
    monkeypatch.undo()
    run(cfg, task, tiny_model_dir)
    assert json.loads((tmp_path / "out.json").read_text())["read"] == 6
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) == 2


def test_metrics_file_inside_out_dir(tmp_path, task, tiny_model_dir):
    cfg = config(
        tmp_path, [write_jsonl(tmp_path / "raw.jsonl", three_splits(6))], fields=SPLIT_FIELDS
    )
    cfg = cfg.model_copy(update={"metrics": str(tmp_path / "out" / "prepare.json")})
    run(cfg, task, tiny_model_dir)
    run(cfg, task, tiny_model_dir)
    assert json.loads((tmp_path / "out" / "prepare.json").read_text())["read"] == 6


def test_duplicate_id_is_quarantined_keeping_the_first(tmp_path, task, tiny_model_dir):
    rows = three_splits(6)
    twin = {**rows[0], "clause": "A different clause with the same id."}
    raw = write_jsonl(tmp_path / "raw.jsonl", rows[:3] + [twin] + rows[3:])
    cfg = config(tmp_path, [raw], fields=SPLIT_FIELDS, on_error="quarantine")
    stats = run(cfg, task, tiny_model_dir)
    assert stats["quarantined"]["total"] == 1
    [entry] = read_jsonl(tmp_path / "out" / "quarantine.jsonl")
    assert entry["where"] == f"{raw}:4"
    assert f"duplicate id 'r0' (first at {raw}:1)" in entry["reason"]
    train = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "train.jsonl")}
    assert train["r0"]["text"] == rows[0]["clause"]


def test_empty_source_is_an_error_naming_it(tmp_path, task, tiny_model_dir):
    good = write_jsonl(tmp_path / "good.jsonl", three_splits(6))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputError, match=r"empty.jsonl: no records \(0 read\)"):
        run(config(tmp_path, [good, empty], fields=SPLIT_FIELDS), task, tiny_model_dir)
    with pytest.raises(InputError, match=r"empty.jsonl: no records"):
        run(config(tmp_path, [empty]), task, tiny_model_dir)


def test_source_whose_records_are_all_dropped_is_an_error(tmp_path, task, tiny_model_dir):
    good = write_jsonl(tmp_path / "good.jsonl", three_splits(6))
    blank = write_jsonl(
        tmp_path / "blank.jsonl", [record(i, " \u200b ", f"b{i}", split="train") for i in (7, 8)]
    )
    with pytest.raises(InputError, match=r"blank.jsonl: no records left \(2 read: dropped 2 empty"):
        run(config(tmp_path, [good, blank], fields=SPLIT_FIELDS), task, tiny_model_dir)
    with pytest.raises(InputError, match=r"blank.jsonl: no records left"):
        run(config(tmp_path, [blank], fields=SPLIT_FIELDS), task, tiny_model_dir)


def test_all_records_too_long_is_an_error_not_a_traceback(tmp_path, task, tiny_model_dir):
    rows = three_splits(3)
    for row in rows:
        row["clause"] += " word" * 600
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    with pytest.raises(
        InputError, match=r"raw.jsonl: no records left \(3 read: dropped 3 too_long"
    ):
        run(config(tmp_path, [raw], fields=SPLIT_FIELDS), task, tiny_model_dir)


def test_source_split_column_without_validation_rows_is_an_error(tmp_path, task, tiny_model_dir):
    rows = [r for r in three_splits(9) if r["split"] != "validation"]
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    cfg = config(tmp_path, [raw], fields=SPLIT_FIELDS)
    with pytest.raises(InputError, match=r"empty split.*validation 0.*prepare.fields.split"):
        run(cfg, task, tiny_model_dir)
    # Said so on purpose, it is allowed.
    stats = run(cfg.model_copy(update={"allow_empty_splits": True}), task, tiny_model_dir)
    assert stats["splits"]["validation"]["records"] == 0


def test_hash_split_that_leaves_a_split_empty_is_an_error(tmp_path, task, tiny_model_dir):
    rows = [record(i, CLAUSES[i], "one-contract") for i in range(4)]
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    with pytest.raises(InputError, match=r"empty split.*train \d.*validation \d.*test \d"):
        run(config(tmp_path, [raw]), task, tiny_model_dir)


def test_evaluation_split_emptied_by_the_length_filter_is_an_error(tmp_path, task, tiny_model_dir):
    rows = three_splits(6)
    for row in rows:
        if row["split"] == "test":
            row["clause"] += " word" * 600
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    with pytest.raises(InputError, match=r"empty split.*test 0 \(of 2 before filtering"):
        run(config(tmp_path, [raw], fields=SPLIT_FIELDS), task, tiny_model_dir)


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
    cfg = config(
        tmp_path,
        [raw],
        on_error="quarantine",
        split=SplitConfig(validation=0, test=0),
        allow_empty_splits=True,
    )
    stats = run(cfg, task, base_model_dir)
    assert stats["quarantined"]["total"] == 2
    quarantine = read_jsonl(tmp_path / "out" / "quarantine.jsonl")
    assert [q["where"] for q in quarantine] == [f"{raw}:4", f"{raw}:5"]
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) == 3


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_chat_token_count_is_exact_on_the_real_data(base_model_dir, task, root):
    """prepare counts a record's chat tokens as template overhead + text + answer (one
    template render for the whole run): equal to rendering each record, on every CUAD clause."""
    from transformers import AutoTokenizer

    from temper.records.sources import extract, iter_rows
    from temper.records.tokens import TokenCounter

    fields = FieldMap(
        id="id",
        text="clause",
        group="contract_id",
        gold={"clause_type": "category", "key_term": "answer"},
    )
    records = []
    for split in SPLITS:
        for where, row in iter_rows(root / "data/raw/contracts" / f"{split}.jsonl"):
            rec = extract(row, where, fields, task)
            rec["text"] = normalise_text(rec["text"])
            records.append(rec)
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    counter = TokenCounter(tokenizer, task)
    n_chat, n_text = counter.count(records)
    rendered = [
        tokenizer.apply_chat_template(
            task.messages(r["text"])
            + [{"role": "assistant", "content": task.format_answer(r["gold"])}],
            tokenize=False,
        )
        for r in records
    ]
    exact = [len(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    assert len(records) == 6654
    assert n_chat == exact
    assert n_text == [
        len(ids)
        for ids in tokenizer([r["text"] for r in records], add_special_tokens=False)["input_ids"]
    ]


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


# --------------------------------------------------------------------------- text templates


def test_text_template_renders_several_columns_and_fills_nulls(tmp_path, task, tiny_model_dir):
    rows = [
        {**r, "hypothesis": f"Claim {i}.", "clause": None if i == 0 else r["clause"]}
        for i, r in enumerate(three_splits(6))
    ]
    fields = SPLIT_FIELDS.model_copy(
        update={"text": "Claim: {hypothesis} | Clause: {clause}", "fill": {"clause": "(none)"}}
    )
    cfg = config(tmp_path, [write_jsonl(tmp_path / "raw.jsonl", rows)], fields=fields)
    run(cfg, task, tiny_model_dir)
    texts = {
        r["id"]: r["text"] for s in SPLITS for r in read_jsonl(tmp_path / "out" / f"{s}.jsonl")
    }
    assert texts["r0"] == "Claim: Claim 0. | Clause: (none)"
    assert texts["r1"] == f"Claim: Claim 1. | Clause: {rows[1]['clause']}"


def test_text_template_column_without_fill_names_file_line_and_field(tmp_path, task):
    rows = [record(1, "A good clause of several words.", hypothesis=None)]
    fields = FIELDS.model_copy(update={"text": "{hypothesis}: {clause}"})
    cfg = config(tmp_path, [write_jsonl(tmp_path / "raw.jsonl", rows)], fields=fields)
    with pytest.raises(InputError, match=r"raw.jsonl:1: field 'hypothesis' is null .*fill"):
        run(cfg, task, "unused-model-dir")


def test_text_template_with_unpaired_brace_is_a_config_error():
    with pytest.raises(ValidationError, match="not a valid text template"):
        FieldMap(text="Clause: {clause")


def test_source_outside_source_dir_is_an_error_dvc_would_miss(tmp_path, task):
    from temper.config import ConfigError

    (tmp_path / "watched").mkdir()
    raw = write_jsonl(tmp_path / "raw.jsonl", three_splits(3))
    cfg = config(tmp_path, [raw], source_dir=str(tmp_path / "watched"))
    with pytest.raises(ConfigError, match="outside prepare.source_dir"):
        run(cfg, task, "unused-model-dir")
