"""Unchanged manifests are not planned: the no-op build of a monorepo in a few tenths of a second.

At the end of a build in which every step of a manifest ran or was up to date, kiln remembers
that manifest's closure in build/.kiln/fresh/<manifest>.json: the sha256 of every file its
up-to-date check reads (the manifest; the source, data and calibration files; every step's
outputs and record; the lockfile and provenance statements), the mtime of each model folder it
listed, the versions of the tools its keys hold, and a fingerprint of kiln's own code (every
.py file of kiln and its build rules, the native extension, the Python version).

The next `doit build` checks each manifest's closure through the stat-keyed digest cache before
anything else: a manifest whose every file still has the remembered bytes, under the same code and
tools, cannot have a step to run, so it is neither parsed, validated, planned nor handed to doit;
its report is rewritten as the no-op report the full check would have written. A touched file is
re-checked (BLAKE3) and its digest-cache entry refreshed, as in the full check. Anything else (a
changed byte, a missing file, a new kiln or tool version) sends the manifest down the full path,
which says why each step must run.

An entry is never trusted on its own word: it names bytes, and it holds only while the files on
disk are those bytes, so a crashed or concurrent build cannot make a stale entry look fresh.
Manifests whose steps depend on the machine (TensorRT engines) or that left targets out for lack
of hardware are always planned: their keys hold facts that only planning reads.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kiln
from kiln.base.digests import digest
from kiln.base.fsio import read_json, write_json_atomic
from kiln.base.hashing import sha256_text
from kiln.base.locate import lookup
from kiln.base.paths import state_dir, workspace_path
from kiln.base.tools import tool_version
from kiln.state.lockfile import lock_path
from kiln.state.provenance import FILE
from kiln.state.records import read_record, record_path, tools_of
from kiln.state.report import report_template

if TYPE_CHECKING:  # a no-op build never imports the planner
    from kiln.plan.steps import Plan

FORMAT = 2
_KEYS = {"format", "manifest", "model", "steps", "code", "tools", "folders", "links", "lookups", "files", "symlinks", "report"}


def entry_path(root: Path, manifest: Path) -> Path:
    """build/.kiln/fresh/<stem>-<hash of the workspace-relative path>.json: one file per manifest, so
    building one manifest rewrites only its own entry."""
    where = _rel(Path(manifest), root)
    return state_dir(root) / "fresh" / f"{Path(where).stem}-{sha256_text(where)[:12]}.json"


@functools.cache
def code_fingerprint() -> str:
    """Changes whenever kiln's code could plan or key differently: the size and mtime of every
    Python file of kiln and kiln.build_rules, of the native extension, the Python version, and the
    versions of pydantic (its defaults fill params) and doit."""
    folders = {Path(kiln.__file__).parent}
    rules = importlib.util.find_spec("kiln.build_rules")
    if rules is not None:
        folders.update(Path(p) for p in rules.submodule_search_locations or [])
    files = sorted(str(p) for folder in folders for p in folder.rglob("*.py"))
    native = importlib.util.find_spec("kiln._native")
    if native is not None and native.origin:
        files.append(native.origin)
    stats = [(name, st.st_size, st.st_mtime_ns) for name in files for st in [os.stat(name)]]
    return sha256_text(json.dumps([sys.version, tool_version("pydantic"), tool_version("doit"), stats]))


# ---- after a build: remember ---------------------------------------------------------------------

def remember(plan: Plan, noop_report: dict[str, Any]) -> None:
    """Record the closure of a manifest all of whose steps are up to date now (called by the
    reporter, after the lockfile and provenance were written, under the workspace's build lock).

    Every digest is the one this build decided on, never a read at the end: the manifest bytes it
    parsed, the input digests in the step records' keys, the output digests the records hold. So a
    file edited while the build ran is remembered as it was, and the next build plans it."""
    path = entry_path(plan.root, plan.manifest)
    try:
        entry = _closure(plan, noop_report)
    except OSError:  # a file went away while the build ran: nothing true to remember
        entry = None
    if entry is None:
        path.unlink(missing_ok=True)
        return
    write_json_atomic(path, entry, durable=False)  # a lost entry costs one full check, nothing more


def _closure(plan: Plan, noop_report: dict[str, Any]) -> dict[str, Any] | None:
    records = [read_record(plan.root, s) for s in plan.steps]
    resolved = plan.resolved
    if plan.skipped or resolved is None or plan.manifest_sha256 is None or any(r is None or r.hardware is not None for r in records):
        return None
    known = {_rel(plan.manifest, plan.root): plan.manifest_sha256}  # file -> the digest this build used
    read: set[Path] = set()
    made = {lock_path(plan)} | {p.parent / FILE for _, p in plan.artifacts()}
    for step, record in zip(plan.steps, records):
        for role, files in step.inputs.items():
            read.update(files)
            for file, sha256 in zip(files, record.input_digests(role)):
                known.setdefault(_rel(file, plan.root), sha256)
        known.update((out["path"], out["sha256"]) for out in record.outputs.values())
        made.update(step.outputs.values())
        made.add(record_path(plan.root, step))
    # what a user edits first, so a changed manifest or source is found before any artifact is hashed
    files = [_rel(f, plan.root) for f in [plan.manifest, *sorted(read - made - {plan.manifest}), *sorted(made)]]
    folders = [resolved.listed_folder] if resolved.listed_folder else []
    return {
        "format": FORMAT,
        "manifest": files[0],
        "model": plan.model,
        "steps": len(plan.steps),
        "code": code_fingerprint(),
        "tools": tools_of(records),
        "folders": {_rel(f, plan.root): mtime_ns for f, mtime_ns in folders},
        "links": [[_rel(named, plan.root), _rel(target, plan.root)] for named, target in resolved.aliases],
        "lookups": [[kind, name, [_rel(f, plan.root) for f in folders], found] for kind, name, folders, found in resolved.lookups],
        # in checking order; files that were symlinks (a Hugging Face cache snapshot) may stay so
        "files": [[name, known.get(name) or digest(plan.root, plan.root / name)] for name in files],
        "symlinks": [name for name in files if not _made(name) and os.path.islink(plan.root / name)],
        # the no-op report, already encoded: publishing it is two substitutions and a write
        "report": report_template(noop_report),
    }


def forget(plan: Plan) -> None:
    """A manifest that did not finish cleanly: drop its entry (it would not match anyway; this keeps
    build/.kiln/fresh/ saying only true things)."""
    entry_path(plan.root, plan.manifest).unlink(missing_ok=True)


# ---- before a build: check ------------------------------------------------------------------------

def unchanged(root: Path, manifests: list[Path]) -> dict[Path, dict[str, Any]]:
    """manifest -> its entry, for each manifest whose whole closure is as its last build left it."""
    found = {}
    for manifest in manifests:
        entry = read_json(entry_path(root, manifest))
        try:
            if isinstance(entry, dict) and _KEYS <= entry.keys() and _holds(root, manifest, entry):
                found[manifest] = entry
        except (KeyError, TypeError, ValueError, AttributeError):  # an entry of another kiln, or edited by hand: plan it
            pass
    return found


def _holds(root: Path, manifest: Path, entry: dict[str, Any]) -> bool:
    if entry.get("format") != FORMAT or entry["manifest"] != _rel(manifest, root) or entry["code"] != code_fingerprint():
        return False
    if any(tool_version(name) != version for name, version in entry["tools"].items()):
        return False
    for named, target in entry["links"]:
        if os.path.realpath(os.path.join(root, named)) != os.path.join(root, target):
            return False  # a symlink the manifest names was re-pointed
    for kind, name, folders, was in entry["lookups"]:
        if lookup(kind, name, [root / f for f in folders]) != was:
            return False  # the factory's module or a pkg: package would be found elsewhere now
    for folder, mtime_ns in entry["folders"].items():
        try:
            if os.stat(root / folder).st_mtime_ns != mtime_ns:
                return False  # a file was added to or removed from a model folder
        except OSError:
            return False
    base, symlinks = os.fspath(root), set(entry["symlinks"])
    for name, sha256 in entry["files"]:
        path = os.path.join(base, name)  # strings: thousands of files, no pathlib
        try:
            if not _made(name) and os.path.islink(path) != (name in symlinks):
                return False  # e.g. a file the plan read is now a symlink: the plan would name its target
            if digest(root, path) != sha256:
                return False
        except OSError:
            return False
    return True


def templates(entries: dict[Path, dict[str, Any]]) -> list[tuple[str, int, str]]:
    """(model, steps, encoded no-op report) of unchanged manifests, for kiln.state.report.publish_unchanged."""
    return [(entry["model"], entry["steps"], entry["report"]) for entry in entries.values()]


def _made(name: str) -> bool:
    """Whether a closure file is one kiln writes (everything under build/), not one the user gives."""
    return name.startswith("build/")


def _rel(path: Path, root: Path) -> str:
    """Workspace-relative where possible (a copied workspace keeps its entries), else absolute."""
    return workspace_path(path, root) or os.fspath(path)
