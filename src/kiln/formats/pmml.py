"""format = "pmml": PMML 4.4 (model.pmml), the XML format enterprise scoring engines (JPMML,
Openscoring, KNIME, Pega, SAS...) take for classic ML, written by sklearn2pmml from a scikit-learn
estimator or pipeline (build_rules/export_pmml.py) and validated by scoring it in JPMML itself
(jpmml_evaluator, through a py4j gateway: the JVM runs as a child process, not inside kiln's).

Why sklearn2pmml and JPMML: of the converters measured (../shared/design/FORMATS.md section 6),
nyoka's PMML gives wrong probabilities (random forests, scaled logistic regression) and none for
XGBoost; sklearn2pmml's match the source within float rounding. jpmml_evaluator is the reference
PMML engine the enterprise tools embed, and it returns the predicted label itself (pypmml returns
only the probabilities of a classifier, so the label could not be checked as evaluated).

The PMML's fields: one per feature column of the manifest's one input, named by options.feature_names
or `<input>_<column>`; the target field is named after the first output. A classifier's outputs are
its label then its class probabilities (the first and second manifest outputs), a regressor's its
prediction. Both the converter and the evaluator need Java: a manifest with a pmml target fails
`kiln check` on a machine without it, with the command that installs it.
"""

from __future__ import annotations

import os
import shutil
import weakref
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from kiln.errors import StepError, one_line
from kiln.formats.base import TargetFormat
from kiln.runtime.runners import Artifact, Runner, RuntimeUnavailable
from kiln.schema.fields import CrossError, Strict, TargetBase
from kiln.sources import source_kind

if TYPE_CHECKING:
    from kiln.plan.chains import Planner

INSTALL_JAVA = "apt-get install -y openjdk-17-jre-headless"
FIELD_NAME = r"^[A-Za-z_][A-Za-z0-9_.()\[\]-]{0,127}$"


class PmmlOptions(Strict):
    feature_names: list[Annotated[str, Field(pattern=FIELD_NAME)]] | None = Field(
        None, min_length=1, description="the PMML field of each column of the input, in order (default: <input>_0, <input>_1, ...)")


class PmmlTarget(TargetBase):
    """A PMML document (model.pmml) written by sklearn2pmml, validated by scoring it in JPMML."""

    format: Literal["pmml"]
    precision: Literal["fp32"] = Field("fp32", description="fp32: JPMML computes in double; the gate compares with the source's float32 outputs")
    options: PmmlOptions = PmmlOptions()


