"""The semantic cache: an exact layer and a similarity layer over one sqlite table.

- Exact: the SHA-256 of the normalised text (`embedder.normalise`) under a version key.
- Similar: the stored entry of the same version with the highest cosine, if it reaches the
  threshold (and, with `match_numbers`, the same numbers in both texts). Inputs longer than the embedder reads (`max_tokens`) are never matched on
  similarity, as a query or as a stored entry: their embedding saw only the start.
- The version key (`version_key`: model version, task version, prompt hash) is part of every
  lookup, so a promotion or a prompt change never serves an old model's answer.
- Bounded: past `max_entries` the least recently used entries (all versions) are deleted.
- Persistent: sqlite in WAL mode; the similarity index is rebuilt from it on open. Safe
  for threads (one lock around the table and the index; embedding runs outside it).
  Several processes may share the file for the exact layer; each one's similarity index
  sees only the entries of its own process and of the file when it opened.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ...io import open_sqlite
from .config import CacheConfig
from .embedder import Embedder, SentenceEmbedder, numbers_key, text_key

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    version TEXT NOT NULL,
    key TEXT NOT NULL,
    answer TEXT NOT NULL,
    embedding BLOB,
    n_tokens INTEGER,
    numbers INTEGER,
    created REAL NOT NULL,
    used INTEGER NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (version, key)
);
CREATE INDEX IF NOT EXISTS entries_used ON entries (used);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def version_key(model_version: str, task_version: int | str, prompt_hash: str) -> str:
    """The key a cached answer belongs to: what answered it and under which prompt."""
    return f"{model_version}|task-v{task_version}|{prompt_hash}"


@dataclass(frozen=True)
class Hit:
    """A cached answer: how it matched (`exact` or `similar`) and the cosine (1.0 if exact)."""

    kind: Literal["exact", "similar"]
    similarity: float
    answer: Any
    key: str  # the matched entry's text hash


class _Index:
    """One version's embeddings (and numbers keys) in growing arrays; free slots reused."""

    def __init__(self, dim: int) -> None:
        self.vectors = np.zeros((16, dim), dtype=np.float32)
        self.numbers = np.zeros(16, dtype=np.int64)
        self.alive = np.zeros(16, dtype=bool)
        self.keys: list[str | None] = [None] * 16
        self.slot: dict[str, int] = {}
        self.free: list[int] = []
        self.top = 0

    def add(self, key: str, vector: np.ndarray, numbers: int) -> None:
        if key in self.slot:
            self.vectors[self.slot[key]], self.numbers[self.slot[key]] = vector, numbers
            return
        if self.free:
            i = self.free.pop()
        else:
            if self.top == len(self.keys):
                grow = len(self.keys)
                self.vectors = np.concatenate([self.vectors, np.zeros_like(self.vectors)])
                self.numbers = np.concatenate([self.numbers, np.zeros_like(self.numbers)])
                self.alive = np.concatenate([self.alive, np.zeros(grow, dtype=bool)])
                self.keys += [None] * grow
            i, self.top = self.top, self.top + 1
        self.vectors[i], self.numbers[i], self.alive[i] = vector, numbers, True
        self.keys[i], self.slot[key] = key, i

    def remove(self, key: str) -> None:
        i = self.slot.pop(key, None)
        if i is not None:
            self.alive[i], self.keys[i] = False, None
            self.free.append(i)

    def best(self, vector: np.ndarray, numbers: int | None) -> tuple[str, float] | None:
        """The closest live entry (with the same numbers key unless `numbers` is None)."""
        if not self.slot:
            return None
        sims = self.vectors[: self.top] @ vector
        live = self.alive[: self.top]
        if numbers is not None:
            live = live & (self.numbers[: self.top] == numbers)
        if not live.any():
            return None
        sims[~live] = -np.inf
        i = int(np.argmax(sims))
        return self.keys[i], float(sims[i])  # type: ignore[return-value]


