"""Pure hashing: canonical JSON, sha256 of text and files (also while copying one), BLAKE3 of files.

sha256 is the one digest in keys, lockfiles, the cache and provenance. BLAKE3 is only the quick
"same bytes as before?" re-check of a touched file (kiln.base.digests).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def canonical_json(obj: Any) -> str:
    """One text per value: sorted keys, no spaces, floats in repr form."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    return _stream(path, None)


def copy_hashing(source: Path, dest: Path) -> str:
    """Copy source to dest and return the sha256 of the bytes copied (one read for both)."""
    with open(dest, "wb") as out:
        return _stream(source, out)


def _stream(path: Path, out) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
    return digest.hexdigest()


_THREADED_PID: list[int] = []  # the process whose BLAKE3 thread pool exists, once one does


def _blake3_threads() -> int:
    """Every core, in the process that started BLAKE3's (rayon) thread pool. A process forked after
    that (doit -n N workers) inherits the pool without its threads and would wait on it forever,
    so it hashes on one thread."""
    import blake3

    if not _THREADED_PID:
        _THREADED_PID.append(os.getpid())
    return blake3.blake3.AUTO if _THREADED_PID[0] == os.getpid() else 1


def blake3_file(path: Path) -> str:
    """BLAKE3 of a file, memory-mapped and on every core: the quick "same bytes as before?" check."""
    import blake3

    if os.path.getsize(path) == 0:  # an empty file cannot be mapped
        return blake3.blake3().hexdigest()
    return blake3.blake3(max_threads=_blake3_threads()).update_mmap(path).hexdigest()
