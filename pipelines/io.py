"""Small file helpers shared by the stages: atomic writes, JSONL, hashing.

Stages talk only through files (what DVC sees), so every output is written atomically:
to a temporary name in the same folder, fsynced, then renamed. A crash or `kill -9` leaves
the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import InvalidInput, MissingInput


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on success rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def temp_path(path: str | os.PathLike[str]) -> Path:
    """A new empty temporary file beside `path`, for a file that is renamed over `path` later
    (`os.replace`) together with other outputs; the caller removes it if that never happens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write pretty, key-sorted JSON atomically (stable bytes, readable diffs)."""
    with atomic_open(path) as handle:
        json.dump(data, handle, indent=2, sort_keys=True, ensure_ascii=False)
        handle.write("\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file (a missing one is a `MissingInput` naming it)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise MissingInput(f"{path}: not found") from None


def write_jsonl(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSON lines atomically; return how many were written."""
    count = 0
    with atomic_open(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSONL file written by a stage (trusted input: errors name the file and line)."""
    if not Path(path).is_file():
        raise MissingInput(f"{path}: not found")
    records = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InvalidInput(f"{path}:{lineno}: invalid JSON: {err.msg}") from err
    return records


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def md5_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex MD5 of a file, streamed: the hash DVC records for a file (an identity, not security)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tree_hash(root: str | os.PathLike[str], skip: tuple[str, ...] = ()) -> str:
    """One SHA-256 over a folder: relative paths and file contents, in sorted order.

    `skip`: relative paths left out (an adapter's top-level README.md is its model card, which
    registration replaces; the weights and configs must come back byte for byte).
    """
    root = Path(root)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if rel in skip:
            continue
        digest.update(rel.encode() + b"\0")
        digest.update(sha256_file(file).encode() + b"\n")
    return digest.hexdigest()


def adapter_hash(folder: str | os.PathLike[str]) -> str:
    """The identity of a PEFT adapter folder: `tree_hash` without its top-level README.md."""
    return tree_hash(folder, skip=("README.md",))


def model_hash(model_dir: str | os.PathLike[str]) -> str:
    """A short identity of a resolved base model: a hash over the file hashes that the
    base_model stage recorded in its `temper_source.json`."""
    return stable_hash(read_json(Path(model_dir) / "temper_source.json")["files"])


def stable_hash(obj: Any, length: int = 16) -> str:
    """Short SHA-256 of a JSON-serialisable value (sorted keys): cache keys, prompt versions."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def open_sqlite(path: str | os.PathLike[str], timeout: float = 60.0) -> sqlite3.Connection:
    """A sqlite connection as every Temper store opens one (the response cache, the serving
    cache, the monitor log).

    WAL with synchronous NORMAL: readers never block the writer, and a commit survives
    `kill -9`. Autocommit (`isolation_level=None`): a statement is its own transaction, a
    batch uses `transaction`. Usable from any thread (each store holds its own lock), and a
    busy file is waited on for `timeout` s. Switching a new file to WAL needs it alone, and
    sqlite answers a second process doing the same "database is locked" at once, without
    waiting: that switch is retried until `timeout`.
    """
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), timeout=timeout, isolation_level=None, check_same_thread=False)
    deadline = time.monotonic() + timeout
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    db.execute("PRAGMA synchronous=NORMAL")
    return db


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One transaction on an `open_sqlite` connection: committed, or rolled back on error.
    BEGIN IMMEDIATE takes the write lock up front, so two writers wait for each other
    instead of failing halfway."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