class SemanticCache:
    """`get(text, version) -> Hit | None`, `put(text, version, answer)`; see the module doc."""

    def __init__(
        self,
        path: str | Path,
        embedder: Embedder | None = None,
        threshold: float = 0.95,
        max_entries: int = 10_000,
        max_tokens: int | None = None,
        match_numbers: bool = True,
    ) -> None:
        self.embedder = embedder  # None: the exact layer only
        self.threshold = threshold
        self.max_entries = max_entries
        self.max_tokens = max_tokens or (embedder.max_tokens if embedder else 0)
        self.match_numbers = match_numbers
        self.stats = {"exact": 0, "similar": 0, "miss": 0, "long": 0, "evicted": 0}
        self._lock = threading.RLock()
        self._recent: OrderedDict[str, tuple[np.ndarray, int]] = OrderedDict()
        self._db = open_sqlite(path)
        self._db.executescript(SCHEMA)
        self._check_embedder()
        self._indexes: dict[str, _Index] = {}
        self._load_index()
        row = self._db.execute("SELECT COUNT(*), COALESCE(MAX(used), 0) FROM entries").fetchone()
        self._count, self._clock = int(row[0]), int(row[1])

    @classmethod
    def from_config(cls, cfg: CacheConfig, embedder: Embedder | None = None) -> SemanticCache:
        """The cache `cfg` describes (the real embedder loaded unless given or not needed)."""
        if embedder is None and cfg.similarity:
            embedder = SentenceEmbedder(cfg.embedder, cfg.threads)
        return cls(
            cfg.path,
            embedder if cfg.similarity else None,
            cfg.threshold,
            cfg.max_entries,
            cfg.max_tokens,
            cfg.match_numbers,
        )

    # ------------------------------------------------------------------ public

    def get(self, text: str, version: str) -> Hit | None:
        """The cached answer for `text` under `version`, or None (a miss)."""
        key = text_key(text)
        with self._lock:
            row = self._db.execute(
                "SELECT answer FROM entries WHERE version = ? AND key = ?", (version, key)
            ).fetchone()
            if row is not None:
                self._touch(version, key)
                self.stats["exact"] += 1
                return Hit("exact", 1.0, json.loads(row[0]), key)
        if self.embedder is None:
            return self._miss()
        vector, n_tokens = self._embedding(key, text)  # outside the lock: the slow part
        if n_tokens > self.max_tokens:
            self.stats["long"] += 1
            return self._miss()
        with self._lock:
            index = self._indexes.get(version)
            numbers = numbers_key(text) if self.match_numbers else None
            found = index.best(vector, numbers) if index is not None else None
            if found is None or found[1] < self.threshold:
                return self._miss()
            row = self._db.execute(
                "SELECT answer FROM entries WHERE version = ? AND key = ?", (version, found[0])
            ).fetchone()
            if row is None:  # evicted by another process's writes: not ours to serve
                return self._miss()
            self._touch(version, found[0])
            self.stats["similar"] += 1
            return Hit("similar", found[1], json.loads(row[0]), found[0])

    def put(self, text: str, version: str, answer: Any) -> None:
        """Store the answer the system gave for `text` under `version` (JSON-serialisable)."""
        key = text_key(text)
        vector, n_tokens = (None, None)
        if self.embedder is not None:
            vector, n_tokens = self._embedding(key, text)
        similar = vector is not None and n_tokens is not None and n_tokens <= self.max_tokens
        blob = vector.astype(np.float32).tobytes() if similar else None  # type: ignore[union-attr]
        numbers = numbers_key(text)
        with self._lock:
            self._clock += 1
            self._db.execute(
                "INSERT INTO entries (version, key, answer, embedding, n_tokens, numbers, "
                "created, used) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (version, key) DO "
                "UPDATE SET answer = excluded.answer, embedding = excluded.embedding, "
                "n_tokens = excluded.n_tokens, numbers = excluded.numbers, used = excluded.used",
                (
                    version,
                    key,
                    json.dumps(answer),
                    blob,
                    n_tokens,
                    numbers,
                    time.time(),
                    self._clock,
                ),
            )
            if similar:
                self._index(version, len(vector)).add(key, vector, numbers)  # type: ignore[arg-type]
            elif version in self._indexes:  # now too long to match (another max_tokens)
                self._indexes[version].remove(key)
            self._count = self._evict()

    def clear(self, version: str | None = None) -> None:
        """Forget every entry (or those of one version)."""
        with self._lock:
            if version is None:
                self._db.execute("DELETE FROM entries")
                self._indexes.clear()
            else:
                self._db.execute("DELETE FROM entries WHERE version = ?", (version,))
                self._indexes.pop(version, None)
            self._count = self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def __len__(self) -> int:
        with self._lock:
            return self._count

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ inside

    def _miss(self) -> None:
        self.stats["miss"] += 1
        return None

    def _touch(self, version: str, key: str) -> None:
        self._clock += 1
        self._db.execute(
            "UPDATE entries SET used = ?, hits = hits + 1 WHERE version = ? AND key = ?",
            (self._clock, version, key),
        )

    def _embedding(self, key: str, text: str) -> tuple[np.ndarray, int]:
        """Embedding and word pieces of a text; the last few are kept, so the `put` after a
        missed `get` does not embed the same text twice."""
        with self._lock:
            if key in self._recent:
                self._recent.move_to_end(key)
                return self._recent[key]
        assert self.embedder is not None
        vector = self.embedder.embed([text])[0]
        n_tokens = self.embedder.count_tokens([text])[0]
        with self._lock:
            self._recent[key] = (vector, n_tokens)
            while len(self._recent) > 256:
                self._recent.popitem(last=False)
        return vector, n_tokens

    def _index(self, version: str, dim: int) -> _Index:
        if version not in self._indexes:
            self._indexes[version] = _Index(dim)
        return self._indexes[version]

    def _evict(self) -> int:
        """Delete the least recently used entries past `max_entries`; the new count."""
        count = self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        extra = count - self.max_entries
        if extra > 0:
            old = self._db.execute(
                "SELECT version, key FROM entries ORDER BY used LIMIT ?", (extra,)
            ).fetchall()
            self._db.executemany("DELETE FROM entries WHERE version = ? AND key = ?", old)
            for version, key in old:
                if version in self._indexes:
                    self._indexes[version].remove(key)
            self.stats["evicted"] += len(old)
            count -= len(old)
        return count

    def _check_embedder(self) -> None:
        """Embeddings of another model are not comparable: drop them (exact entries stay)."""
        name = self.embedder.name if self.embedder is not None else None
        row = self._db.execute("SELECT value FROM meta WHERE name = 'embedder'").fetchone()
        if name is None or (row is not None and row[0] == name):
            return
        if row is not None:
            self._db.execute("UPDATE entries SET embedding = NULL")
        self._db.execute(
            "INSERT INTO meta (name, value) VALUES ('embedder', ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (name,),
        )

    def _load_index(self) -> None:
        if self.embedder is None:
            return
        rows = self._db.execute(
            "SELECT version, key, embedding, numbers FROM entries "
            "WHERE embedding IS NOT NULL AND n_tokens <= ?",
            (self.max_tokens,),
        )
        for version, key, blob, numbers in rows:
            vector = np.frombuffer(blob, dtype=np.float32)
            self._index(version, len(vector)).add(key, vector, numbers)
