"""ONNX with external data end to end (options.external_data): every ONNX step writes model.onnx +
model.onnx.data, which are hashed, locked, published and listed in provenance together. The fast
tests force it on a small model; the slow one builds a random-weight model just over protobuf's
2 GiB limit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import Workspace, new_workspace

# A small MLP: weights above onnx's 1 KiB inline threshold, so they go to the data file.
SMALL_NET = '''
import torch

def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
'''

# ~537M float32 parameters (2 GiB) in 8 Linear layers of 8192 x 8192 (256 MiB each): just over
# protobuf's 2 GiB. Seeded: the same bytes each build.
BIG_NET = '''
import torch

def build():
    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        layer = torch.nn.Linear(8192, 8192, bias=False)
        torch.nn.init.normal_(layer.weight, std=8192 ** -0.5)
        layers += [layer, torch.nn.Tanh()]
    return torch.nn.Sequential(*layers)
'''

MANIFEST = '''
[model]
name = "{name}"

[source]
kind = "torch"
factory = "{module}:build"

[[inputs]]
name = "features"
dtype = "float32"
shape = ["batch", {width}]

[[outputs]]
name = "scores"
shape = ["batch", {out}]

{targets}

[validation]
data = "data/{name}.npz"
batch_size = 4
'''


def target(name: str, fmt: str, precision: str, external: str = "true") -> str:
    return f'[targets.{name}]\nformat = "{fmt}"\nprecision = "{precision}"\noptions = {{ external_data = {external} }}\n'


SMALL_TARGETS = "\n".join([
    target("onnx_fp32", "onnx", "fp32"), target("onnx_fp16", "onnx", "fp16"), target("onnx_int8", "onnx", "int8"),
    target("onnx_int4", "onnx", "int4"), target("openvino_fp32", "openvino", "fp32"),
    '[targets.onnx_int8_static]\nformat = "onnx"\nprecision = "int8"\noptions = { external_data = true, quantization = "static" }\n',
])
ONNX_TARGETS = ("onnx_fp32", "onnx_fp16", "onnx_int8", "onnx_int4", "onnx_int8_static")


def workspace(root: Path, name: str, module: str, code: str, width: int, out: int, targets: str, samples: int, calibration: bool = False) -> Workspace:
    text = MANIFEST.format(name=name, module=module, width=width, out=out, targets=targets)
    if calibration:
        text += f'\n[calibration]\ndata = "data/{name}.npz"\nbatch_size = 4\n'
    ws = new_workspace(root, {name: text})
    (ws.root / f"{module}.py").write_text(code)
    rng = np.random.default_rng(3)
    np.savez(ws.root / "manifests" / "data" / f"{name}.npz", features=rng.standard_normal((samples, width)).astype(np.float32))
    return ws


def small_workspace(root: Path) -> Workspace:
    return workspace(root, "ext", "smallnet", SMALL_NET, 32, 8, SMALL_TARGETS, 12, calibration=True)


@pytest.fixture(scope="module")
def built_small(tmp_path_factory) -> Workspace:
    ws = small_workspace(tmp_path_factory.mktemp("ext") / "ws")
    ws.doit("build", "manifest=manifests/ext.toml")
    return ws


def published_bytes(ws: Workspace) -> dict[str, bytes]:
    folder = ws.root / "build" / "ext"
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name.startswith("model.")}


def test_every_onnx_step_writes_the_model_and_one_data_file(built_small):
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    steps = built_small.root / "build" / ".steps"
    onnx_steps = [folder for folder in steps.iterdir() if (folder / "model.onnx").exists()]
    rules = sorted(folder.name.split("-")[0] for folder in onnx_steps)
    assert rules == ["convert_fp16", "export_onnx", "quantize_dynamic", "quantize_int4", "quantize_static"]  # no simplify_onnx
    for folder in onnx_steps:
        assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.onnx.data"], folder  # no temp or stray file
        model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        locations = {ExternalDataInfo(t).location for t in _get_all_tensors(model) if uses_external_data(t)}
        assert locations == {"model.onnx.data"}, folder  # the final name, not the temp one
        assert (folder / "model.onnx.data").stat().st_size > 0


def test_published_folders_hold_both_files_and_pass_the_checker(built_small):
    import onnx

    for name in ONNX_TARGETS:
        folder = built_small.root / "build" / "ext" / name
        assert (folder / "model.onnx.data").stat().st_size > 0, name
        onnx.checker.check_model(str(folder / "model.onnx"), full_check=True)
        assert json.loads((folder / "validation.json").read_text())["passed"] is True
    assert (built_small.root / "build" / "ext" / "openvino_fp32" / "model.bin").exists()


def test_the_lockfile_and_provenance_list_the_data_file(built_small):
    import hashlib

    build = built_small.root / "build"
    lock = json.loads((build / "ext" / "kiln.lock.json").read_text())
    locked = {a["data"]["path"]: a["data"]["sha256"] for a in lock["artifacts"] if "data" in a}
    for name in ONNX_TARGETS:
        data = build / "ext" / name / "model.onnx.data"
        path = str(data.relative_to(built_small.root))
        assert locked[path] == hashlib.sha256(data.read_bytes()).hexdigest(), path
        statement = json.loads((build / "ext" / name / "provenance.intoto.json").read_text())
        assert path in {s["name"] for s in statement["subject"]}
    assert built_small.kiln("verify").returncode == 0


def test_a_rebuild_runs_nothing(built_small):
    built_small.doit("build", "manifest=manifests/ext.toml")
    assert built_small.ran("ext") == []


def test_two_builds_write_identical_bytes(built_small, tmp_path):
    again = small_workspace(tmp_path / "again")
    again.doit("build", "manifest=manifests/ext.toml")
    assert published_bytes(again) == published_bytes(built_small)


def test_external_data_off_keeps_one_file(tmp_path):
    ws = workspace(tmp_path / "ws", "ext", "smallnet", SMALL_NET, 32, 8, target("onnx_fp16", "onnx", "fp16", '"auto"'), 12)
    ws.doit("build", "manifest=manifests/ext.toml")
    assert sorted(p.name for p in (ws.root / "build" / "ext" / "onnx_fp16").iterdir() if p.name.startswith("model")) == ["model.onnx"]


# The chain below peaked at 9 GB in its folder; with less free than this the build would fail with
# ENOSPC half-way (a machine problem, not kiln's), so the test says so and skips instead.
BIG_BUILD_NEEDS = 12 * 2 ** 30


@pytest.mark.slow
def test_a_model_over_2_gib_builds_end_to_end(tmp_path):
    """fp32, int8 and OpenVINO from a 2.01 GiB random-weight model, every artifact validated.
    Forced with external_data = true: a factory's size is unknown at plan time ("auto" is off)."""
    free = shutil.disk_usage(tmp_path).free
    if free < BIG_BUILD_NEEDS:
        pytest.skip(f"{free / 2 ** 30:.1f} GiB free under {tmp_path}, the 2 GiB build needs {BIG_BUILD_NEEDS / 2 ** 30:.0f} GiB")
    targets = "\n".join([target("onnx_fp32", "onnx", "fp32"), target("onnx_int8", "onnx", "int8"), target("openvino_fp32", "openvino", "fp32")])
    # fp16 and int4 are tested on the small forced model (test_published_folders_...): the whole chain
    # here took 3 min and 9 GB peak; fp32 -> int8 -> OpenVINO covers the export, a conversion and OpenVINO.
    ws = workspace(tmp_path / "ws", "big", "bignet", BIG_NET, 8192, 8192, targets, 4)
    ws.doit("build", "manifest=manifests/big.toml")
    folder = ws.root / "build" / "big"
    assert (folder / "onnx_fp32" / "model.onnx.data").stat().st_size >= 2 ** 31  # protobuf's limit is 2 ** 31 - 1
    assert (folder / "onnx_fp32" / "model.onnx").stat().st_size < 1 << 20
    for name in ("onnx_fp32", "onnx_int8", "openvino_fp32"):
        assert json.loads((folder / name / "validation.json").read_text())["passed"] is True, name


