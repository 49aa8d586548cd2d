"""convert_trees: manifests/xgboost_breast_cancer.toml and manifests/lightgbm_diabetes.toml build ONNX
that onnxruntime runs to the libraries' own labels, probabilities and values; the bytes are
reproducible; LightGBM's double thresholds survive the float32 tree operators; a model that is not
the one the reference ran fails validation and publishes nothing."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from pmml_workspaces import without_pmml
from conftest import REPO, new_workspace

pytest.importorskip("xgboost")
pytest.importorskip("lightgbm")
pytest.importorskip("onnxmltools")

EXAMPLES = ("xgboost_breast_cancer", "lightgbm_diabetes")


def trees_workspace(path: Path, *names: str):
    return new_workspace(path, {name: without_pmml((REPO / "manifests" / f"{name}.toml").read_text()) for name in names})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    ws = trees_workspace(tmp_path_factory.mktemp("trees") / "ws", *EXAMPLES)
    ws.doit("build")
    return ws


def test_the_xgboost_classifier_gives_the_same_labels_and_probabilities(built):
    report = built.report("xgboost_breast_cancer")
    assert report["ok"] and [s["rule"] for s in report["steps"]] == ["reference_outputs", "convert_trees", "validate"]
    metrics = report["artifacts"][0]["metrics"]
    assert metrics["label"]["max_abs_diff"] == 0.0  # every held-out row gets XGBoost's class
    assert metrics["probabilities"]["rows"] == 100 and metrics["probabilities"]["max_abs_diff"] < 1e-6
    model = onnx.load(str(built.root / "build/xgboost_breast_cancer/onnx/model.onnx"))
    assert [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output] == [("label", onnx.TensorProto.INT64), ("probabilities", onnx.TensorProto.FLOAT)]
    assert {n.op_type for n in model.graph.node} >= {"TreeEnsembleClassifier"} and "ZipMap" not in {n.op_type for n in model.graph.node}
    assert all(o.version <= 15 for o in model.opset_import if o.domain == "")  # onnxmltools' highest


def test_the_lightgbm_regressor_gives_its_values_as_a_column(built):
    metrics = built.report("lightgbm_diabetes")["artifacts"][0]["metrics"]["progression"]
    assert metrics["rows"] == 100 and metrics["max_rel_diff"] < 1e-6  # values in the hundreds, float32 sums
    model = onnx.load(str(built.root / "build/lightgbm_diabetes/onnx/model.onnx"))
    dims = [[d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output]
    assert [o.name for o in model.graph.output] == ["progression"] and dims == [["batch", 1]]
    assert sorted((o.domain, o.version) for o in model.opset_import)[1] == ("ai.onnx.ml", 1)
    assert [line for line in built.doit("build").stdout.splitlines() if line.startswith(".  ")] == []  # nothing reruns


def test_the_onnx_bytes_are_identical_across_workspaces(built, tmp_path: Path):
    other = trees_workspace(tmp_path / "b", *EXAMPLES)
    other.doit("build")  # onnxmltools names graphs with a random UUID; kiln names them
    for name in EXAMPLES:
        assert sha256(built.root / f"build/{name}/onnx/model.onnx") == sha256(other.root / f"build/{name}/onnx/model.onnx")


def test_lightgbm_thresholds_rounded_down_split_float32_features_as_lightgbm_does():
    """onnxmltools' own rounding (to nearest) sends one of the 100 diabetes rows down the wrong branch."""
    import onnxmltools
    import onnxruntime
    from onnxmltools.convert.common.data_types import FloatTensorType

    from kiln.sources.lightgbm import float32_exact

    sys.path.insert(0, str(REPO / "manifests"))
    try:
        from models import diabetes
    finally:
        sys.path.remove(str(REPO / "manifests"))
    model, features = diabetes.build(), diabetes.held_out_features()

    def onnx_values(m):
        converted = onnxmltools.convert_lightgbm(m, initial_types=[("x", FloatTensorType([None, 10]))], target_opset=15)
        return onnxruntime.InferenceSession(converted.SerializeToString()).run(None, {"x": features})[0].ravel()

    assert np.abs(onnx_values(model) - model.predict(features)).max() > 1  # the converter alone
    rounded = float32_exact(model)
    assert (rounded.predict(features) == model.predict(features)).all()  # the same trees for float32 input
    assert np.abs(onnx_values(rounded) - model.predict(features)).max() < 1e-3


NONDETERMINISTIC = '''
import numpy as np
from xgboost import XGBClassifier
from sklearn.datasets import load_breast_cancer


def build():
    """Fitted on labels drawn afresh each call: the reference and the converter get different models."""
    features, _ = load_breast_cancer(return_X_y=True)
    labels = np.random.default_rng().integers(0, 2, len(features))
    return XGBClassifier(n_estimators=20, max_depth=4, n_jobs=1).fit(features, labels)
'''


def test_a_converted_model_that_is_not_the_reference_fails_and_publishes_nothing(tmp_path: Path):
    """Also with gates loose enough to pass a wrong class (1.0 apart): labels are compared exactly."""
    ws = trees_workspace(tmp_path / "ws", "xgboost_breast_cancer")
    (ws.root / "manifests/models/breast_cancer.py").write_text(NONDETERMINISTIC)
    ws.edit("thresholds = { max_abs_diff = 1e-5 }", "thresholds = { max_abs_diff = 1.0, min_cosine = 0.0, mean_cosine = 0.0 }", name="xgboost_breast_cancer")
    proc = ws.doit("build", check=False)
    assert proc.returncode == 1
    failure = next(line for line in proc.stdout.splitlines() if "validation failed, artifact not published:" in line)
    assert "label has " in failure and "integer values unlike the reference's" in failure  # labels must match exactly
    assert not (ws.root / "build/xgboost_breast_cancer/onnx").exists()


def test_validation_data_from_a_csv_table_feeds_the_columns_the_input_names(tmp_path: Path):
    """A .csv with named columns in another order, and the label column beside them: the input's
    `columns` pick the 30 features by name, in the model's order."""
    from sklearn.datasets import load_breast_cancer

    ws = trees_workspace(tmp_path / "ws", "xgboost_breast_cancer")
    names = [str(n) for n in load_breast_cancer().feature_names]
    features = np.load(ws.root / "manifests/data/breast_cancer.npz")["features"]
    header = ["target", *reversed(names)]
    rows = [",".join(["0", *(repr(float(v)) for v in reversed(row))]) for row in features]
    (ws.root / "manifests/data/breast_cancer.csv").write_text(",".join(f'"{h}"' for h in header) + "\n" + "\n".join(rows) + "\n")
    ws.edit('shape = ["batch", 30]', 'shape = ["batch", 30]\ncolumns = [' + ", ".join(f'"{n}"' for n in names) + "]", name="xgboost_breast_cancer")
    ws.edit('data = "data/breast_cancer.npz"', 'data = "data/breast_cancer.csv"', name="xgboost_breast_cancer")
    ws.doit("build")
    validation = ws.report("xgboost_breast_cancer")["artifacts"][0]
    assert validation["passed"] and validation["metrics"]["label"]["mismatched"] == 0
    assert validation["metrics"]["probabilities"]["rows"] == 100 and validation["metrics"]["probabilities"]["max_abs_diff"] < 1e-6
