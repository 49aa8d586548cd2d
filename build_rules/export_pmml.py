"""export_pmml: a fitted scikit-learn estimator or pipeline (or an XGBoost / LightGBM model in its
scikit-learn API) -> PMML 4.4 with sklearn2pmml, whose converter is Java (JPMML-SkLearn).

The model is wrapped in a PMMLPipeline (a scikit-learn Pipeline's own steps, so a scaler stays a
PMML transformation) whose active fields are the manifest's feature names and whose target field
is named after its first output; it is pickled with joblib (as sklearn2pmml itself does) and the
JVM converts the pickle. The JVM runs here rather than through sklearn2pmml(), which prints the
JVM's output to the process's shared stdout and raises a bare "has failed": kiln writes that output
to the step's log and names the JVM's own exception in the error. The one thing that differs
between two conversions, the <Timestamp> in the header, is dropped (it is optional in PMML), so two
builds give the same bytes.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from kiln.errors import StepError, one_line
from kiln.rules import Params, Rule, RunContext, register

# source kind -> "module:function(source, files, root)" giving the fitted model: one line per kind
LOADERS = {
    "sklearn": "kiln.sources.sklearn:load_estimator",
    "xgboost": "kiln.sources.xgboost:load_model",
    "lightgbm": "kiln.sources.lightgbm:load_model",
}
TIMESTAMP = re.compile(rb"[ \t]*<Timestamp>[^<]*</Timestamp>\r?\n?")
JVM_TIMEOUT_S = 600
JAVA_EXCEPTION = re.compile(r'^(?:Exception in thread "[^"]*" )?(?:[\w$]+\.)*([\w$]+(?:Exception|Error))(:.*)?$')


class ExportPmmlParams(Params):
    source: dict[str, Any]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    feature_names: list[str]


@register
class ExportPmml(Rule):
    name = "export_pmml"
    version = 1
    tools = ("scikit-learn", "sklearn2pmml", "java")
    Params = ExportPmmlParams
    memory_base_mib = 768  # the model in Python, and a JVM beside it (some 100-300 MiB resident for small models)

    @classmethod
    def tools_for(cls, params: dict[str, Any]) -> tuple[str, ...]:
        """And the model's own library (a tree kind's library_tools): the PMML is made from its model."""
        from kiln.sources import source_kind

        return (*cls.tools, *getattr(source_kind(params["source"]["kind"]), "library_tools", ()))

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ExportPmmlParams, ctx: RunContext) -> dict[str, Any]:
        model = load_model(params.source, inputs["source"], ctx.root, ctx.step)
        pipeline = pmml_pipeline(model, params, ctx.step)
        with tempfile.TemporaryDirectory(prefix="pmml-", dir=outputs["model"].parent) as work:
            written = Path(work) / "model.pmml"
            seconds = convert(pipeline, Path(work), written, ctx.step)
            data, removed = without_timestamp(written.read_bytes(), ctx.step)
        outputs["model"].write_bytes(data)
        return {"estimator": type(model).__name__, "features": len(params.feature_names), "jvm_seconds": round(seconds, 2),
                "bytes": len(data), "timestamp_removed": removed}


def load_model(source: dict[str, Any], files: list[Path], root: Path, step: str):
    """The fitted model, by the loader of the manifest's source kind."""
    kind = source["kind"]
    if kind not in LOADERS:
        raise StepError(step, f"source kind {kind!r} cannot give PMML; it is made from {sorted(LOADERS)} sources")
    module, function = LOADERS[kind].split(":")
    return getattr(importlib.import_module(module), function)(source, files, root)