# ---- an ONNX source whose weights are in external data files --------------------------------

ONNX_SOURCE = '''
[model]
name = "exts"

[source]
kind = "onnx"
path = "models/ext_source/net.onnx"

[[inputs]]
name = "features"
dtype = "float32"
shape = ["batch", 32]

[[outputs]]
name = "scores"
shape = ["batch", 8]

[targets.as_is]
format = "onnx"
options = {{ simplify = false }}

[targets.onnx_fp16]
format = "onnx"
precision = "fp16"

[validation]
data = "data/exts.npz"
batch_size = 4
'''


def onnx_source_workspace(root: Path, location: str = "net.weights") -> Workspace:
    """The small MLP as an ONNX file whose tensors live in models/ext_source/<location>."""
    import onnx
    import torch

    ws = new_workspace(root, {"exts": ONNX_SOURCE.format()})
    folder = ws.root / "manifests" / "models" / "ext_source"
    folder.mkdir(parents=True)
    namespace: dict = {}
    exec(SMALL_NET, namespace)
    torch.onnx.export(namespace["build"]().eval(), (torch.zeros(2, 32),), str(folder / "plain.onnx"), input_names=["features"],
                      output_names=["scores"], dynamic_axes={"features": {0: "batch"}, "scores": {0: "batch"}}, dynamo=False)
    model = onnx.load(str(folder / "plain.onnx"))
    (folder / "plain.onnx").unlink()
    onnx.save(model, str(folder / "net.onnx"), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=1024)
    rng = np.random.default_rng(4)
    np.savez(ws.root / "manifests" / "data" / "exts.npz", features=rng.standard_normal((8, 32)).astype(np.float32))
    return ws