class Pmml(TargetFormat):
    format = "pmml"
    Target = PmmlTarget
    extra = ("sklearn2pmml", "pmml")
    source_frameworks = frozenset({"sklearn", "xgboost", "lightgbm"})  # written from the fitted model itself
    validation_tools = ("jpmml_evaluator", "py4j", "pandas", "java")  # the evaluator, its gateway, the table it scores, its JVM

    def check(self, spec: Any, name: str, target: PmmlTarget) -> None:
        if source_kind(spec.source.kind).framework not in self.source_frameworks:
            return  # kiln.define.spec refuses the source, naming those that give pmml
        if shutil.which("java") is None:
            raise CrossError(f"targets.{name}.format", "pmml", f"a machine with Java (sklearn2pmml converts and JPMML scores PMML in a JVM), and `java` is not on PATH; install it with: {INSTALL_JAVA}")
        feature_names(spec, name, target)
        if spec.source.kind == "lightgbm" and (spec.source.path or "").endswith(".txt"):
            raise CrossError("source.path", spec.source.path, "a factory (or an allowed pickle) giving an LGBMClassifier or LGBMRegressor for a pmml target: sklearn2pmml converts the scikit-learn API model, not a raw Booster read from a .txt file")
        if len(spec.outputs) > 2:
            raise CrossError("outputs", [t.name for t in spec.outputs], "one output (a regressor's prediction) or two (a classifier's label, then its class probabilities) for a pmml target")

    def chain(self, planner: Planner, name: str, target: PmmlTarget) -> None:
        reference = planner.reference(name)
        step = planner.add(name, "export_pmml", {
            "source": planner.source_params, "inputs": planner.inputs, "outputs": planner.outputs,
            "feature_names": feature_names(planner.spec, name, target),
        }, {"source": planner.resolved.source_files}, {"model": "model.pmml"})
        planner.validate(name, target, step.outputs["model"], step, reference)

    def validation(self, planner: Planner, name: str, target: PmmlTarget) -> tuple[dict, dict]:
        """The runner feeds the input's columns as the PMML's fields and shapes its results like the
        manifest's outputs."""
        return {"inputs": planner.inputs, "output_specs": planner.outputs,
                "format_options": {"feature_names": feature_names(planner.spec, name, target)}}, {}

    def open_runner(self, artifact: Artifact) -> Runner:
        """JPMML's evaluator on the document (its schema checks included); each batch scored as a
        table of the feature fields."""
        if shutil.which("java") is None:
            raise RuntimeUnavailable(f"JPMML needs Java, which is not on PATH (install it with: {INSTALL_JAVA})")
        gateway, evaluator = _open_evaluator(artifact)
        _require_fields(evaluator, gateway, (artifact.options or {})["feature_names"], artifact)
        specs = artifact.output_specs or []
        columns = (artifact.options or {})["feature_names"]
        source_input = artifact.input_names[0]

        def run(feed: dict) -> dict:
            import numpy as np
            import pandas as pd

            table = pd.DataFrame(np.asarray(feed[source_input], dtype=np.float64), columns=columns)
            try:
                result = evaluator.evaluateAll(table)
            except Exception as err:  # py4j's Py4JJavaError / Py4JNetworkError
                raise StepError(artifact.step, f"JPMML cannot score {artifact.path.name}: {_java_problem(err)}") from None
            got = _outputs(result, specs, artifact)
            return {n: got[n] for n in artifact.outputs}

        # validate closes it (close_runner); else the JVM ends with the runner, and with kiln (die_on_exit)
        run.close = weakref.finalize(run, _close, gateway)  # a finalize runs once, whichever comes first
        return run


def feature_names(spec: Any, name: str, target: PmmlTarget) -> list[str]:
    """The PMML field of each input column: options.feature_names, else the input's .csv `columns`,
    else <input>_<i>. The input must be one [batch, N] matrix with N fixed."""
    if len(spec.inputs) != 1:
        raise CrossError("inputs", [t.name for t in spec.inputs], "one input for a pmml target (the 2-D feature matrix the model's predict takes)")
    tensor = spec.inputs[0]
    shape = tensor.shape or []
    if len(shape) != 2 or not isinstance(shape[1], int):
        raise CrossError(f"inputs.{tensor.name}.shape", tensor.shape, "[\"batch\", N] with N the model's feature count, a fixed int, for a pmml target (PMML names every feature field)")
    names, key = target.options.feature_names, f"targets.{name}.options.feature_names"
    if names is None and tensor.columns is not None:
        names, key = tensor.columns, f"inputs.{tensor.name}.columns"
    if names is None:
        return default_feature_names(tensor.name, shape[1])
    if len(names) != shape[1]:
        raise CrossError(key, names, f"{shape[1]} names, one per column of input {tensor.name!r} (shape {shape})")
    if len(set(names)) != len(names) or spec.outputs[0].name in names:
        raise CrossError(key, names, f"names used once, and not the target field's name {spec.outputs[0].name!r}")
    return list(names)


def default_feature_names(input_name: str, count: int) -> list[str]:
    """The fields of an input whose names the manifest does not declare: <input>_0, <input>_1, ..."""
    return [f"{input_name}_{i}" for i in range(count)]


