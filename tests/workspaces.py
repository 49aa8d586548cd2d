"""Small workspaces and plans that several test files build on (tests/ is on sys.path: import them
by module name). Tiny models with fixed seeds, so whole chains run in seconds."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import numpy as np

from conftest import REPO, Workspace, new_workspace
from kiln.define.resolve import Resolved
from kiln.define.spec import validate
from kiln.plan.chains import plan
from kiln.schema.manifest import RawManifest

# ---- a torch factory (or any source line) with two ONNX targets ---------------------------------

TINYNET = '''
import torch

def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
'''

TINY_MANIFEST = '''
[model]
name = "{name}"

[source]
{source}

[[inputs]]
name = "features"
dtype = "float32"
shape = ["batch", 6]

[[outputs]]
name = "scores"
shape = ["batch", 3]

[targets.onnx_a]
format = "onnx"
opset = 17

[targets.onnx_b]
format = "onnx"
opset = 17
options = {{ simplify = false }}

[validation]
data = "data/tiny.npz"
batch_size = 16
'''


def tiny_workspace(root: Path, source: str, name: str = "tiny") -> Workspace:
    ws = new_workspace(root, {name: TINY_MANIFEST.format(name=name, source=source)})
    (ws.root / "tinynet.py").write_text(TINYNET)
    rng = np.random.default_rng(1)
    np.savez(ws.root / "manifests/data/tiny.npz", features=rng.standard_normal((40, 6)).astype(np.float32))
    return ws


# ---- two manifests sharing one torch source ------------------------------------------------------

TORCH_SOURCE = 'kind = "torch"\nfactory = "tinynet:build"'


def two_manifests(root: Path) -> Workspace:
    """a.toml and b.toml: the same torch source and data, the same two targets."""
    ws = new_workspace(root, {name: TINY_MANIFEST.format(name=name, source=TORCH_SOURCE) for name in ("a", "b")})
    (ws.root / "tinynet.py").write_text(TINYNET)
    np.savez(ws.root / "manifests/data/tiny.npz", features=np.random.default_rng(1).standard_normal((40, 6)).astype(np.float32))
    return ws


# ---- ONNX-file sources: a one-layer MLP per manifest ---------------------------------------------

MANIFEST = '''[model]
name = "{name}"

[source]
kind = "onnx"
path = "models/{name}.onnx"

[[inputs]]
name = "x"
shape = ["batch", 8]

[[outputs]]
name = "y"
shape = ["batch", 4]

[targets.fp32]
format = "onnx"

[validation]
data = "data/x.npz"
batch_size = 16
'''


def mlp(path: Path, seed: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = [numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name) for name, shape in (("W", (8, 4)), ("b", (4,)))]
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "W", "b"], ["y"])], "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def mlp_workspace(root: Path, names: tuple[str, ...] = ("a", "b")) -> Workspace:
    ws = new_workspace(root, {name: MANIFEST.format(name=name) for name in names})
    for seed, name in enumerate(names):
        mlp(ws.root / f"manifests/models/{name}.onnx", seed)
    np.savez(ws.root / "manifests/data/x.npz", x=np.random.default_rng(7).standard_normal((32, 8)).astype(np.float32))
    return ws


# ---- the default manifest, planned without touching the disk -------------------------------------

GOOD = tomllib.loads((REPO / "manifests/bert.toml").read_text())
ROOT = Path("/ws")
RESOLVED = Resolved((Path("/site/model/config.json"), Path("/site/model/model.safetensors")), ROOT / "manifests/data/sentences.txt", ROOT / "manifests/data/calibration.txt")


def make_plan(change=lambda d: None):
    data = copy.deepcopy(GOOD)
    change(data)
    return plan(validate(RawManifest(ROOT / "manifests/bert.toml", data)), RESOLVED, ROOT / "manifests/bert.toml", ROOT)
