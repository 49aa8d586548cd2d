"""export_pmml and pmml validation: the iris example's pmml target converts with sklearn2pmml, scores
in JPMML to the estimator's own labels and probabilities, and gives the same bytes in two
workspaces; a PMML that does not compute what the source does fails validation and is not
published; the JVM's output reaches the log and its exception the error."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import REPO, new_workspace
from pmml_workspaces import iris_manifest, require_java, with_pmml_target

pytest.importorskip("sklearn2pmml")
pytest.importorskip("jpmml_evaluator")

from kiln.build_rules.export_pmml import ExportPmmlParams, jvm_exception, pmml_pipeline, without_timestamp  # noqa: E402
from kiln.errors import StepError  # noqa: E402

ARTIFACT = "build/sklearn_iris/pmml/model.pmml"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The iris example with only its pmml target, built once."""
    require_java()
    ws = new_workspace(tmp_path_factory.mktemp("pmml") / "ws", {"sklearn_iris": iris_manifest(pmml_only=True)})
    ws.doit("build")
    return ws


def test_the_pmml_scores_to_the_estimators_labels_and_probabilities(built):
    report = built.report("sklearn_iris")
    assert report["ok"] and [s["rule"] for s in report["steps"]] == ["reference_outputs", "export_pmml", "validate"]
    metrics = report["artifacts"][0]["metrics"]
    assert metrics["label"]["max_abs_diff"] == 0.0  # JPMML's own label for each of the 50 held-out flowers
    assert 0.0 < metrics["probabilities"]["max_abs_diff"] < 1e-6 and metrics["probabilities"]["rows"] == 50
    text = (built.root / ARTIFACT).read_text()
    assert "<Timestamp>" not in text and '<DataField name="features_3"' in text and '<DataField name="label"' in text
    export = next(s for s in report["steps"] if s["rule"] == "export_pmml")
    logs = list((built.root / "build/.kiln/logs").glob("export_pmml-*.log"))  # the JVM's output
    assert len(logs) == 1 and "com.sklearn2pmml.Main" in logs[0].read_text() and "Generated PMML file" in logs[0].read_text()
    assert export["info"]["jvm_seconds"] > 0 and export["info"]["timestamp_removed"] is True


def test_two_workspaces_give_the_same_bytes(built, tmp_path: Path):
    other = new_workspace(tmp_path / "ws", {"sklearn_iris": iris_manifest(pmml_only=True)})
    other.doit("build")
    digest = [hashlib.sha256((ws.root / ARTIFACT).read_bytes()).hexdigest() for ws in (built, other)]
    assert digest[0] == digest[1]


# the example manifests of the tree kinds, each with one pmml target gated as its onnx target
TREES = {"xgboost": ("xgboost_breast_cancer", "max_abs_diff = 1e-6", ("label", "probabilities")),
         "lightgbm": ("lightgbm_diabetes", "max_abs_diff = 1e-3, max_rel_diff = 1e-5", ("progression",))}


@pytest.mark.parametrize("kind", sorted(TREES))
def test_tree_models_give_pmml_that_scores_to_their_own_predictions(kind: str, tmp_path: Path):
    pytest.importorskip(kind)
    require_java()
    name, gate, outputs = TREES[kind]
    ws = new_workspace(tmp_path / "ws", {name: with_pmml_target((REPO / f"manifests/{name}.toml").read_text(), gate)})
    ws.doit("build")
    (artifact,) = ws.report(name)["artifacts"]
    assert tuple(artifact["metrics"]) == outputs and ws.report(name)["ok"]  # within the gate: validated
    if "label" in outputs:
        assert artifact["metrics"]["label"]["max_abs_diff"] == 0.0


def test_a_model_without_scikit_learns_api_is_refused_in_one_line():
    lightgbm = pytest.importorskip("lightgbm")
    import numpy as np

    x = np.random.default_rng(0).standard_normal((40, 3))
    booster = lightgbm.train({"objective": "regression", "verbose": -1, "min_data_in_leaf": 2}, lightgbm.Dataset(x, x.sum(axis=1)), num_boost_round=2)
    params = ExportPmmlParams(source={"kind": "lightgbm"}, inputs=[{"name": "x"}], outputs=[{"name": "y"}], feature_names=["a", "b", "c"])
    with pytest.raises(StepError, match=r"the source gives a lightgbm Booster; give source.factory returning .* LGBMRegressor"):
        pmml_pipeline(booster, params, "m/pmml/export_pmml")