def _open_evaluator(artifact: Artifact):
    """A py4j gateway (a java child process that dies with kiln) and JPMML's evaluator on the file."""
    try:
        from jpmml_evaluator import _classpath, make_evaluator
    except ImportError:
        raise StepError(artifact.step, "PMML is validated in JPMML, whose 'jpmml_evaluator' package is not installed; install it with: pip install 'kiln[pmml]'") from None
    from jpmml_evaluator.py4j import Py4JBackend
    from py4j.java_gateway import JavaGateway

    gateway = JavaGateway.launch_gateway(classpath=os.pathsep.join(_classpath([])), die_on_exit=True)
    try:
        evaluator = make_evaluator(str(artifact.path), backend=Py4JBackend(gateway)).verify()
    except Exception as err:  # Py4JJavaError: not XML, not PMML, a model JPMML refuses
        problem = _java_problem(err)  # read while the gateway that holds the Java exception is up
        _close(gateway)
        raise StepError(artifact.step, f"JPMML cannot load {artifact.path.name}: {problem}") from None
    return gateway, evaluator


def _require_fields(evaluator, gateway, columns: list[str], artifact: Artifact) -> None:
    """Every input field of the document must be a column fed (by name, so order does not matter;
    a converter may leave out fields the model never reads): JPMML scores a field the table lacks
    as a missing value, which would give plausible numbers from the wrong inputs."""
    try:
        fields = [field.getName() for field in evaluator.getInputFields()]
    except Exception as err:  # the gateway went away
        _close(gateway)
        raise StepError(artifact.step, f"JPMML cannot list the input fields of {artifact.path.name}: {_java_problem(err)}") from None
    unfed = [name for name in fields if name not in columns]
    if unfed:
        _close(gateway)
        raise StepError(artifact.step, f"{artifact.path.name} reads input field {unfed[0]!r}, which validation does not feed; it feeds {list(columns)[:12]} (the pmml target's feature_names); allowed: a document whose input fields are among them")


def _close(gateway) -> None:
    """End the gateway and its JVM: shutdown() closes only the connections, the JVM (launched with
    die_on_exit) ends when its stdin closes; killed if it has not within seconds."""
    import subprocess

    gateway.shutdown()
    process = gateway.java_process
    if process is None:
        return
    if process.stdin is not None:
        process.stdin.close()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _java_problem(err: Exception) -> str:
    """A Java exception as one line: its class (no package) and message."""
    java = getattr(err, "java_exception", None)
    try:
        if java is not None:
            return one_line(f"{java.getClass().getSimpleName()}: {java.getMessage()}")[:300]
        return one_line(err)[:300]
    except Exception:  # the gateway went away while reading it
        return type(err).__name__


def _outputs(result, specs: list[dict], artifact: Artifact) -> dict:
    """JPMML's result table -> the manifest's outputs: the target field (named after the first
    output), then the probability(<class>) columns in the document's class order, each cast and
    shaped as declared."""
    import numpy as np

    target = specs[0]["name"]
    if target not in result.columns:
        raise StepError(artifact.step, f"{artifact.path.name} gives no target field {target!r} (it gives {list(result.columns)})")
    values = [result[target].to_numpy()]
    if len(specs) > 1:
        probabilities = [c for c in result.columns if str(c).startswith("probability(")]
        if not probabilities:
            raise StepError(artifact.step, f"{artifact.path.name} gives no probability(<class>) fields for output {specs[1]['name']!r} (it gives {list(result.columns)})")
        values.append(result[probabilities].to_numpy())
    shaped = {}
    for spec, value in zip(specs, values, strict=True):
        try:
            value = np.asarray(value).astype(spec["dtype"])
        except (TypeError, ValueError):  # string class labels for an int64 output
            raise StepError(artifact.step, f"{artifact.path.name}: output {spec['name']!r} gives values like {value[:1].tolist()}, which are not {spec['dtype']}") from None
        shape = spec.get("shape")
        if shape is not None and value.ndim == len(shape) - 1:
            value = value.reshape(*value.shape, 1)
        shaped[spec["name"]] = np.ascontiguousarray(value)
    return shaped
