"""build/<model>/kiln.lock.json: what a build produced, provably. Deterministic: no timestamps,
sorted keys; rewritten only when its content changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.plan import Plan
from kiln.records import read_json, record_path, relative, write_json_atomic

LOCK_VERSION = 1


def lock_path(plan: Plan) -> Path:
    return plan.root / "build" / plan.model / "kiln.lock.json"


def lock_data(plan: Plan) -> dict[str, Any] | None:
    """The lockfile's content, or None if some step has no record (the build is incomplete)."""
    records = [read_json(record_path(plan.root, step)) for step in plan.steps]
    if any(r is None for r in records):
        return None
    tools: dict[str, str] = {}
    steps = []
    artifacts = []
    for step, record in zip(plan.steps, records):
        tools |= record["components"]["tools"]
        steps.append({"step": step.name, "rule": step.rule, "key": record["key"], "targets": step.targets})
        if step.rule == "validate":
            files = {role: {k: out[k] for k in ("path", "sha256", "bytes")} for role, out in record["outputs"].items()}
            artifact = {"target": step.targets[0], **files["artifact"]}
            # files published beside it (OpenVINO's weights, TensorRT's timing cache) are locked too
            artifact |= {role: entry for role, entry in files.items() if role not in ("artifact", "validation")}
            artifacts.append(artifact)
    return {
        "lock_version": LOCK_VERSION,
        "model": plan.model,
        "manifest": relative(plan.manifest, plan.root),
        "artifacts": sorted(artifacts, key=lambda a: a["target"]),
        "steps": steps,
        "tools": dict(sorted(tools.items())),
    }


def write_lock(plan: Plan) -> bool:
    data = lock_data(plan)
    return data is not None and write_json_atomic(lock_path(plan), data)