def test_declared_feature_names_other_than_the_models_are_refused_naming_the_first_mismatch():
    """A model fitted on named columns, given PMML fields in another order, would be fed the wrong columns."""
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LinearRegression

    x = pd.DataFrame(np.random.default_rng(0).standard_normal((20, 3)), columns=["a", "b", "c"])
    model = LinearRegression().fit(x, x.sum(axis=1))

    def params(names):
        return ExportPmmlParams(source={"kind": "sklearn", "factory": "models:f"}, inputs=[{"name": "x"}], outputs=[{"name": "y"}], feature_names=names)

    with pytest.raises(StepError, match=r"^m/pmml/export_pmml: the pmml target's feature_names \(options.feature_names, or the input's columns\)\[0\] is 'b' but models:f was fitted with feature 'a' there; allowed: the model's feature names in its order: \['a', 'b', 'c'\]$"):
        pmml_pipeline(model, params(["b", "a", "c"]), "m/pmml/export_pmml")
    assert list(pmml_pipeline(model, params(["a", "b", "c"]), "m/pmml/export_pmml").active_fields) == ["a", "b", "c"]
    assert list(pmml_pipeline(model, params(["x_0", "x_1", "x_2"]), "m/pmml/export_pmml").active_fields) == ["x_0", "x_1", "x_2"]  # undeclared: kiln's own


UNSTABLE = '''
import os
import numpy as np

def build():
    """A different model on every call: the PMML is not the model the reference came from."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    rows = np.random.default_rng(int.from_bytes(os.urandom(4), "little")).choice(len(x), 60, replace=False)
    return LogisticRegression(max_iter=1000, C=0.05).fit(x[rows], y[rows])
'''


def test_a_pmml_computing_other_probabilities_fails_and_is_not_published(tmp_path: Path):
    require_java()
    ws = new_workspace(tmp_path / "ws", {"sklearn_iris": iris_manifest(pmml_only=True).replace("models.iris:build", "unstable:build")})
    (ws.root / "manifests/unstable.py").write_text(UNSTABLE)
    proc = ws.doit("build", check=False)
    assert proc.returncode != 0
    assert "validation failed, artifact not published: " in proc.stdout + proc.stderr
    assert "probabilities max_abs_diff" in proc.stdout + proc.stderr
    assert not (ws.root / ARTIFACT).exists()


CUSTOM = '''
from sklearn.linear_model import LogisticRegression

class Mine(LogisticRegression):
    """A class of the user's own, which sklearn2pmml's Java side has no converter for."""
'''


def test_an_estimator_sklearn2pmml_cannot_convert_fails_naming_the_jvms_exception(tmp_path: Path, monkeypatch):
    require_java()
    import numpy as np

    from kiln.build_rules.export_pmml import convert

    (tmp_path / "custom_pmml_estimator.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    from custom_pmml_estimator import Mine

    x = np.random.default_rng(0).standard_normal((30, 2))
    params = ExportPmmlParams(source={"kind": "sklearn"}, inputs=[{"name": "x"}], outputs=[{"name": "label"}], feature_names=["a", "b"])
    pipeline = pmml_pipeline(Mine().fit(x, x[:, 0] > 0), params, "m/pmml/export_pmml")
    with pytest.raises(StepError) as err:
        convert(pipeline, tmp_path, tmp_path / "model.pmml", "m/pmml/export_pmml")
    assert str(err.value) == "m/pmml/export_pmml: sklearn2pmml cannot convert Mine: SkLearnException: The object (Python class custom_pmml_estimator.Mine) is not a supported Estimator"
    assert not (tmp_path / "model.pmml").exists()


def test_the_jvms_exception_names_the_failure():
    output = ("Dec 07, 2026 4:30:33 AM com.sklearn2pmml.Main run\nSEVERE: Failed to convert PKL to PMML\n"
              "org.jpmml.sklearn.SkLearnException: Scikit-Learn version '1.9.1' is not supported\n\tat org.jpmml.sklearn.X.y(X.java:1)\n")
    assert jvm_exception(output) == "SkLearnException: Scikit-Learn version '1.9.1' is not supported"
    assert jvm_exception('Exception in thread "main" java.lang.OutOfMemoryError: Java heap space') == "OutOfMemoryError: Java heap space"
    assert jvm_exception("") == "the JVM failed and printed nothing"


def test_only_the_header_timestamp_is_removed():
    pmml = b"<PMML>\n\t<Header>\n\t\t<Application/>\n\t\t<Timestamp>2026-12-07T04:30:33Z</Timestamp>\n\t</Header>\n</PMML>\n"
    assert without_timestamp(pmml, "s") == (b"<PMML>\n\t<Header>\n\t\t<Application/>\n\t</Header>\n</PMML>\n", True)
    assert without_timestamp(b"<PMML/>", "s") == (b"<PMML/>", False)
    with pytest.raises(StepError, match="more than one <Timestamp>"):
        without_timestamp(pmml.replace(b"</Header>", b"<Timestamp>x</Timestamp>\n</Header>"), "s")
