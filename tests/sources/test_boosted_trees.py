"""kind = "xgboost" and kind = "lightgbm" (kiln.sources.boosted_trees and its two thin kinds):
every origin a user has (the library's own model files, a factory returning a Booster, a model
whose features have names), hostile model files and feature counts as one-line errors, and the
manifest rules (onnx fp32 only, opset at most the converter's, labels gated exactly)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, new_workspace
from kiln.errors import ManifestError, StepError
from kiln.rules import RunContext
from kiln.schema.manifest import RawManifest
from kiln.define.spec import validate

xgboost = pytest.importorskip("xgboost")
lightgbm = pytest.importorskip("lightgbm")
pytest.importorskip("onnxmltools")

XGB = (REPO / "manifests/xgboost_breast_cancer.toml").read_text()
LGBM = (REPO / "manifests/lightgbm_diabetes.toml").read_text()


def _iris():
    from sklearn.datasets import load_iris

    features, labels = load_iris(return_X_y=True)
    return features.astype(np.float32), labels


XGB_BOOSTER = '''
import numpy as np
import xgboost
from sklearn.datasets import load_iris


def build():
    """A 3-class Booster trained through xgboost.train on features with names (as from a DataFrame),
    which onnxmltools refuses unless they are f0..fN."""
    features, labels = load_iris(return_X_y=True)
    data = xgboost.DMatrix(features.astype(np.float32), labels, feature_names=["sepal_l", "sepal_w", "petal_l", "petal_w"])
    return xgboost.train({"objective": "multi:softprob", "num_class": 3, "max_depth": 3, "seed": 0, "nthread": 1}, data, 8)
'''


def xgb_iris_booster():
    namespace: dict = {}
    exec(XGB_BOOSTER, namespace)
    return namespace["build"]()


def lgbm_binary_booster():
    features, labels = _iris()
    return lightgbm.train({"objective": "binary", "verbose": -1, "num_threads": 1, "deterministic": True, "seed": 0},
                          lightgbm.Dataset(features, (labels == 2).astype(int)), 10)


def _manifest(name: str, source: str, classes: int) -> str:
    return f'''
[model]
name = "{name}"
[source]
kind = {source}
[[inputs]]
name = "x"
shape = ["batch", 4]
[[outputs]]
name = "label"
dtype = "int64"
shape = ["batch"]
[[outputs]]
name = "probabilities"
shape = ["batch", {classes}]
[targets.onnx]
format = "onnx"
thresholds = {{ max_abs_diff = 1e-5 }}
[validation]
data = "data/iris4.npz"
batch_size = 50
'''


def _regressor_manifest(name: str, source: str) -> str:
    classifier = _manifest(name, source, 2)
    start, end = classifier.index("[[outputs]]"), classifier.index("[targets.onnx]")
    return classifier[:start] + '[[outputs]]\nname = "y"\nshape = ["batch", 1]\n' + classifier[end:].replace("1e-5", "1e-4")


@pytest.fixture(scope="module")
def model_files_built(tmp_path_factory):
    """One workspace, one build: an XGBoost .ubj file with named features, a LightGBM .txt file, and a
    factory returning a raw XGBoost Booster."""
    ws = new_workspace(tmp_path_factory.mktemp("trees") / "ws", {
        "xgb_ubj": _manifest("xgb_ubj", '"xgboost"\npath = "iris.ubj"', 3),
        "lgbm_txt": _manifest("lgbm_txt", '"lightgbm"\npath = "iris.txt"', 2),
        "xgb_booster": _manifest("xgb_booster", '"xgboost"\nfactory = "iris_booster:build"', 3),
        "xgb_json_regressor": _regressor_manifest("xgb_json_regressor", '"xgboost"\npath = "petal.json"'),
    })
    features, _ = _iris()
    xgboost.XGBRegressor(n_estimators=20, max_depth=3, n_jobs=1).fit(features, features[:, 0] * features[:, 3]).save_model(str(ws.root / "manifests/petal.json"))
    xgb_iris_booster().save_model(str(ws.root / "manifests/iris.ubj"))
    lgbm_binary_booster().save_model(str(ws.root / "manifests/iris.txt"))
    (ws.root / "iris_booster.py").write_text(XGB_BOOSTER)
    np.savez(ws.root / "manifests/data/iris4.npz", x=_iris()[0])
    ws.doit("build", check=False)  # the report says what failed; the test names it
    return ws


def test_an_xgboost_regressor_file_gives_its_predictions_as_a_column(model_files_built):
    report = model_files_built.report("xgb_json_regressor")
    assert report["ok"], report
    metrics = report["artifacts"][0]["metrics"]["y"]
    assert metrics["rows"] == 150 and metrics["max_abs_diff"] < 1e-5  # values below 20


@pytest.mark.parametrize("name", ["xgb_ubj", "lgbm_txt", "xgb_booster"])
def test_each_origin_converts_to_onnx_that_gives_the_libraries_own_labels(model_files_built, name: str):
    report = model_files_built.report(name)
    assert report["ok"], report
    metrics = report["artifacts"][0]["metrics"]
    assert metrics["label"]["max_abs_diff"] == 0.0  # every one of the 150 flowers gets the library's class
    assert metrics["probabilities"]["rows"] == 150 and metrics["probabilities"]["max_abs_diff"] < 1e-6


def test_load_model_reads_xgboost_json_as_the_sklearn_class_without_feature_names(tmp_path: Path):
    from kiln.sources.xgboost import load_model

    path = tmp_path / "iris.json"
    xgb_iris_booster().save_model(str(path))
    model = load_model({"kind": "xgboost", "path": "iris.json"}, [path], tmp_path)
    assert type(model).__name__ == "XGBClassifier" and model.n_classes_ == 3 and model.n_features_in_ == 4
    assert model.get_booster().feature_names is None
    own = xgb_iris_booster().predict(xgboost.DMatrix(_iris()[0]), validate_features=False)  # it demands its names
    assert (model.predict(_iris()[0]) == np.argmax(own, axis=1)).all()


def test_an_allowed_pickle_loads_and_one_holding_something_else_is_refused(tmp_path: Path):
    import joblib

    from kiln.sources.lightgbm import load_model

    features, labels = _iris()
    model = lightgbm.LGBMClassifier(n_estimators=5, verbose=-1, n_jobs=1).fit(features, labels)
    joblib.dump(model, tmp_path / "m.pkl")
    loaded = load_model({"kind": "lightgbm", "path": "m.pkl", "allow_pickle": True}, [tmp_path / "m.pkl"], tmp_path)
    assert (loaded.predict_proba(features) == model.predict_proba(features)).all()
    joblib.dump(xgboost.XGBRegressor(n_estimators=2).fit(features, labels), tmp_path / "other.pkl")
    with pytest.raises(StepError, match=r"^source: other\.pkl gave XGBRegressor; allowed: LGBMClassifier, LGBMRegressor or lightgbm\.Booster$"):
        load_model({"kind": "lightgbm", "path": "other.pkl", "allow_pickle": True}, [tmp_path / "other.pkl"], tmp_path)


# ---- hostile model files: one line naming the file, what is wrong, what is allowed ---------------


def _xgb_json(tmp_path: Path) -> bytes:
    xgb_iris_booster().save_model(str(tmp_path / "good.json"))
    return (tmp_path / "good.json").read_bytes()


def _lgbm_txt(tmp_path: Path) -> bytes:
    lgbm_binary_booster().save_model(str(tmp_path / "good.txt"))
    return (tmp_path / "good.txt").read_bytes()


@pytest.mark.parametrize("kind,name,content,problem", [
    ("xgboost", "m.json", lambda p: b"PK\x03\x04 a zip, not a model", "not a readable XGBoost model"),
    ("xgboost", "m.json", lambda p: _xgb_json(p)[: len(_xgb_json(p)) // 2], "not a readable XGBoost model"),
    ("xgboost", "m.ubj", lambda p: b"{\"learner\": 1}", "not a readable XGBoost model"),
    ("lightgbm", "m.txt", lambda p: _xgb_json(p), "does not start with the 'tree' header"),
    ("lightgbm", "m.txt", lambda p: _lgbm_txt(p)[: len(_lgbm_txt(p)) // 2], "truncated LightGBM model"),
])
def test_a_model_file_that_is_not_what_its_suffix_says_is_one_line_naming_the_file(tmp_path: Path, kind, name, content, problem):
    from kiln.sources import source_kind

    path = tmp_path / name
    path.write_bytes(content(tmp_path))  # LightGBM itself aborts the process on a truncated file
    with pytest.raises(StepError) as caught:
        source_kind(kind).load_model({"kind": kind, "path": name}, [path], tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{path}: source.path: ") and problem in message and "allowed:" in message
    assert "\n" not in message


def test_a_model_with_other_features_than_the_manifest_fails_naming_both_counts(tmp_path: Path):
    from kiln.sources import source_kind

    path = tmp_path / "iris.txt"
    lgbm_binary_booster().save_model(str(path))
    outputs = [{"name": "label", "dtype": "int64", "shape": ["batch"]}, {"name": "probabilities", "dtype": "float32", "shape": ["batch", 2]}]
    inputs = [{"name": "x", "dtype": "float32", "shape": ["batch", 5]}]
    feeds = iter([{"x": np.zeros((2, 5), np.float32)}])
    with pytest.raises(StepError, match=r"^t/ref: inputs\.x\.shape: 5 features, but iris\.txt was trained on 4; allowed: shape = \[\"batch\", 4\]$"):
        next(source_kind("lightgbm").run_reference(feeds, [path], {"kind": "lightgbm", "path": "iris.txt"}, inputs, outputs, RunContext(tmp_path, "t/ref")))


def test_a_truncated_model_file_fails_the_build_and_publishes_nothing(tmp_path: Path):
    ws = new_workspace(tmp_path / "ws", {"lgbm_txt": _manifest("lgbm_txt", '"lightgbm"\npath = "iris.txt"', 2)})
    text = _lgbm_txt(tmp_path)
    (ws.root / "manifests/iris.txt").write_bytes(text[: len(text) * 2 // 3])
    np.savez(ws.root / "manifests/data/iris4.npz", x=_iris()[0])
    proc = ws.doit("build", check=False)
    assert proc.returncode == 1
    line = next(line for line in (proc.stdout + proc.stderr).splitlines() if "truncated LightGBM model" in line)
    assert "manifests/iris.txt: source.path: truncated LightGBM model" in line and "allowed: a complete file written by save_model" in line
    assert not (ws.root / "build/lgbm_txt/onnx").exists()


# ---- the manifest -------------------------------------------------------------------------------


@pytest.mark.parametrize("text,old,new,key,allowed", [
    (XGB, 'format = "onnx"  ', 'format = "onnx"\nopset = 17  ', "targets.onnx.opset", "at most 15 for an xgboost source"),
    (XGB, 'format = "onnx"  ', 'format = "openvino"  ', "targets.onnx.format", "format = \"onnx\" with precision = \"fp32\" for an xgboost source"),
    (XGB, 'shape = ["batch", 30]', 'shape = ["batch", "features"]', "inputs.features.shape", "[\"batch\", N] with N the model's feature count"),
    (XGB, 'name = "label"\ndtype = "int64"', 'name = "label"\ndtype = "float32"', "outputs.label", "a classifier's label first"),
    (LGBM, 'shape = ["batch", 1]', 'shape = ["batch"]', "outputs.progression.shape", "[\"batch\", 1] float32 for a regressor's predictions"),
    (LGBM, 'factory = "models.diabetes:build"', 'factory = "models.diabetes:build"\npath = "d.txt"', "source.factory", "exactly one of source.factory"),
])
def test_bad_tree_manifests_name_the_key_and_what_is_allowed(text, old, new, key, allowed):
    assert old in text
    with pytest.raises(ManifestError) as caught:
        validate(RawManifest(Path("/ws/manifests/m.toml"), tomllib.loads(text.replace(old, new, 1))))
    assert f"m.toml: {key}: " in str(caught.value) and allowed in str(caught.value)


@pytest.mark.parametrize("path,key,problem", [
    ("model.onnx", "source.path", "'model.onnx': suffix '.onnx' is not a LightGBM model file; allowed: ['.txt']"),
    ("model.pkl", "source.allow_pickle", "'model.pkl' is a pickled model, which can run code when loaded; refused unless the manifest sets source.allow_pickle = true"),
])
def test_model_paths_are_refused_by_suffix_at_check_time(tmp_path: Path, path: str, key: str, problem: str):
    from kiln.define.resolve import resolve
    from kiln.schema.manifest import read_manifest

    ws = new_workspace(tmp_path / "ws", {"d": LGBM.replace('factory = "models.diabetes:build"', f'path = "{path}"')})
    (ws.root / "manifests" / path).write_bytes(b"x")
    raw = read_manifest(ws.manifest("d"))
    with pytest.raises(ManifestError) as caught:
        resolve(validate(raw), raw, ws.root)
    assert f"d.toml: {key}: {problem}" in str(caught.value)


# ---- feature names: a model fitted on named columns must be fed them in its order ----------------


def _named_models(tmp_path: Path) -> dict[str, tuple[dict, list[Path]]]:
    """One model per origin that carries names (sepal_l, sepal_w, petal_l, petal_w): an XGBoost file,
    a LightGBM file, and a pickled sklearn estimator fitted on a DataFrame."""
    import joblib
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    features, labels = _iris()
    frame = pd.DataFrame(features, columns=["sepal_l", "sepal_w", "petal_l", "petal_w"])
    xgb_iris_booster().save_model(str(tmp_path / "iris.json"))
    lightgbm.train({"objective": "binary", "verbose": -1, "num_threads": 1}, lightgbm.Dataset(frame, (labels == 2).astype(int)), 5).save_model(str(tmp_path / "iris.txt"))
    joblib.dump(LogisticRegression(max_iter=300).fit(frame, labels), tmp_path / "iris.pkl")
    return {"xgboost": ({"kind": "xgboost", "path": "iris.json"}, [tmp_path / "iris.json"]),
            "lightgbm": ({"kind": "lightgbm", "path": "iris.txt"}, [tmp_path / "iris.txt"]),
            "sklearn": ({"kind": "sklearn", "path": "iris.pkl", "allow_pickle": True}, [tmp_path / "iris.pkl"])}


@pytest.mark.parametrize("kind,classes", [("xgboost", 3), ("lightgbm", 2), ("sklearn", 3)])
def test_input_columns_in_another_order_than_the_models_feature_names_fail_the_reference(tmp_path: Path, kind: str, classes: int):
    from kiln.sources import source_kind

    source, files = _named_models(tmp_path)[kind]
    outputs = [{"name": "label", "dtype": "int64", "shape": ["batch"]}, {"name": "probabilities", "dtype": "float32", "shape": ["batch", classes]}]

    def reference(columns: list[str]):
        inputs = [{"name": "x", "dtype": "float32", "shape": ["batch", 4], "columns": columns}]
        feeds = iter([{"x": _iris()[0][:3]}])
        return next(source_kind(kind).run_reference(feeds, files, source, inputs, outputs, RunContext(tmp_path, "t/ref")))

    with pytest.raises(StepError) as caught:
        reference(["sepal_w", "sepal_l", "petal_l", "petal_w"])
    assert str(caught.value).startswith(f"t/ref: inputs.x.columns[0] is 'sepal_w' but {source['path']} was fitted with feature 'sepal_l' there; allowed: ")
    assert "\n" not in str(caught.value)
    assert reference(["sepal_l", "sepal_w", "petal_l", "petal_w"])[1]["label"].shape == (3,)  # its own order runs


def test_lightgbms_own_column_names_are_no_names_and_check_nothing(tmp_path: Path):
    from kiln.sources.sklearn import model_feature_names

    assert model_feature_names(lgbm_binary_booster()) is None  # fitted on an array: Column_0..Column_3
    assert model_feature_names(xgboost.XGBClassifier(n_estimators=2).fit(*_iris())) is None


def test_a_lightgbm_file_cut_anywhere_or_damaged_is_one_line_naming_it_and_never_crashes_the_process(tmp_path: Path):
    """Cut at every 1% of the file (LightGBM segfaults on some cuts inside `parameters:`), and complete
    but with a damaged tree block (LightGBM aborts: C++ terminate); run in a child so that a crash
    fails this test instead of ending the test session."""
    import subprocess
    import sys

    (tmp_path / "good.txt").write_bytes(_lgbm_txt(tmp_path))
    script = '''
import sys
from pathlib import Path
from kiln.errors import StepError
from kiln.sources.lightgbm import load_model
folder = Path(sys.argv[1]); text = (folder / "good.txt").read_bytes(); path = folder / "cut.txt"
for percent in range(1, 100):
    path.write_bytes(text[: len(text) * percent // 100])
    try:
        load_model({"kind": "lightgbm", "path": "cut.txt"}, [path], folder)
        print("BAD", percent, "loaded")
    except StepError as err:
        if not str(err).startswith(f"{path}: source.path: ") or "\\n" in str(err):
            print("BAD", percent, repr(str(err)))
path.write_bytes(text.replace(b"left_child=", b"left_chilx=", 1))
try:
    load_model({"kind": "lightgbm", "path": "cut.txt"}, [path], folder)
    print("BAD damaged: loaded")
except StepError as err:
    if not str(err).startswith(f"{path}: source.path: not a readable LightGBM model: ") or "allowed: " not in str(err) or "\\n" in str(err):
        print("BAD damaged:", repr(str(err)))
'''
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [line for line in done.stdout.splitlines() if line.startswith("BAD")] == []  # each refused in one line naming the file (LightGBM's own warnings aside)


def test_xgboost_objectives_onnxmltools_misconverts_are_refused_at_the_convert_step(tmp_path: Path):
    from kiln.build_rules.convert_trees import refuse_misconverted

    features, labels = _iris()
    model = xgboost.XGBClassifier(n_estimators=2, objective="multi:softmax", n_jobs=1).fit(features, labels)
    with pytest.raises(StepError, match=r"^t/convert: m\.json: XGBoost objective 'multi:softmax' is converted wrongly by onnxmltools; allowed: another objective, e\.g\. \['binary:logistic', 'multi:softprob'"):
        refuse_misconverted(model, {"kind": "xgboost", "path": "m.json"}, "t/convert")
    refuse_misconverted(xgboost.XGBClassifier(n_estimators=2, n_jobs=1).fit(features, labels), {"kind": "xgboost", "path": "m.json"}, "t/convert")


def test_a_lightgbm_classifier_with_string_classes_is_refused_in_one_line(tmp_path: Path):
    from kiln.build_rules.convert_trees import refuse_misconverted

    features, labels = _iris()
    model = lightgbm.LGBMClassifier(n_estimators=2, verbose=-1, n_jobs=1).fit(features, np.array(["setosa", "versicolor", "virginica"])[labels])
    with pytest.raises(StepError, match=r"^t/convert: models:f: LGBMClassifier has string classes \['setosa', 'versicolor', 'virginica'\]; allowed: integer classes"):
        refuse_misconverted(model, {"kind": "lightgbm", "factory": "models:f"}, "t/convert")
    from kiln.sources.sklearn import shaped_results

    outputs = [{"name": "label", "dtype": "int64", "shape": ["batch"]}, {"name": "probabilities", "dtype": "float32", "shape": ["batch", 3]}]
    with pytest.raises(StepError, match=r"^t/ref: LGBMClassifier gives output 'label' values like \['setosa'\], which are not int64; allowed: a model fitted on integer classes"):
        shaped_results((model.predict(features[:1]), model.predict_proba(features[:1])), outputs, "LGBMClassifier", "t/ref")
