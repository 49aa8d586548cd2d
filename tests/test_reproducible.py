"""Byte-identical rebuilds: every manifest in manifests/, built from scratch in two different
directories (each with its own cache), gives the same sha256 for every artifact it locks (ONNX at
every precision, SafeTensors, TorchScript, torch.export, OpenVINO IR, sklearn ONNX) and the same
provenance statements."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, Workspace, example_workspace

MANIFESTS = sorted(p.stem for p in (REPO / "manifests").glob("*.toml"))


def locked(ws: Workspace, model: str) -> dict[str, str]:
    lock = json.loads((ws.root / "build" / model / "kiln.lock.json").read_text())
    files = {}
    for artifact in lock["artifacts"]:
        for entry in [artifact] + [v for v in artifact.values() if isinstance(v, dict) and "sha256" in v]:
            files[entry["path"]] = entry["sha256"]
    return files


@pytest.mark.slow
def test_two_clean_builds_of_every_manifest_are_byte_identical(built_bert, tmp_path):
    second = example_workspace(tmp_path / "second", *MANIFESTS)
    second.doit("build")  # every manifest (GPU targets are skipped where there is no GPU)
    first_small = example_workspace(tmp_path / "first", *[m for m in MANIFESTS if m not in ("bert", "bert_tensorrt")])
    first_small.doit("build")
    pairs = [(built_bert, "bert")] + [(first_small, json.loads((second.root / "build" / m / "kiln.lock.json").read_text())["model"])
                                      for m in MANIFESTS if m not in ("bert", "bert_tensorrt")]
    compared = 0
    for first, model in pairs:
        a, b = locked(first, model), locked(second, model)
        assert a == b, {path: (a.get(path), b.get(path)) for path in set(a) | set(b) if a.get(path) != b.get(path)}
        for path in a:
            statement = f"{path.rsplit('/', 1)[0]}/provenance.intoto.json"
            assert (first.root / statement).read_bytes() == (second.root / statement).read_bytes(), statement
        compared += len(a)
    assert compared >= 20
