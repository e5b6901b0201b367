"""The monitor's store: one sqlite file (WAL) with the request log and what was learnt about it.

Tables: `requests` (one row per served chat request), `verdicts` (the judge's, per request),
`reviews` (a human's, per request), `probes` (each probe answer of each API tier per run).
sqlite because it needs no server, survives restarts and `kill -9` (WAL, a commit per batch),
and lets `temper monitor ...` read while `temper serve` writes (busy timeout). Embeddings are
float32 blobs; a row keeps its input text only when `monitor.log_inputs` is on, or when it was
sampled for the judge or for review (they must read it), and then redacted.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...io import open_sqlite, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    model TEXT, version TEXT, tier TEXT, cache TEXT,
    status INTEGER, latency_ms REAL, prompt_tokens INTEGER, completion_tokens INTEGER,
    cost_usd REAL,
    answer TEXT, labels TEXT, confidence REAL,
    input_hash TEXT, input_text TEXT, embedding BLOB
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
CREATE TABLE IF NOT EXISTS verdicts (
    request_id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    verdict TEXT NOT NULL,
    judge TEXT, usd REAL, cached INTEGER, reason TEXT
);
CREATE TABLE IF NOT EXISTS reviews (
    request_id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    verdict TEXT NOT NULL,
    corrected TEXT, reviewer TEXT, source TEXT
);
CREATE TABLE IF NOT EXISTS probes (
    run TEXT NOT NULL, tier TEXT NOT NULL, probe_id TEXT NOT NULL,
    ts REAL NOT NULL, answer TEXT, error TEXT,
    PRIMARY KEY (run, tier, probe_id)
);
"""
COLUMNS = (
    "id",
    "ts",
    "model",
    "version",
    "tier",
    "cache",
    "status",
    "latency_ms",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "answer",
    "labels",
    "confidence",
    "input_hash",
    "input_text",
    "embedding",
)
VERDICTS = ("correct", "incorrect", "unsure")


def sampled(request_id: str, salt: str, share: float) -> bool:
    """Whether a request falls in a `share` sample: a hash, so every process agrees."""
    if share <= 0:
        return False
    digest = hashlib.sha256(f"{salt}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


@dataclass
class LoggedRequest:
    """One row of `requests`."""

    id: str
    ts: float
    model: str | None = None
    version: str | None = None
    tier: str | None = None
    cache: str | None = None
    status: int | None = None
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    answer: str | None = None
    labels: dict[str, Any] = field(default_factory=dict)
    confidence: float | None = None
    input_hash: str | None = None
    input_text: str | None = None
    embedding: np.ndarray | None = None

    def values(self) -> tuple[Any, ...]:
        blob = None if self.embedding is None else np.asarray(self.embedding, "<f4").tobytes()
        row = {**vars(self), "labels": json.dumps(self.labels, ensure_ascii=False)}
        row["embedding"] = blob
        return tuple(row[c] for c in COLUMNS)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> LoggedRequest:
        data = dict(row)
        data["labels"] = json.loads(data["labels"] or "{}")
        blob = data.pop("embedding")
        out = cls(**data)
        out.embedding = None if blob is None else np.frombuffer(blob, "<f4")
        return out


class MonitorStore:
    """The sqlite file; each method is one short transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.db = open_sqlite(self.path, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> MonitorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def add_requests(self, rows: Sequence[LoggedRequest]) -> None:
        marks = ", ".join("?" * len(COLUMNS))
        with transaction(self.db):
            self.db.executemany(
                f"INSERT OR REPLACE INTO requests ({', '.join(COLUMNS)}) VALUES ({marks})",
                [r.values() for r in rows],
            )

    def prune(self, retention_s: float, max_rows: int, now: float | None = None) -> int:
        """Delete rows older than the retention, then the oldest beyond `max_rows`; verdicts
        and reviews of deleted requests go with them. Returns the requests deleted."""
        cutoff = (now or time.time()) - retention_s
        with transaction(self.db):
            gone = self.db.execute("DELETE FROM requests WHERE ts < ?", (cutoff,)).rowcount
            gone += self.db.execute(
                "DELETE FROM requests WHERE id IN (SELECT id FROM requests ORDER BY ts DESC "
                "LIMIT -1 OFFSET ?)",
                (max_rows,),
            ).rowcount
            if gone:
                for table in ("verdicts", "reviews"):
                    self.db.execute(
                        f"DELETE FROM {table} WHERE request_id NOT IN (SELECT id FROM requests)"
                    )
        return gone

    def requests(
        self,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
        newest: bool = False,
    ) -> list[LoggedRequest]:
        """Logged requests in time order (`newest`: the last `limit` ones, still in order)."""
        sql, args = "SELECT * FROM requests WHERE 1=1", []
        if since is not None:
            sql, args = sql + " AND ts >= ?", [*args, since]
        if until is not None:
            sql, args = sql + " AND ts < ?", [*args, until]
        sql += " ORDER BY ts DESC, id DESC" if newest else " ORDER BY ts, id"
        if limit is not None:
            sql, args = sql + " LIMIT ?", [*args, limit]
        rows = [LoggedRequest.from_row(r) for r in self.db.execute(sql, args)]
        return rows[::-1] if newest else rows

    def count(self, table: str = "requests") -> int:
        if table not in ("requests", "verdicts", "reviews", "probes"):
            raise ValueError(f"no table {table!r}")
        return int(self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    # ------------------------------------------------------------------ verdicts, reviews
    def add_verdict(
        self,
        request_id: str,
        verdict: str,
        judge: str,
        usd: float,
        cached: bool,
        reason: str | None = None,
    ) -> None:
        if verdict not in VERDICTS:
            raise ValueError(f"verdict {verdict!r}: one of {VERDICTS}")
        with transaction(self.db):
            self.db.execute(
                "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?)",
                (request_id, time.time(), verdict, judge, usd, int(cached), reason),
            )

    def verdicts(self) -> dict[str, sqlite3.Row]:
        return {r["request_id"]: r for r in self.db.execute("SELECT * FROM verdicts")}

    def add_reviews(self, rows: Iterable[tuple[str, str, str | None, str | None, str]]) -> int:
        """(request_id, verdict, corrected answer, reviewer, source file) rows; returns count."""
        now = time.time()
        rows = [(rid, now, v, c, who, src) for rid, v, c, who, src in rows]
        with transaction(self.db):
            self.db.executemany("INSERT OR REPLACE INTO reviews VALUES (?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

    def reviews(self) -> dict[str, sqlite3.Row]:
        return {r["request_id"]: r for r in self.db.execute("SELECT * FROM reviews")}

    # ------------------------------------------------------------------ probes
    def add_probes(self, run: str, tier: str, answers: dict[str, tuple[str | None, str | None]]):
        now = time.time()
        with transaction(self.db):
            self.db.executemany(
                "INSERT OR REPLACE INTO probes VALUES (?, ?, ?, ?, ?, ?)",
                [(run, tier, pid, now, a, e) for pid, (a, e) in answers.items()],
            )

    def probe_runs(self, tier: str) -> list[tuple[str, dict[str, str | None]]]:
        """[(run, {probe id: answer})] of a tier, oldest run first."""
        runs: dict[str, dict[str, str | None]] = {}
        for r in self.db.execute(
            "SELECT run, probe_id, answer FROM probes WHERE tier = ? ORDER BY ts, run", (tier,)
        ):
            runs.setdefault(r["run"], {})[r["probe_id"]] = r["answer"]
        return list(runs.items())
