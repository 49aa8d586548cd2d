"""convert_sklearn and sklearn sources: manifests/sklearn_iris.toml builds an ONNX model that
onnxruntime runs to the estimator's own labels and probabilities; the bytes are reproducible; a
pickled estimator needs allow_pickle; a regressor and a mismatched output list behave."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import REPO, example_workspace, new_workspace
from pmml_workspaces import without_pmml
from kiln.errors import ManifestError
from kiln.schema.manifest import RawManifest
from kiln.define.spec import validate

IRIS = without_pmml((REPO / "manifests/sklearn_iris.toml").read_text())  # these tests are about ONNX (no Java)


def iris_workspace(path: Path):
    ws = example_workspace(path, "sklearn_iris")
    ws.manifest("sklearn_iris").write_text(IRIS)
    return ws


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_iris_classifier_converts_and_matches_the_estimator(tmp_path: Path):
    ws = iris_workspace(tmp_path / "ws")
    ws.doit("build")
    report = ws.report("sklearn_iris")
    assert report["ok"] and [s["rule"] for s in report["steps"]] == ["reference_outputs", "convert_sklearn", "validate"]
    metrics = report["artifacts"][0]["metrics"]
    assert metrics["label"]["max_abs_diff"] == 0.0  # every held-out flower gets the estimator's class
    assert metrics["probabilities"]["max_abs_diff"] < 1e-6 and metrics["probabilities"]["rows"] == 50
    model = onnx.load(str(ws.root / "build/sklearn_iris/onnx/model.onnx"))
    assert [o.name for o in model.graph.output] == ["label", "probabilities"]
    assert sorted(o.domain for o in model.opset_import) == ["", "ai.onnx.ml"]  # one import per domain
    assert {n.op_type for n in model.graph.node} >= {"Scaler", "LinearClassifier"}
    assert [line for line in ws.doit("build").stdout.splitlines() if line.startswith(".  ")] == []


def test_the_onnx_bytes_are_identical_across_workspaces(tmp_path: Path):
    a, b = iris_workspace(tmp_path / "a"), iris_workspace(tmp_path / "b")
    a.doit("build")
    b.doit("build")  # skl2onnx names graphs with a random UUID; kiln names it
    assert sha256(a.root / "build/sklearn_iris/onnx/model.onnx") == sha256(b.root / "build/sklearn_iris/onnx/model.onnx")


def test_a_pickled_estimator_needs_allow_pickle(tmp_path: Path):
    import joblib

    from manifests_models import iris_build

    ws = iris_workspace(tmp_path / "ws")
    joblib.dump(iris_build(), ws.root / "manifests/iris.joblib")
    ws.edit('factory = "models.iris:build"', 'path = "iris.joblib"', name="sklearn_iris")
    proc = ws.doit("build", check=False)
    assert proc.returncode == 2 and "sklearn_iris.toml: source.allow_pickle: 'iris.joblib' is a pickled estimator" in proc.stderr
    assert not (ws.root / "build").exists()
    ws.edit('path = "iris.joblib"', 'path = "iris.joblib"\nallow_pickle = true', name="sklearn_iris")
    ws.doit("build")
    assert ws.report("sklearn_iris")["artifacts"][0]["metrics"]["label"]["max_abs_diff"] == 0.0


REGRESSOR = '''
import numpy as np
from sklearn.linear_model import Ridge

def build():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 5))
    return Ridge(alpha=0.5).fit(x, x @ np.arange(1.0, 6.0) + 0.1 * rng.standard_normal(64))
'''

REGRESSOR_MANIFEST = '''
[model]
name = "ridge"
[source]
kind = "sklearn"
factory = "ridge:build"
[[inputs]]
name = "x"
shape = ["batch", 5]
[[outputs]]
name = "y"
shape = ["batch", 1]
{more_outputs}
[targets.onnx]
format = "onnx"
[validation]
data = "data/ridge.npz"
batch_size = 10
'''


def _ridge_workspace(root: Path, more_outputs: str = ""):
    ws = new_workspace(root, {"ridge": REGRESSOR_MANIFEST.format(more_outputs=more_outputs)})
    (ws.root / "ridge.py").write_text(REGRESSOR)  # a factory at the workspace root
    np.savez(ws.root / "manifests/data/ridge.npz", x=np.random.default_rng(1).standard_normal((30, 5)).astype(np.float32))
    return ws


def test_a_regressor_validates_its_predictions_as_a_column(tmp_path: Path):
    ws = _ridge_workspace(tmp_path / "ws")
    ws.doit("build")
    metrics = ws.report("ridge")["artifacts"][0]["metrics"]["y"]
    assert metrics["rows"] == 30 and metrics["max_abs_diff"] < 1e-4


def test_more_declared_outputs_than_the_estimator_gives_fail_with_both_lists(tmp_path: Path):
    ws = _ridge_workspace(tmp_path / "ws", '[[outputs]]\nname = "z"\nshape = ["batch", 1]')
    proc = ws.doit("build", check=False)
    assert proc.returncode == 1
    assert "Ridge gives 1 outputs but the manifest declares 2: ['y', 'z']" in proc.stdout + proc.stderr
    assert not (ws.root / "build/ridge/onnx").exists()


@pytest.mark.parametrize("old,new,key,text", [
    ('format = "onnx"                                # a sklearn', 'format = "openvino"  #', "targets.onnx.format", "'openvino' is not allowed; expected format = \"onnx\" with precision = \"fp32\" for a sklearn source"),
    ('format = "onnx"                                # a sklearn', 'format = "torchscript"  #', "targets.onnx.opset", "unknown key"),
    ('opset = 17', 'opset = 17\nprecision = "fp16"', "targets.onnx.precision", "with precision = \"fp32\" for a sklearn source"),
    ('factory = "models.iris:build"', 'factory = "models.iris:build"\npath = "x.joblib"', "source.factory", "exactly one of source.factory"),
    ('factory = "models.iris:build"', '', "source.factory", "exactly one of source.factory"),
    ('[[outputs]]\nname = "label"', '[[inputs]]\nname = "more"\n\n[[outputs]]\nname = "label"', "inputs", "one input for a sklearn source"),
])
def test_bad_sklearn_manifests_name_the_key(old, new, key, text):
    import tomllib

    assert old in IRIS
    with pytest.raises(ManifestError) as caught:
        validate(RawManifest(Path("/ws/manifests/sklearn_iris.toml"), tomllib.loads(IRIS.replace(old, new, 1))))
    assert f"sklearn_iris.toml: {key}: " in str(caught.value) and text in str(caught.value)


def test_a_missing_extra_is_named_with_its_install_command(tmp_path: Path, monkeypatch):
    import importlib.util

    from kiln.schema.manifest import read_manifest
    from kiln.define.resolve import resolve

    ws = iris_workspace(tmp_path / "ws")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skl2onnx" else real(name, *a))
    raw = read_manifest(ws.manifest("sklearn_iris"))
    with pytest.raises(ManifestError, match=r"source\.kind: source kind 'sklearn' needs the 'skl2onnx' package, which is not installed; install it with: pip install 'kiln\[sklearn\]'"):
        resolve(validate(raw), raw, ws.root)
