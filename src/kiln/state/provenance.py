"""Provenance for each published artifact: an in-toto Statement (v1) whose predicate is SLSA
provenance (v1), written next to the artifact as provenance.intoto.json after a successful build.

subject: the artifact's files and their sha256. resolvedDependencies (the materials): every file
the artifact's chain of steps read that no step of the chain made: the source model's files, the
validation and calibration data, the manifest itself. externalParameters: the manifest, model and
target, and each step's rule, params and key; internalParameters: the tool versions. No timestamps
and no absolute paths, so the statement is as reproducible as the artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import kiln
from kiln.base.hashing import canonical_json, sha256_text
from kiln.base.paths import relative, workspace_path
from kiln.state.records import StepRecord, read_record, tools_of

if TYPE_CHECKING:
    from kiln.plan.steps import Plan, Step

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:kiln:build-type:model-artifact:v1"
FILE = "provenance.intoto.json"


def statements(plan: Plan, manifest_sha256: str) -> dict[Path, dict[str, Any]]:
    """{where to write it: statement} for every published artifact of a complete build."""
    by_id = {s.id: s for s in plan.steps}
    records = {s.id: read_record(plan.root, s) for s in plan.steps}
    found = {}
    for step in plan.steps:
        if not step.publishes or records[step.id] is None:
            continue
        chain = _chain(step, by_id)
        if any(records[s.id] is None for s in chain):
            continue
        found[step.outputs["artifact"].parent / FILE] = _statement(plan, step, chain, records, manifest_sha256)
    return found


def _chain(last: Step, by_id: dict[str, Step]) -> list[Step]:
    """The step and every step it depends on, in plan order."""
    wanted, todo = set(), [last.id]
    while todo:
        current = todo.pop()
        if current not in wanted:
            wanted.add(current)
            todo.extend(by_id[current].deps)
    return [s for s in by_id.values() if s.id in wanted]


def _statement(plan: Plan, publish: Step, chain: list[Step], records: dict[str, StepRecord], manifest_sha256: str) -> dict[str, Any]:
    outputs = records[publish.id].outputs
    subject = [{"name": out["path"], "digest": {"sha256": out["sha256"]}} for role, out in sorted(outputs.items()) if role != "validation"]
    made = {p for s in chain for p in s.outputs.values()}
    materials = {relative(plan.manifest, plan.root): manifest_sha256}
    steps = []
    for step in chain:
        record = records[step.id]
        steps.append({"rule": step.rule, "key": record.key, "params": step.params} | (
            {"hardware": record.hardware} if record.hardware is not None else {}))
        for role, paths in step.inputs.items():
            for path, digest in zip(paths, record.input_digests(role)):
                if path not in made:
                    materials[_material_name(path, plan.root, step)] = digest
    return {
        "_type": STATEMENT_TYPE,
        "subject": subject,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"manifest": relative(plan.manifest, plan.root), "model": plan.model,
                                       "target": publish.targets[0], "steps": steps},
                "internalParameters": {"tools": tools_of(records[s.id] for s in chain)},
                "resolvedDependencies": [{"name": name, "digest": {"sha256": digest}} for name, digest in sorted(materials.items())],
            },
            "runDetails": {
                "builder": {"id": "urn:kiln:builder", "version": {"kiln": kiln.__version__}},
                "metadata": {"invocationId": sha256_text(canonical_json([s["key"] for s in steps]))},
            },
        },
    }


def _material_name(path: Path, root: Path, step: Step) -> str:
    """Workspace-relative; a file of an installed package by the manifest's pkg: path, so the
    statement does not depend on where site-packages is."""
    inside = workspace_path(path, root)
    if inside is not None:
        return inside
    source_path = (step.params.get("source") or {}).get("path", "")
    if source_path.startswith("pkg:"):
        return f"{source_path.rstrip('/')}/{path.name}"
    return f"outside-workspace/{path.name}"
