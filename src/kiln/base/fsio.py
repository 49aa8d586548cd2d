"""Files written whole or not at all (temp file beside the destination, then rename), and JSON read
once per process while its stat is unchanged.

An artifact (a step output, a published model) is a file or a folder (model.mlpackage, a SavedModel):
replace_artifact, copy_artifact, remove_artifact and artifact_bytes treat both alike. A folder is its
regular files and its empty folders (kiln.base.hashing.list_tree; a Core ML package may list an
empty weights/ folder): a symlink inside is refused, so what is copied is exactly what its digest
covers. On Linux a folder replaces what is at its destination in one atomic exchange
(renameat2 RENAME_EXCHANGE), so the destination is never absent."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from kiln.base.hashing import is_empty_folder, list_tree
from kiln.base.temps import sweep_stale_temps, temp_path

_READ: dict[str, tuple[tuple[int, int, int], Any]] = {}  # path -> (stat stamp, parsed JSON)


def read_json(path: Path) -> dict[str, Any] | None:
    """Parsed JSON, or None when missing or torn (treated as never built). A file whose stat is
    unchanged is parsed once per process: a no-op build reads each record for the up-to-date check
    and again for the report and lockfile. Writers replace files (a new inode), so a file another
    worker rewrote is never served stale. Callers must not change what they get."""
    key = os.fspath(path)
    try:
        st = os.stat(key)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = _READ.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        with open(key, encoding="utf-8") as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        return None
    _READ[key] = (stamp, data)
    return data


def write_json_atomic(path: Path, data: Any, durable: bool = True) -> bool:
    """Write JSON via a temp file and rename. Returns False (and writes nothing) if unchanged.
    durable=False skips the fsync, for files that are only informative: still atomic, but a power
    cut may lose the newest version."""
    if read_json(path) == data:  # parsed once per process: no re-encoding to find out
        return False
    text = json.dumps(data, indent=2, sort_keys=True) + "\n" if durable else dumps_by_line(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path.parent)
    tmp = temp_path(path)
    with open(tmp, "w") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    _READ.pop(os.fspath(path), None)
    return True


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write bytes via a temp file beside the destination and rename: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path.parent)
    tmp = temp_path(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def replace_artifact(temp: Path, dest: Path) -> None:
    """Move a finished artifact (file or folder) from its temp path onto `dest`. A file replacing a
    file is one atomic rename, as always. Otherwise, where the filesystem can (Linux), the new one
    and whatever is at `dest` swap places in one atomic exchange and the old one, now at the temp
    path, is deleted: `dest` always holds the old or the new artifact whole. Elsewhere the old one is
    renamed aside (`.<name>.kiln-<pid>-<thread>.old.tmp`), the new one renamed in, and only then the
    old one deleted; if the second rename fails the old one is put back, and a crash between the two
    renames leaves `dest` absent, which the next build's sweep in that folder
    (kiln.base.temps.sweep_stale_temps) repairs by renaming the old one back."""
    if not _is_folder(temp) and not _is_folder(dest):
        os.replace(temp, dest)
        return
    if os.path.lexists(dest) and _exchange(temp, dest):
        remove_artifact(temp)  # the old artifact, swapped out
        return
    aside = None
    if os.path.lexists(dest):
        aside = temp_path(dest, "old")
        os.replace(dest, aside)
    try:
        os.replace(temp, dest)
    except BaseException:
        if aside is not None:
            os.replace(aside, dest)
        raise
    if aside is not None:
        remove_artifact(aside)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def _exchange(one: Path | str, other: Path | str) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE, glibc 2.28+). False, having
    changed nothing, where the OS, libc or filesystem cannot (the caller renames aside instead)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(one), _AT_FDCWD, os.fsencode(other), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), os.fspath(one), None, os.fspath(other))


_LIBC: list = []  # [renameat2 or None], once looked up


def _renameat2():
    if not _LIBC:
        function = None
        if sys.platform.startswith("linux"):
            try:
                function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
            except OSError:
                function = None
            if function is not None:
                function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                function.restype = ctypes.c_int
        _LIBC.append(function)
    return _LIBC[0]


def copy_artifact(source: Path, dest: Path) -> None:
    """Copy a file or a folder to `dest`, atomically: the copy is written beside `dest` under a temp
    name and moved in by replace_artifact (so an existing folder there is replaced whole, never
    merged into). A folder's regular files are copied with their relative paths, and its empty
    folders made again; a symlink in it
    raises kiln.base.hashing.UnsafeFolderEntry before anything is written. `source` itself may be a
    symlink (a file in a Hugging Face cache): what it points to is copied. Bytes only: the copy's
    permissions and times are the new file's own."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(dest.parent)
    tmp = temp_path(dest, "copy")
    try:
        if os.path.isdir(source):
            files = list_tree(source)
            tmp.mkdir()
            for rel, path in files:
                target = tmp / rel
                if is_empty_folder(rel):
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        else:
            shutil.copyfile(source, tmp)
        replace_artifact(tmp, dest)
    except BaseException:
        remove_artifact(tmp)
        raise


def remove_artifact(path: Path | str) -> None:
    """Delete a file or a folder (with everything in it); nothing there is fine. A symlink is
    removed itself, never what it points to."""
    if _is_folder(path):
        shutil.rmtree(path)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def artifact_bytes(path: Path | str) -> int:
    """A file's size, or the sum of the sizes of a folder's regular files (what records, lockfiles
    and reports call an output's bytes). Like a digest, it follows `path` itself if it is a symlink."""
    if os.path.isdir(path):
        return sum(os.stat(file).st_size for rel, file in list_tree(path) if not is_empty_folder(rel))
    return os.stat(path).st_size


def _is_folder(path: Path | str) -> bool:
    """A real folder (a symlink to one is not: it is removed or replaced as a link)."""
    return os.path.isdir(path) and not os.path.islink(path)


def dumps_by_line(data: dict[str, Any]) -> str:
    """JSON with one top-level key, or one item of a top-level list, per line: readable and diffable
    like indented JSON, but made by json's C encoder (indent= switches to the pure-Python one, which
    a no-op build of a monorepo would pay for every report)."""
    lines = []
    for key in sorted(data):
        value = data[key]
        if isinstance(value, list) and value:
            items = ",\n  ".join(json.dumps(item, sort_keys=True) for item in value)
            lines.append(f"{json.dumps(key)}: [\n  {items}\n ]")
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value, sort_keys=True)}")
    return "{\n " + ",\n ".join(lines) + "\n}\n"
