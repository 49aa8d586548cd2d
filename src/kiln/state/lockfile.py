"""build/<model>/kiln.lock.json: what a build produced, provably. Deterministic: no timestamps,
sorted keys; rewritten only when its content changes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.base.digests import digest
from kiln.base.fsio import read_json, write_json_atomic
from kiln.base.hashing import UnsafeFolderEntry, sha256_path
from kiln.base.paths import relative
from kiln.state.provenance import FILE, statements
from kiln.state.records import read_record, tools_of

if TYPE_CHECKING:
    from kiln.plan.steps import Plan

LOCK_VERSION = 1


def lock_path(plan: Plan) -> Path:
    return plan.root / "build" / plan.model / "kiln.lock.json"


def lock_data(plan: Plan) -> dict[str, Any] | None:
    """The lockfile's content, or None if some step has no record (the build is incomplete)."""
    records = [read_record(plan.root, step) for step in plan.steps]
    if any(r is None for r in records):
        return None
    steps = []
    artifacts = []
    for step, record in zip(plan.steps, records, strict=True):
        steps.append({"step": plan.step_name(step), "rule": step.rule, "key": record.key, "targets": plan.targets_of(step)})
        if step.publishes:
            files = {role: {k: out[k] for k in ("path", "sha256", "bytes")} for role, out in record.outputs.items()}
            artifact = {"target": step.targets[0], **files["artifact"]}
            # files published beside it (OpenVINO's weights, TensorRT's timing cache) are locked too
            artifact |= {role: entry for role, entry in files.items() if role not in ("artifact", "validation")}
            artifacts.append(artifact)
    return {
        "lock_version": LOCK_VERSION,
        "model": plan.model,
        "manifest": relative(plan.manifest, plan.root),
        # the bytes this build planned from; else through the stat-keyed cache (no re-read per no-op build)
        "manifest_sha256": plan.manifest_sha256 or digest(plan.root, plan.manifest),
        "artifacts": sorted(artifacts, key=lambda a: a["target"]),
        "steps": steps,
        "tools": tools_of(records),
    }


PREVIOUS_LOCK = "kiln.lock.previous.json"  # the lockfile a changed build replaced (kiln diff's default "before")


def write_lock(plan: Plan) -> bool:
    """Write the lockfile; True when it changed, the one it replaced then kept as kiln.lock.previous.json."""
    data = lock_data(plan)
    if data is None:
        return False
    path = lock_path(plan)
    old = read_json(path)
    if old == data:
        return False
    if old is not None:
        write_json_atomic(path.with_name(PREVIOUS_LOCK), old)
    return write_json_atomic(path, data)


def write_provenance(plan: Plan) -> None:
    """provenance.intoto.json next to every published artifact (kiln.state.provenance)."""
    lock = read_json(lock_path(plan))
    if lock is None:
        return
    for path, statement in statements(plan, lock["manifest_sha256"]).items():
        write_json_atomic(path, statement)


def verify(plan: Plan) -> list[str]:
    """Re-hash every file (and folder: kiln.base.hashing.tree_sha256) the lockfile lists, reading the
    bytes, not trusting any cache, and the provenance statements' subjects. Returns the problems,
    one line each; [] when all match."""
    lock = read_json(lock_path(plan))
    if lock is None:
        return [f"{relative(lock_path(plan), plan.root)}: no lockfile (not built yet, or the last build failed)"]
    problems = []
    for artifact in lock["artifacts"]:
        files = [artifact] + [v for v in artifact.values() if isinstance(v, dict) and "sha256" in v]
        for entry in files:
            path = plan.root / entry["path"]
            if path.is_symlink():  # kiln publishes copies: a link there is not what the build wrote
                problems.append(f"{entry['path']}: a symbolic link (to {os.readlink(path)}), not the file or folder "
                                f"the build published (locked sha256 {entry['sha256'][:12]}); build again to replace it")
                continue
            if not path.is_file() and not path.is_dir():
                problems.append(f"{entry['path']}: missing (locked sha256 {entry['sha256'][:12]})")
                continue
            try:
                found = sha256_path(path)
            except UnsafeFolderEntry as err:
                problems.append(err.naming(entry["path"]))
                continue
            except OSError as err:  # unreadable: a problem to report, not a crash
                problems.append(f"{entry['path']}: cannot be read ({err.strerror or err})")
                continue
            if found != entry["sha256"]:
                problems.append(f"{entry['path']}: sha256 {found[:12]} differs from the locked {entry['sha256'][:12]}")
        statement = read_json(plan.root / Path(artifact["path"]).parent / FILE)
        subjects = {s["name"]: s["digest"]["sha256"] for s in (statement or {}).get("subject", [])}
        if subjects.get(artifact["path"]) != artifact["sha256"]:
            problems.append(f"{Path(artifact['path']).parent / FILE}: missing or its subject does not match the lockfile")
    return problems


def provenance_complete(plan: Plan) -> bool:
    return all((path.parent / FILE).is_file() for _, path in plan.artifacts())
