"""A classical yardstick: TF-IDF (1-2 grams) + logistic regression for the clause type.

A fine-tuned LLM has to earn its place against this. Trains on the whole raw training split
and scores the raw test split and the pipeline's prepared test sample.

    python scripts/tfidf_baseline.py
"""

from __future__ import annotations

import json
from pathlib import Path

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline


def load(path: Path, text: str, label: str) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [r[text] for r in rows], [
        r[label] if label != "gold" else r["gold"]["clause_type"] for r in rows
    ]


def main() -> None:
    raw = Path("data/raw/contracts")
    x_train, y_train = load(raw / "train.jsonl", "clause", "category")
    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2),
        LogisticRegression(max_iter=2000, C=10.0),
    )
    model.fit(x_train, y_train)
    x_test, y_test = load(raw / "test.jsonl", "clause", "category")
    acc = sum(p == y for p, y in zip(model.predict(x_test), y_test, strict=True)) / len(y_test)
    print(f"raw test split: {len(y_test)} clauses, accuracy {acc:.3f}")
    prepared = Path("data/prepared/test.jsonl")
    if prepared.exists():
        x_p, y_p = load(prepared, "text", "gold")
        acc_p = sum(p == y for p, y in zip(model.predict(x_p), y_p, strict=True)) / len(y_p)
        print(f"prepared test sample: {len(y_p)} clauses, accuracy {acc_p:.3f}")
        acc = acc_p
    print(f"RESULT tfidf_clause_type_accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
