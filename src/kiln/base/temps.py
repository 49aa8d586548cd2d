"""Temp files (and folders) beside their destination, named so that a later build can tell whose they are.

Every writer (records, cache, step outputs, the memory ledger, SafeTensors) writes
`.<name>.kiln-<pid>-<thread>[.<tag>].tmp` and renames it into place. A build killed mid-write
leaves such a file behind; the next writer in that folder deletes the ones whose pid is gone.
The `kiln-` marker keeps the pid unambiguous whatever digits the file's own name holds.

One tag is not litter: `.old` is an artifact set aside while its replacement moves in
(kiln.base.fsio.replace_artifact, where no atomic exchange is possible). A build killed between the
two renames leaves its destination absent and the old artifact under that temp name: the sweep
renames it back to its final name (if that name is still free) instead of deleting the last good build.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

_TEMP = re.compile(r"^\..+\.kiln-(\d+)-\d+(?:\.[a-z]+)?\.tmp$")
_FINAL = re.compile(r"^\.(.+)\.kiln-\d+-\d+(?:\.[a-z]+)?\.tmp$")
_SET_ASIDE = ".old.tmp"  # replace_artifact's tag for the old artifact it renames aside
_SWEPT: set[str] = set()


def temp_path(path: Path, tag: str = "") -> Path:
    """Where to write `path` before renaming it into place: unique to this process and thread."""
    return path.with_name(f".{path.name}.kiln-{os.getpid()}-{threading.get_ident()}{'.' + tag if tag else ''}.tmp")


def final_name(path: Path) -> str:
    """The name a temp file will be renamed to (`path`'s own name when it is no temp file): what a
    file must call a companion it refers to, such as an ONNX model's external data file."""
    match = _FINAL.match(path.name)
    return match.group(1) if match else path.name


def sweep_stale_temps(folder: Path) -> None:
    """Delete temp files that a killed build left in `folder` (their writer's pid is gone), once per
    folder per process. Temps are hidden and never read, but a crash must not leave litter. An old
    artifact set aside (`.old.tmp`) whose final name is absent is renamed back to it instead."""
    key = os.fspath(folder)
    if key in _SWEPT:
        return
    _SWEPT.add(key)
    try:
        entries = list(os.scandir(key))
    except OSError:
        return
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match and not pid_alive(int(match.group(1))):
            if entry.name.endswith(_SET_ASIDE) and _put_back(folder, entry):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):  # a folder output, or an old one set aside
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass


def _put_back(folder: Path, entry: os.DirEntry) -> bool:
    """Rename an artifact set aside by a killed replace_artifact back to its final name, if nothing is
    there (the new one never moved in). False when something is, or the rename fails: it is stale."""
    final = os.path.join(folder, final_name(Path(entry.name)))
    if os.path.lexists(final):
        return False
    try:
        os.rename(entry.path, final)
    except OSError:
        return False
    return True


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one we may not signal counts: it is alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # someone else's, or not a pid at all: not ours to delete
        pass
    return True
