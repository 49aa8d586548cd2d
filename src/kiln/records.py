"""What kiln remembers about each step: build/.kiln/steps/<step id>.json (one per step id, whichever manifests share it).

A record is written (atomically) only after a step's outputs are in place, so a crash leaves
either the old record or none, and the step reruns. Failures go to a separate file, so the
record of the last good build, and the artifacts it names, stay valid.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.temps import sweep_stale_temps, temp_path

if TYPE_CHECKING:  # a no-op build never imports the planner (kiln.fresh)
    from kiln.plan import Step


def state_dir(root: Path) -> Path:
    return root / "build" / ".kiln"


def record_path(root: Path, step: Step) -> Path:
    """One record per step id, whichever manifests share the step."""
    return _record_path(root, step.id)


@functools.lru_cache(maxsize=1 << 16)
def _record_path(root: Path, step_id: str) -> Path:  # asked several times per step in every build
    return state_dir(root) / "steps" / f"{step_id}.json"


def last_path(root: Path, step: Step, target: str, model: str | None = None) -> Path:
    """The components this rule last ran with for this target (of this model; default: the
    step's first), whatever the step id was then: the baseline that explains a change
    ("parameter changed: params.opset: 17 -> 18")."""
    return state_dir(root) / "last" / (model or step.model) / f"{target}.{step.rule}.json"


def owners(step: Step) -> list[tuple[str, str]]:
    """(model, target) of every target that needs this step, in every manifest that shares it."""
    return [(step.model, t) for t in step.targets] + list(step.shared_with)


def failure_path(root: Path, step: Step) -> Path:
    return record_path(root, step).with_suffix(".failed.json")


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
    durable=False skips the fsync, for files that are only informative (the report): still
    atomic, but a power cut may lose the newest version."""
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


def relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)
