"""Latency probes that wait for a quiet machine: validate times its artifact on the first validation
sample when its step is the only one running (kiln.base.quiet); when other steps run beside it, it
leaves a request here instead, and the build measures it at the end, alone
(kiln.execute.probes.run_deferred), before the report is written.

A request is build/.kiln/probes/<token>.json (step, format, artifact) and <token>.npz (the sample).
The step's facts meanwhile hold DEFERRED with the same token, which the end of the build replaces
with the measurement; a request whose step has since been rebuilt or restored (another token, or
none) is dropped unmeasured."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from kiln.base.fsio import write_bytes_atomic
from kiln.base.paths import relative, state_dir

DEFERRED = "latency not measured: other steps were running, and the build ended before it could be measured alone"


def probes_dir(root: Path) -> Path:
    return state_dir(root) / "probes"


def defer(root: Path, step: str, fmt: str, artifact: Path, sample: dict) -> dict[str, Any]:
    """Leave the probe of `artifact` (format `fmt`) on `sample` for the end of the build; the
    placeholder the step's facts hold until then."""
    import io

    import numpy as np

    token = uuid.uuid4().hex
    folder = probes_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **sample)
    write_bytes_atomic(folder / f"{token}.npz", buffer.getvalue())
    request = {"step": step, "format": fmt, "artifact": relative(artifact, root), "token": token}
    write_bytes_atomic(folder / f"{token}.json", json.dumps(request, sort_keys=True).encode())  # last: a request is whole
    return {"skipped": DEFERRED, "deferred": token}


def requests(root: Path) -> list[dict[str, Any]]:
    """The waiting requests, in step-name order (the report's), ties by token."""
    found = []
    for path in probes_dir(root).glob("*.json"):
        try:
            request = json.loads(path.read_text())
        except (OSError, ValueError):
            request = {"token": path.stem}  # torn: dropped by the caller
        found.append(request)
    return sorted(found, key=lambda r: (str(r.get("step")), r["token"]))


def sample_of(root: Path, token: str) -> dict:
    import numpy as np

    with np.load(probes_dir(root) / f"{token}.npz") as data:
        return {name: data[name] for name in data.files}


def drop(root: Path, token: str) -> None:
    for suffix in (".json", ".npz"):
        (probes_dir(root) / f"{token}{suffix}").unlink(missing_ok=True)
