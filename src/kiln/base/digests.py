"""sha256 of files (and folders), remembered by stat: a no-op build reads no large file.

DigestCache is the store (build/.kiln/digests.sqlite); digest(), listing() and remember() are the
per-process accessors every part of kiln uses, so a file is looked up in one place whoever asks. A
folder (a step output such as model.mlpackage) is not an entry of its own: its digest is
kiln.base.hashing.tree_sha256 over its files' entries (and its empty folders, listed as
[relative path + "/", EMPTY_FOLDER, 0]), so a no-op build stats its files and reads none.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

from kiln.base.hashing import EMPTY_FOLDER, blake3_file, is_empty_folder, list_tree, sha256_file, tree_sha256
from kiln.base.paths import state_dir


def digest(root: Path, path: Path | str) -> str:
    """The sha256 of a file of this workspace, or the tree_sha256 of a folder (kiln.base.hashing),
    through the stat-keyed cache. A folder holding a symlink raises UnsafeFolderEntry (an OSError)."""
    return _cache(root, os.getpid()).digest(path)


def listing(root: Path, folder: Path | str) -> list[list]:
    """[relative POSIX path, sha256, bytes] of every regular file in a folder, and [relative path +
    "/", EMPTY_FOLDER, 0] of every empty folder in it, in tree_sha256's order, through the
    stat-keyed cache: what a step record and the step cache keep of a folder."""
    return _cache(root, os.getpid()).listing(folder)


def remember(root: Path, path: Path | str, sha256: str) -> None:
    """Record a digest known without reading the file (just computed or verified while copying)."""
    _cache(root, os.getpid()).remember(path, sha256)


def remember_listing(root: Path, folder: Path | str, files: list[list]) -> None:
    """remember() for each file of a folder, given its listing() (after a restore or a hard link)."""
    cache = _cache(root, os.getpid())
    for rel, sha256, _ in files:
        if not is_empty_folder(rel):
            cache.remember(os.path.join(folder, rel), sha256)


@functools.cache
def _cache(root: Path, pid: int) -> "DigestCache":  # one per process: a forked worker opens its own
    return DigestCache(state_dir(root) / "digests.sqlite")


class DigestCache:
    """sha256 of files, remembered by (path, inode, size, mtime_ns, ctime_ns).

    A file whose stat is unchanged is not read again. A file that was only touched is read once and
    its entry refreshed, so the next run is free again (unlike doit's MD5 checker, doit#431). That
    one read is a BLAKE3 check, not a sha256: each entry also keeps the file's BLAKE3, and a file of
    the same size whose BLAKE3 still matches has the same bytes, so its sha256 carries over. BLAKE3
    is a cryptographic hash too, and on every core it reads several times faster than sha256;
    sha256 stays the digest in keys, lockfiles and provenance, and is only computed for new bytes.
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
                # A cache: a commit lost in a power cut only costs a re-hash (an entry is trusted only
                # while its stat matches), so no fsync per entry; WAL keeps the file consistent anyway.
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS file_digests (path TEXT PRIMARY KEY, inode INTEGER, size INTEGER,"
                    " mtime_ns INTEGER, ctime_ns INTEGER, sha256 TEXT, blake3 TEXT)"
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
        if stat.S_ISDIR(st.st_mode):
            return tree_sha256((rel, sha256) for rel, sha256, _ in self.listing(path))
        return self._file_digest(path, st)

    def listing(self, folder: Path | str) -> list[list]:
        """[relative path, sha256, bytes] of each regular file (and empty folder) of a folder
        (kiln.base.digests.listing)."""
        found: list[list] = []
        for rel, path in list_tree(os.path.abspath(folder)):  # absolute: the entries' keys
            if is_empty_folder(rel):
                found.append([rel, EMPTY_FOLDER, 0])
                continue
            st = os.stat(path)
            found.append([rel, self._file_digest(path, st), st.st_size])
        return found

    def _file_digest(self, path: str, st: os.stat_result) -> str:
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        row = self._rows().get(path)
        if row is not None and row[:4] == stamp:
            return row[4]
        quick = blake3_file(path)
        if row is not None and row[1] == st.st_size and row[5] == quick:
            value = row[4]  # touched, copied back or re-linked: the same bytes
        else:
            value = sha256_file(path)
        if os.stat(path).st_mtime_ns == st.st_mtime_ns:  # not written while we read it
            self._store(path, stamp, value, quick)
        return value

    def remember(self, path: Path, sha256: str) -> None:
        """Record a digest known without reading the file (it was just computed or verified). The
        entry's BLAKE3 is kept if it describes the same bytes, else computed now."""
        path = os.path.abspath(path)
        st = os.stat(path)
        row = self._rows().get(path)
        quick = row[5] if row is not None and row[4] == sha256 and row[5] else blake3_file(path)
        self._store(path, (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns), sha256, quick)

    def _store(self, path: str, stamp: tuple[int, int, int, int], sha256: str, quick: str) -> None:
        self._db().execute("INSERT OR REPLACE INTO file_digests VALUES (?, ?, ?, ?, ?, ?, ?)", (path, *stamp, sha256, quick))
        self._rows()[path] = (*stamp, sha256, quick)

    def _rows(self) -> dict[str, tuple]:
        """Every entry, read in one query the first time this thread asks (a no-op build looks up
        thousands of files). A row another process writes later is not seen, which is safe: an entry
        is only trusted when its stat matches the file's now, and a stale one costs a re-check."""
        rows = getattr(self._local, "rows", None)
        if rows is None:
            rows = self._local.rows = {r[0]: tuple(r[1:]) for r in self._db().execute("SELECT * FROM file_digests")}
        return rows

    def close(self) -> None:
        """Close this thread's connection (others close with their threads)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
