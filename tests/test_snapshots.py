"""Golden snapshots that pin what a restructuring of kiln must not change.

- Every example manifest's plan: step id, rule, rule version, params, inputs and outputs
  (workspace-relative), deps, targets, and the key components a step's key is made of besides
  file digests (tool names, whether hardware facts enter). Equal ids and components mean an
  existing workspace stays up to date after the change.
- `kiln schema`: the manifest JSON Schema, unions in the same order (so the first error a bad
  manifest gets is the same).

Regenerate (only for an intended change, and say why in the commit): KILN_UPDATE_GOLDEN=1 pytest
tests/test_snapshots.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from conftest import REPO, example_workspace

GOLDEN = Path(__file__).parent / "golden"
EXAMPLES = sorted(p.stem for p in (REPO / "manifests").glob("*.toml"))
OPTIONAL_MODULES = ("tensorrt", "openvino", "sklearn", "skl2onnx")  # planning checks they exist; the plan does not depend on them


def _matches_golden(name: str, found) -> None:
    path = GOLDEN / name
    text = json.dumps(found, indent=1, sort_keys=True) + "\n"
    if os.environ.get("KILN_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    expected = json.loads(path.read_text())
    assert found == expected, f"{name} differs from the golden snapshot (tests/golden/{name})"


def _where(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else f"<outside>/{path.name}"


def _snapshot(plans, root: Path) -> dict:
    from kiln.rules import get_rule

    found = {}
    for plan in plans:
        steps = []
        for step in plan.steps:
            rule = get_rule(step.rule)
            steps.append({
                "id": step.id, "rule": step.rule, "version": rule.version, "params": step.params,
                "inputs": {role: [_where(p, root) for p in files] for role, files in step.inputs.items()},
                "outputs": {role: _where(p, root) for role, p in step.outputs.items()},
                "deps": step.deps, "targets": step.targets, "shared_with": [list(pair) for pair in step.shared_with],
                "name": plan.step_name(step),
                "tools": sorted(set(rule.tools_for(step.params)) | {"kiln"}),
                "hardware": rule.hardware_for(step.params) is not None,
            })
        found[plan.model] = {"manifest": _where(plan.manifest, root), "steps": steps,
                             "artifacts": [[target, _where(p, root)] for target, p in plan.artifacts()]}
    return found


def test_every_example_manifest_plans_the_steps_of_the_snapshot(tmp_path: Path, monkeypatch):
    from kiln.plan.load import load_plans

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in OPTIONAL_MODULES else real(name, *a))
    ws = example_workspace(tmp_path / "ws", *EXAMPLES)
    plans = load_plans(ws.root, ",".join(EXAMPLES))  # named: every target, TensorRT's included
    _matches_golden("plans.json", _snapshot(plans, ws.root))


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_example_manifest_alone_plans_the_same_steps(tmp_path: Path, monkeypatch, name: str):
    """Planned alone, a manifest's steps are those of the snapshot (sharing never changes an id)."""
    from kiln.plan.load import load_plans

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *a: object() if module in OPTIONAL_MODULES else real(module, *a))
    ws = example_workspace(tmp_path / "ws", name)
    (plan,) = load_plans(ws.root, name)
    golden = json.loads((GOLDEN / "plans.json").read_text())[plan.model]
    assert [s.id for s in plan.steps] == [s["id"] for s in golden["steps"]]


def test_the_manifest_schema_is_the_snapshot():
    from kiln.define.spec import json_schema

    _matches_golden("schema.json", json_schema())
