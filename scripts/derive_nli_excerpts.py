"""Derive `data/raw/contract_nli/excerpts.jsonl` from the shipped ContractNLI files.

ContractNLI labels (NDA, hypothesis) pairs at document level and marks the evidence spans of
Entailment and Contradiction; a NotMentioned pair has no evidence. To make an excerpt-level
task in which all three answers are possible, every record gets an excerpt made of spans of
its own NDA (ContractNLI's sentence / list-item segmentation):

- Entailment / Contradiction: the evidence spans, in document order (ContractNLI's `premise`);
- NotMentioned: as many spans as the evidence of a record of the same hypothesis in another
  NDA (so excerpt sizes match across labels), drawn from this NDA. The whole NDA does not
  mention the hypothesis (that is what the label says), so no excerpt of it does.

Everything is seeded by the record id (sha256), so the file is reproducible byte for byte:
    python scripts/derive_nli_excerpts.py
Reads data/raw/contracts/nli.jsonl and nli_documents.jsonl (CC BY 4.0, see that folder).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "data" / "raw" / "contracts"
OUT = ROOT / "data" / "raw" / "contract_nli" / "excerpts.jsonl"
KEEP = ("id", "contract_id", "split_group", "split", "hypothesis_id", "hypothesis", "label")


def normalise(text: str) -> str:
    """As the data README's procedure: NFC, no zero-width spaces, one space per whitespace
    run, stripped (so Entailment/Contradiction excerpts equal ContractNLI's `premise`)."""
    text = unicodedata.normalize("NFC", text).replace("\u00a0", " ")
    return re.sub(r"\s+", " ", re.sub("[\u200b\u200c\u200d\u2060\ufeff]", "", text)).strip()


def seeded(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16)


def main() -> None:
    documents = {}
    with open(SOURCE / "nli_documents.jsonl", encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)
            documents[doc["contract_id"]] = [normalise(doc["text"][a:b]) for a, b in doc["spans"]]
    with open(SOURCE / "nli.jsonl", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    sizes = defaultdict(list)  # hypothesis -> evidence sizes (number of spans) seen
    for rec in records:
        if rec["evidence_span_ids"]:
            sizes[rec["hypothesis_id"]].append(len(rec["evidence_span_ids"]))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for rec in records:
            spans = documents[rec["contract_id"]]
            ids = sorted(rec["evidence_span_ids"])
            if not ids:  # NotMentioned: same-size draw of this NDA's non-empty spans
                pool = [i for i, s in enumerate(spans) if len(s.split()) >= 4]
                options = sizes[rec["hypothesis_id"]] or [1]
                k = min(options[seeded(rec["id"] + "|k") % len(options)], len(pool))
                ranked = sorted(pool, key=lambda i: seeded(f"{rec['id']}|{i}"))
                ids = sorted(ranked[:k])
            row = {key: rec[key] for key in KEEP}
            row["excerpt"] = " ".join(spans[i] for i in ids)
            row["excerpt_span_ids"] = ids
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(OUT)
    print(f"{OUT.relative_to(ROOT)}: {len(records)} records")


if __name__ == "__main__":
    main()
