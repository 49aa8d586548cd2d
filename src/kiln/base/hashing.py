"""Pure hashing: canonical JSON, sha256 of text, files (also while copying one) and folders, BLAKE3
of files.

sha256 is the one digest in keys, lockfiles, the cache and provenance. BLAKE3 is only the quick
"same bytes as before?" re-check of a touched file (kiln.base.digests).

A step output or published artifact may be a folder (Core ML's model.mlpackage, a TensorFlow
SavedModel). Its digest is tree_sha256 of its listing (list_tree), defined there. The listing holds
its regular files and its empty folders (a Core ML package may list an empty weights/ folder in its
Manifest.json, a SavedModel loader may expect assets/): an empty folder is an entry whose relative
path ends in "/" and whose digest is EMPTY_FOLDER.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Iterable

CHUNK = 1 << 20
EMPTY_FOLDER = "dir"  # the digest of an empty folder's entry in a listing (its relative path ends in "/")
_TREE_TAG = b"kiln-tree-v1\0"  # first bytes of a folder's digest input: no file or older listing form shares it


def canonical_json(obj: Any) -> str:
    """One text per value: sorted keys, no spaces, floats in repr form."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    return _stream(path, None)


def sha256_path(path: Path) -> str:
    """sha256 of a file, or tree_sha256 of a folder, every byte read (no digest cache: kiln verify).
    Like kiln.base.digests.digest, it follows `path` itself when it is a symlink (to a file or a
    folder); links inside a folder are refused (list_tree)."""
    if os.path.isdir(path):
        return tree_sha256((rel, EMPTY_FOLDER if is_empty_folder(rel) else sha256_file(file)) for rel, file in list_tree(path))
    return sha256_file(path)


def is_empty_folder(rel: str) -> bool:
    """Whether a listing entry (list_tree, kiln.base.digests.listing) is an empty folder, not a file."""
    return rel.endswith("/")


class UnsafeFolderEntry(OSError):
    """A folder artifact holds something other than regular files and folders: a symlink (the
    artifact would point outside itself, and its bytes would depend on what the link reaches) or a
    fifo, socket or device. `relpath` names it inside the folder."""

    def __init__(self, folder: Path | str, relpath: str, kind: str):
        self.folder, self.relpath, self.kind = os.fspath(folder), relpath, kind
        super().__init__(self.naming(self.folder))

    def naming(self, folder: str) -> str:
        """The message, with the folder named as the reader knows it (e.g. workspace-relative)."""
        return f"{folder}/{self.relpath} is a {self.kind}; a folder artifact may hold only regular files and folders"


def list_tree(folder: Path | str) -> list[tuple[str, str]]:
    """(relative POSIX path, absolute path) of every regular file under `folder`, and of every empty
    folder under it with "/" after its relative path (e.g. "Data/weights/"), in tree_sha256's order.
    A folder holding only empty folders is not an entry itself: recreating its entries recreates it.
    Raises UnsafeFolderEntry on a symlink (to a file or a folder) or any entry that is neither a
    regular file nor a folder."""
    found: list[tuple[str, str]] = []
    pending = [(os.fspath(folder), "")]
    while pending:
        where, prefix = pending.pop()
        with os.scandir(where) as entries:
            entries = list(entries)
            if not entries and prefix:
                found.append((prefix, where))
            for entry in entries:
                rel = prefix + entry.name
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISREG(mode):
                    found.append((rel, entry.path))
                elif stat.S_ISDIR(mode):
                    pending.append((entry.path, rel + "/"))
                elif stat.S_ISLNK(mode):
                    raise UnsafeFolderEntry(folder, rel, f"symbolic link (to {os.readlink(entry.path)})")
                else:
                    raise UnsafeFolderEntry(folder, rel, _special_kind(mode))
    return sorted(found, key=lambda item: _listing_name(item[0]))


def tree_sha256(files: Iterable[tuple[str, str]]) -> str:
    r"""The digest of a folder, given its listing (list_tree): (relative POSIX path, sha256 of the
    file) for each regular file and (relative path + "/", EMPTY_FOLDER) for each empty folder:

        sha256( "kiln-tree-v1\0" +
                for each entry, sorted by the UTF-8 bytes of its relative path:
                  relpath + "\0" + file_sha256 + "\n"      a regular file
                  relpath + "/" + "\0" + "dir" + "\n"       an empty folder )

    A file's relative path never ends in "/" and a sha256 is never "dir", so the two kinds of line
    cannot be confused; the leading tag keeps a folder's digest apart from any file's sha256 (an
    empty folder is not an empty file, and a file holding a folder's listing is not that folder).
    So it depends on the paths inside the folder, the files' bytes and which folders are empty
    only: not on mtimes, permissions, the order the filesystem lists them in, or where it is."""
    digest = hashlib.sha256(_TREE_TAG)
    for rel, sha256 in sorted(files, key=lambda item: _listing_name(item[0])):
        if is_empty_folder(rel) != (sha256 == EMPTY_FOLDER):
            raise ValueError(f"listing entry {rel!r} with digest {sha256!r}: an empty folder (ending in '/') and only one has digest {EMPTY_FOLDER!r}")
        digest.update(_listing_name(rel) + b"\0" + sha256.encode("ascii") + b"\n")
    return digest.hexdigest()


def _listing_name(rel: str) -> bytes:
    """A relative path as the bytes the filesystem holds (a name that is not UTF-8 keeps its bytes)."""
    return rel.encode("utf-8", "surrogateescape")


def _special_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return "special file"


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
