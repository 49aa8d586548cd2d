"""What kiln remembers about each step: build/.kiln/steps/<model>/<step id>.json.

A record is written (atomically) only after a step's outputs are in place, so a crash leaves
either the old record or none, and the step reruns. Failures go to a separate file, so the
record of the last good build, and the artifacts it names, stay valid.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kiln.plan import Step


def state_dir(root: Path) -> Path:
    return root / "build" / ".kiln"


def record_path(root: Path, step: Step) -> Path:
    return state_dir(root) / "steps" / step.model / f"{step.id}.json"


def last_path(root: Path, step: Step, target: str) -> Path:
    """The components this rule last ran with for this target, whatever the step id was then:
    the baseline that explains a change ("parameter changed: params.opset: 17 -> 18")."""
    return state_dir(root) / "steps" / step.model / "last" / f"{target}.{step.rule}.json"


def failure_path(root: Path, step: Step) -> Path:
    return record_path(root, step).with_suffix(".failed.json")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing or torn: treated as never built


def write_json_atomic(path: Path, data: Any) -> bool:
    """Write JSON via a temp file and rename. Returns False (and writes nothing) if unchanged."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return True


def relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)