def test_an_onnx_source_with_external_data_is_keyed_published_and_locked_with_it(tmp_path):
    import hashlib

    ws = onnx_source_workspace(tmp_path / "ws")
    ws.doit("build", "manifest=manifests/exts.toml")
    as_is = ws.root / "build" / "exts" / "as_is"
    assert (as_is / "net.weights").read_bytes() == (ws.root / "manifests/models/ext_source/net.weights").read_bytes()
    assert json.loads((as_is / "validation.json").read_text())["passed"] is True
    lock = json.loads((ws.root / "build" / "exts" / "kiln.lock.json").read_text())
    locked = {entry["path"]: entry["sha256"] for a in lock["artifacts"] for entry in a.values() if isinstance(entry, dict) and "sha256" in entry}
    assert locked["build/exts/as_is/net.weights"] == hashlib.sha256((as_is / "net.weights").read_bytes()).hexdigest()
    # new weights in the data file (the .onnx file unchanged) rebuild every target
    weights = ws.root / "manifests/models/ext_source/net.weights"
    data = bytearray(weights.read_bytes())
    data[-4:] = np.float32(0.5).tobytes()
    weights.write_bytes(bytes(data))
    ws.doit("build", "manifest=manifests/exts.toml")
    assert {s.split("/")[-1] for s in ws.ran("exts")} >= {"reference_outputs", "convert_fp16", "validate"}


def test_an_onnx_source_naming_a_missing_data_file_fails_at_check_time(tmp_path):
    ws = onnx_source_workspace(tmp_path / "ws")
    (ws.root / "manifests/models/ext_source/net.weights").unlink()
    proc = ws.kiln("check", "exts")
    assert proc.returncode == 2 and "source.path: 'net.onnx' keeps tensors in 'net.weights', which is not beside it" in proc.stderr
