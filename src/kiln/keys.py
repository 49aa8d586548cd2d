"""What counts as changed: canonical params, file digests (cached by stat), tool versions, step keys.

A step's key is sha256 over its components: rule name and version, canonical params, the digests
of its inputs (by role and file name, never by absolute path, so a moved venv or clone keeps its
keys) and the versions of the tools the rule uses. Same key, same bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sqlite3
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import kiln

CHUNK = 1 << 20


def canonical_json(obj: Any) -> str:
    """One text per value: sorted keys, no spaces, floats in repr form."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def tool_version(name: str) -> str:
    """Installed version of a tool (a distribution name, or "kiln"); read once per process."""
    if name == "kiln":
        return kiln.__version__
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def tool_versions(names: tuple[str, ...] | list[str]) -> dict[str, str]:
    return {name: tool_version(name) for name in sorted(set(names) | {"kiln"})}


def step_key(components: dict[str, Any]) -> str:
    return sha256_text(canonical_json(components))


class DigestCache:
    """sha256 of files, remembered by (path, inode, size, mtime_ns, ctime_ns).

    A file whose stat is unchanged is not read again; a file that was only touched is hashed once
    and its entry refreshed, so the next run is free again (unlike doit's MD5 checker, doit#431).
    SQLite in WAL mode lets parallel doit workers share it: one connection per thread (doit -P
    thread) and per process (doit's default multiprocessing), as sqlite3 requires.
    """

    def __init__(self, db_path: Path):
        self.db_path = Path(db_path)
        self._local = threading.local()  # .conn: this thread's connection

    def _db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._local.conn = self._open()
        return conn

    def _open(self, patience_s: float = 60.0) -> sqlite3.Connection:
        """Connect and set up. Switching a new database to WAL needs a moment of exclusive access and
        answers "database is locked" at once (the busy timeout does not cover it) when another thread
        or process is doing the same: retry with backoff instead of failing the build."""
        deadline, wait = time.monotonic() + patience_s, 0.01
        while True:
            conn = sqlite3.connect(self.db_path, timeout=patience_s, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, inode INTEGER, size INTEGER,"
                    " mtime_ns INTEGER, ctime_ns INTEGER, sha256 TEXT)"
                )
                return conn
            except sqlite3.OperationalError as err:
                conn.close()
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(wait)
                wait = min(wait * 2, 0.5)

    def digest(self, path: Path) -> str:
        path = os.path.abspath(path)  # plan paths are absolute already: no resolve() syscalls per file
        st = os.stat(path)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        row = self._db().execute(
            "SELECT inode, size, mtime_ns, ctime_ns, sha256 FROM digests WHERE path = ?", (path,)
        ).fetchone()
        if row is not None and tuple(row[:4]) == stamp:
            return row[4]
        value = sha256_file(path)
        if os.stat(path).st_mtime_ns == st.st_mtime_ns:  # not written while we read it
            self._db().execute(
                "INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?)", (path, *stamp, value)
            )
        return value

    def remember(self, path: Path, sha256: str) -> None:
        """Record a digest known without reading the file (it was just computed or verified)."""
        path = os.path.abspath(path)
        st = os.stat(path)
        self._db().execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?)",
                           (path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, sha256))

    def close(self) -> None:
        """Close this thread's connection (others close with their threads)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
