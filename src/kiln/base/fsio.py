"""Files written whole or not at all (temp file beside the destination, then rename), and JSON read
once per process while its stat is unchanged."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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