def pmml_pipeline(model, params: ExportPmmlParams, step: str):
    """A PMMLPipeline of the model (a Pipeline's own steps), its fields named from the manifest."""
    import numpy as np
    from sklearn.pipeline import Pipeline
    from sklearn2pmml.pipeline import PMMLPipeline

    from kiln.formats.pmml import default_feature_names
    from kiln.sources.sklearn import check_feature_names, model_feature_names

    if not hasattr(model, "fit"):  # a LightGBM Booster read from a .txt file
        raise StepError(step, f"sklearn2pmml converts estimators with scikit-learn's API, and the source gives a {type(model).__module__.split('.')[0]} {type(model).__name__}; give source.factory returning the library's sklearn-API model (e.g. LGBMClassifier, LGBMRegressor)")
    expected = getattr(model, "n_features_in_", None)
    if expected is not None and expected != len(params.feature_names):
        raise StepError(step, f"{type(model).__name__} was fitted on {expected} features but input {params.inputs[0]['name']!r} has {len(params.feature_names)} columns")
    if params.feature_names != default_feature_names(params.inputs[0]["name"], len(params.feature_names)):  # declared: the input's columns or options.feature_names
        check_feature_names(model_feature_names(model), params.feature_names, "the pmml target's feature_names (options.feature_names, or the input's columns)", params.source, step)
    classifier = hasattr(model, "predict_proba")
    if len(params.outputs) == 2 and not classifier:
        raise StepError(step, f"{type(model).__name__} has no predict_proba, so it gives one output (its prediction), not the two the manifest declares: {[t['name'] for t in params.outputs]}")
    steps = list(model.steps) if isinstance(model, Pipeline) else [("model", model)]
    pipeline = PMMLPipeline(steps)
    pipeline.active_fields = np.asarray(params.feature_names)
    pipeline.target_fields = np.asarray([params.outputs[0]["name"]])
    return pipeline


def convert(pipeline, work: Path, pmml: Path, step: str) -> float:
    """The JVM converts the pickled pipeline; its output goes to the step's log. Seconds it took."""
    import joblib
    from sklearn2pmml import _classpath, _environment

    pickled = work / "pipeline.pkl.z"
    joblib.dump(pipeline, pickled, compress=3)  # the dump sklearn2pmml() itself hands the JVM
    command = ["java", "-cp", os.pathsep.join(_classpath([])), "com.sklearn2pmml.Main", "--pkl-input", str(pickled), "--pmml-output", str(pmml)]
    env = os.environ | {"SKLEARN2PMML_ENVIRONMENT": str(_environment())}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=JVM_TIMEOUT_S)
    except FileNotFoundError:
        from kiln.formats.pmml import INSTALL_JAVA

        raise StepError(step, f"sklearn2pmml needs Java, which is not on PATH; install it with: {INSTALL_JAVA}") from None
    except subprocess.TimeoutExpired:
        raise StepError(step, f"sklearn2pmml's JVM did not finish within {JVM_TIMEOUT_S} s") from None
    seconds = time.perf_counter() - start
    print(f"$ {' '.join(command[:2])} <sklearn2pmml jars> {' '.join(command[3:])}\n{done.stdout}{done.stderr}", flush=True)
    if done.returncode != 0 or not pmml.is_file():
        raise StepError(step, f"sklearn2pmml cannot convert {type(pipeline.steps[-1][1]).__name__}: {jvm_exception(done.stdout + done.stderr)}")
    return seconds


def jvm_exception(output: str) -> str:
    """The JVM's first exception, package left out (e.g. "SkLearnException: Scikit-Learn version
    '1.9.1' is not supported"), or its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        found = JAVA_EXCEPTION.match(line)
        if found:
            return one_line(found.group(1) + (found.group(2) or ""))[:300]
    return one_line(lines[-1])[:300] if lines else "the JVM failed and printed nothing"


def without_timestamp(data: bytes, step: str) -> tuple[bytes, bool]:
    """The document without its header's <Timestamp> (the time of conversion, different every build)."""
    if len(TIMESTAMP.findall(data)) > 1:
        raise StepError(step, "sklearn2pmml wrote more than one <Timestamp>; kiln removes the header's one only")
    cleaned = TIMESTAMP.sub(b"", data, count=1)
    return cleaned, cleaned != data
