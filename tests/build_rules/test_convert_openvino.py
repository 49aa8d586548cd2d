"""convert_openvino on a tiny torch factory: IR published as model.xml + model.bin, validated with
OpenVINO's CPU runtime, byte-identical across workspaces; a missing extra fails before any step."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from kiln.errors import ManifestError
from kiln.schema.manifest import read_manifest
from kiln.define.resolve import resolve
from kiln.define.spec import validate
from test_export_torch import torch_workspace

TARGETS = '''
[targets.ov32]
format = "openvino"

[targets.ov16]
format = "openvino"
precision = "fp16"
'''


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ir_is_published_whole_validated_and_locked(tmp_path: Path):
    ws = torch_workspace(tmp_path / "ws", TARGETS)
    ws.doit("build")
    report = ws.report("tiny")
    assert report["ok"]
    for target, diff in (("ov32", 1e-5), ("ov16", 1e-2)):
        folder = ws.root / "build/tiny" / target
        assert sorted(p.name for p in folder.iterdir()) == ["model.bin", "model.xml", "provenance.intoto.json", "validation.json"]
        (artifact,) = [a for a in report["artifacts"] if a["target"] == target]
        assert artifact["metrics"]["scores"]["max_abs_diff"] <= diff and artifact["bytes"] == (folder / "model.xml").stat().st_size + (folder / "model.bin").stat().st_size
    assert (ws.root / "build/tiny/ov16/model.bin").stat().st_size < 0.6 * (ws.root / "build/tiny/ov32/model.bin").stat().st_size
    lock = json.loads((ws.root / "build/tiny/kiln.lock.json").read_text())
    for entry in lock["artifacts"]:
        assert entry["weights"]["sha256"] == sha256(ws.root / entry["weights"]["path"])
    assert [line for line in ws.doit("build").stdout.splitlines() if line.startswith(".  ")] == []


def test_bytes_are_identical_across_workspaces(tmp_path: Path):
    a, b = torch_workspace(tmp_path / "a", TARGETS), torch_workspace(tmp_path / "b", TARGETS)
    a.doit("build")
    b.doit("build")
    for rel in ("ov32/model.xml", "ov32/model.bin", "ov16/model.xml", "ov16/model.bin"):
        assert sha256(a.root / "build/tiny" / rel) == sha256(b.root / "build/tiny" / rel), rel


def test_a_missing_extra_fails_at_plan_time_with_the_install_command(tmp_path: Path, monkeypatch):
    ws = torch_workspace(tmp_path / "ws", TARGETS)
    raw = read_manifest(ws.manifest("tiny"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(ManifestError) as caught:
        resolve(validate(raw), raw, ws.root)
    assert str(caught.value) == f"{ws.manifest('tiny')}: targets.ov32.format: 'openvino' needs the 'openvino' package, which is not installed; install it with: pip install 'kiln[openvino]'"
