"""The persistent response cache: content-addressed rows in sqlite (WAL).

Why sqlite: a commit is atomic and survives `kill -9` (WAL + synchronous=NORMAL loses at most
the last commits on power loss, never on a process crash); many processes may read and write
at once (busy timeout). One file per key would also work, but costs a file per answer and a
directory scan for counts; sqlite gives both and atomic upserts for free.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from ..io import open_sqlite, transaction
from .base import Completion


class Cache:
    """Content-addressed response cache in sqlite (WAL): crash-safe, multi-process."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = open_sqlite(self.path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, kind TEXT, model TEXT,"
            " text TEXT, input_tokens INT, output_tokens INT, usd REAL, latency_ms REAL,"
            " finish_reason TEXT, request TEXT, created REAL, cached_input_tokens INT DEFAULT 0)"
        )
        self._add_column("cached_input_tokens INT DEFAULT 0")
        # Requests that failed for good in a run that wrote its outputs (`teacher.Recall`).
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS failures (key TEXT PRIMARY KEY, reason TEXT,"
            " output TEXT, created REAL)"
        )

    def _add_column(self, column: str) -> None:
        """Bring a cache file written before `column` existed up to date (old rows read 0)."""
        name = column.split()[0]
        have = {row[1] for row in self._db.execute("PRAGMA table_info(completions)")}
        if name not in have:
            try:
                self._db.execute(f"ALTER TABLE completions ADD COLUMN {column}")
            except sqlite3.OperationalError as err:  # another process added it first
                if "duplicate column" not in str(err):
                    raise

    def get(self, key: str) -> Completion | None:
        with self._lock:
            row = self._db.execute(
                "SELECT text, input_tokens, output_tokens, usd, latency_ms, finish_reason, model,"
                " cached_input_tokens FROM completions WHERE key = ?",
                (key,),
            ).fetchone()
        if row is None:
            return None
        text, tin, tout, usd, latency, finish, model, cached_in = row
        return Completion(text, tin, tout, usd, latency, True, finish, model, cached_in or 0)

    def put(self, key: str, kind: str, request: dict[str, Any], done: Completion) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO completions (key, kind, model, text, input_tokens,"
                " output_tokens, usd, latency_ms, finish_reason, request, created,"
                " cached_input_tokens) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    key,
                    kind,
                    done.model,
                    done.text,
                    done.input_tokens,
                    done.output_tokens,
                    done.usd,
                    done.latency_ms,
                    done.finish_reason,
                    json.dumps(request, ensure_ascii=False),
                    time.time(),
                    done.cached_input_tokens,
                ),
            )

    def failure(self, key: str) -> tuple[str, str | None] | None:
        """(reason, last reply) of a request remembered as failed, if it is."""
        with self._lock:
            row = self._db.execute(
                "SELECT reason, output FROM failures WHERE key = ?", (key,)
            ).fetchone()
        return None if row is None else (row[0], row[1])

    def put_failures(self, failed: dict[str, tuple[str, str | None]]) -> None:
        with self._lock, transaction(self._db):
            self._db.executemany(
                "INSERT OR REPLACE INTO failures (key, reason, output, created) VALUES (?,?,?,?)",
                [(key, reason, output, time.time()) for key, (reason, output) in failed.items()],
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM completions").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
