"""Every ONNX file a build of an example manifest writes (published artifacts and intermediate step
outputs alike) passes onnx.checker.check_model(path, full_check=True): topologically sorted, typed,
shape-inferable. onnxruntime tolerates an unsorted graph; polygraphy, TensorRT's parser and the onnx
tools do not, so kiln must not publish one."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from conftest import REPO, Workspace, example_workspace

FAST = {"tinycnn", "sklearn_iris"}  # seconds to build; every other example is slow-marked
EXAMPLES = sorted(p.stem for p in (REPO / "manifests").glob("*.toml"))


def onnx_files(ws: Workspace) -> list[Path]:
    return sorted((ws.root / "build").rglob("*.onnx"))


def gpu_only(name: str) -> bool:
    """A manifest whose targets all need an NVIDIA GPU: `doit build` leaves them out on a CPU machine."""
    targets = tomllib.loads((REPO / "manifests" / f"{name}.toml").read_text()).get("targets", {})
    return bool(targets) and all(t.get("format") == "tensorrt" for t in targets.values())


def check_all(ws: Workspace) -> list[str]:
    import onnx

    checked = []
    for path in onnx_files(ws):
        try:
            onnx.checker.check_model(str(path), full_check=True)  # the path: the checker reads external data itself
        except Exception as err:
            raise AssertionError(f"{path.relative_to(ws.root)} fails the full ONNX checker: {err}") from None
        checked.append(str(path.relative_to(ws.root / "build")))
    return checked


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in EXAMPLES if n != "bert"])
def test_every_onnx_of_an_example_passes_the_full_checker(tmp_path, name):
    ws = example_workspace(tmp_path / "ws", name)
    ws.doit("build")  # every manifest of the workspace: GPU-only targets are left out here, with the reason
    if not onnx_files(ws) and gpu_only(name):
        pytest.skip(f"{name}: every target needs a GPU, none was built here")
    checked = check_all(ws)
    published = [p for p in checked if not p.startswith(".")]
    assert published, f"{name} published no ONNX artifact: {checked}"


@pytest.mark.slow
def test_every_onnx_of_bert_passes_the_full_checker(built_bert):
    checked = check_all(built_bert)
    for target in ("onnx_fp32", "onnx_fp16", "onnx_int8", "onnx_int8_static", "onnx_int4"):
        assert f"bert/{target}/model.onnx" in checked
