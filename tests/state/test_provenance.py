"""kiln verify and the provenance statements: every published artifact gets an in-toto Statement
with a SLSA provenance predicate naming its digest, its materials and the steps that made it;
verify re-hashes everything the lockfile lists and exits 1 on any drift."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from workspaces import two_manifests


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_each_artifact_has_a_statement_naming_its_digest_and_materials(tmp_path: Path):
    ws = two_manifests(tmp_path / "ws")
    ws.doit("build", "manifest=a")
    statement = json.loads((ws.root / "build/a/onnx_a/provenance.intoto.json").read_text())
    assert statement["_type"] == "https://in-toto.io/Statement/v1" and statement["predicateType"] == "https://slsa.dev/provenance/v1"
    assert statement["subject"] == [{"name": "build/a/onnx_a/model.onnx", "digest": {"sha256": sha256(ws.root / "build/a/onnx_a/model.onnx")}}]
    definition = statement["predicate"]["buildDefinition"]
    materials = {m["name"]: m["digest"]["sha256"] for m in definition["resolvedDependencies"]}
    assert materials == {name: sha256(ws.root / name) for name in ("manifests/a.toml", "manifests/data/tiny.npz", "tinynet.py")}
    assert [s["rule"] for s in definition["externalParameters"]["steps"]] == ["reference_outputs", "export_onnx", "simplify_onnx", "validate"]
    assert definition["externalParameters"]["steps"][1]["params"]["opset"] == 17
    assert {"torch", "onnx", "kiln"} <= set(definition["internalParameters"]["tools"])
    lock = json.loads((ws.root / "build/a/kiln.lock.json").read_text())
    keys = {s["key"] for s in lock["steps"]}
    assert {s["key"] for s in definition["externalParameters"]["steps"]} <= keys


def test_statements_are_reproducible_across_workspaces(tmp_path: Path):
    first, second = two_manifests(tmp_path / "one"), two_manifests(tmp_path / "two")
    first.doit("build", "manifest=a")
    second.doit("build", "manifest=a")
    for target in ("onnx_a", "onnx_b"):
        rel = f"build/a/{target}/provenance.intoto.json"
        assert (first.root / rel).read_bytes() == (second.root / rel).read_bytes()


def test_verify_passes_on_a_clean_build_and_names_every_drift(tmp_path: Path):
    ws = two_manifests(tmp_path / "ws")
    assert ws.kiln("verify", "a").returncode == 1  # nothing built: no lockfile
    ws.doit("build", "manifest=a")
    ok = ws.kiln("verify", "a")
    assert ok.returncode == 0 and "build/a/kiln.lock.json: ok: 2 artifacts match" in ok.stdout
    artifact = ws.root / "build/a/onnx_b/model.onnx"
    artifact.unlink()
    artifact.write_bytes(b"not the model")  # a new file: the cached object stays intact
    (ws.root / "build/a/onnx_a/model.onnx").unlink()
    bad = ws.kiln("verify", "a")
    assert bad.returncode == 1
    assert "kiln: drift: build/a/onnx_b/model.onnx: sha256 " in bad.stderr and "differs from the locked" in bad.stderr
    assert "kiln: drift: build/a/onnx_a/model.onnx: missing" in bad.stderr
    ws.doit("build", "manifest=a")  # the build puts the locked bytes back (from the cache)
    assert ws.kiln("verify", "a").returncode == 0
