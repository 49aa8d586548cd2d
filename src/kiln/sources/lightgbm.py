"""kind = "lightgbm": a fitted LightGBM model, from LightGBM's own text model file (.txt, written by
Booster.save_model), a `module:function` factory returning an LGBMClassifier/LGBMRegressor or a
Booster, or a pickle (only with allow_pickle). Converted to ONNX by onnxmltools
(build_rules/convert_trees.py); its reference outputs are LightGBM's own predictions. What the tree
kinds share: kiln.sources.boosted_trees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from kiln.errors import StepError, one_line
from kiln.runtime.child import fail, read_job, run_in_child
from kiln.sources.base import REFERENCE_TOOLS
from kiln.sources.boosted_trees import BoostedTrees, TreesSource, library_error, load_origin

MODEL_SUFFIXES = (".txt",)
CLASSIFIER_OBJECTIVES = ("binary", "multiclass", "multiclassova")
REGRESSOR_OBJECTIVES = ("regression", "regression_l1", "huber", "fair", "poisson", "quantile", "mape", "gamma", "tweedie")


class LightgbmSource(TreesSource):
    """A LightGBM model: its .txt model file, a `module:function` factory returning a fitted model (found
    beside the manifest or from the workspace root), or a pickle (only with allow_pickle). Converted
    to ONNX with onnxmltools (pip install 'kiln[lightgbm]')."""

    kind: Literal["lightgbm"]


class Lightgbm(BoostedTrees):
    kind = "lightgbm"
    framework: ClassVar[str | None] = "lightgbm"  # gives onnx (onnxmltools) and pmml (sklearn2pmml)
    Source = LightgbmSource
    library = "LightGBM"
    named = "a lightgbm source"
    model_suffixes = MODEL_SUFFIXES
    extra: ClassVar = (("lightgbm", "onnxmltools"), "lightgbm")
    library_tools = ("lightgbm",)
    reference_tools: ClassVar[tuple[str, ...]] = (*REFERENCE_TOOLS, *library_tools)

    def load_model(self, source: dict, files: list[Path], root: Path) -> Any:
        return load_model(source, files, root)

    def results(self, model: Any, features: Any) -> tuple:
        import lightgbm

        if isinstance(model, lightgbm.Booster):
            return booster_results(model, features)
        return super().results(model, features)


def load_model(source: dict[str, Any], files: list[Path], root: Path) -> Any:
    """The fitted model: an LGBMClassifier/LGBMRegressor as the factory or pickle gave it, or a Booster
    (a .txt file, or what the factory gave) whose objective kiln converts."""
    import lightgbm

    if source.get("path") and Path(files[0]).suffix in MODEL_SUFFIXES:
        _check_model_text(files[0])
        _first_load_in_child(files[0])
        try:
            model = lightgbm.Booster(model_file=str(files[0]))
        except (lightgbm.basic.LightGBMError, ValueError) as err:  # ValueError: its Python side parsing the text
            raise StepError(str(files[0]), f"source.path: not a readable LightGBM model ({library_error(str(err))}); allowed: a file written by LightGBM's save_model (.txt)") from None
    else:
        model = load_origin(source, files, root)
        if not isinstance(model, (lightgbm.Booster, lightgbm.LGBMClassifier, lightgbm.LGBMRegressor)):
            raise StepError("source", f"{source.get('factory') or files[0].name} gave {type(model).__name__}; allowed: LGBMClassifier, LGBMRegressor or lightgbm.Booster")
    if isinstance(model, lightgbm.Booster):
        objective(model, str(files[0]) if source.get("path") else source["factory"])  # refuses what kiln cannot convert
    return model


def _check_model_text(path: Path) -> None:
    """LightGBM aborts or crashes the whole process (C++ terminate, a segfault) on some truncated model
    files, so the structure is checked first: the 'tree' header, one Tree= block per size in
    tree_sizes, the 'end of trees' line, the parameters section closed by 'end of parameters', and
    the final 'pandas_categorical:' line (LightGBM's Python API writes it last) holding whole JSON."""
    import json

    text = path.read_bytes()
    if not text.startswith(b"tree\n"):
        raise StepError(str(path), "source.path: not a LightGBM model: the file does not start with the 'tree' header; allowed: a file written by LightGBM's save_model (.txt)")
    sizes = next((line for line in text.split(b"\n", 64)[:64] if line.startswith(b"tree_sizes=")), None)
    expected = len(sizes.split(b"=", 1)[1].split()) if sizes else None
    found = text.count(b"\nTree=")
    if b"\nend of trees" not in text or (expected is not None and found != expected):
        raise StepError(str(path), f"source.path: truncated LightGBM model: {found} of {expected if expected is not None else '?'} trees and no 'end of trees' line; allowed: a complete file written by save_model")
    if b"\nparameters:" in text and b"\nend of parameters" not in text:
        raise StepError(str(path), "source.path: truncated LightGBM model: its 'parameters:' section has no 'end of parameters' line; allowed: a complete file written by save_model")
    last = text.rstrip().rsplit(b"\n", 1)[-1]
    try:
        if not last.startswith(b"pandas_categorical:"):
            raise ValueError("no final 'pandas_categorical:' line")
        json.loads(last[len(b"pandas_categorical:"):])
    except ValueError as err:  # JSONDecodeError (a cut inside the JSON), UnicodeDecodeError
        raise StepError(str(path), f"source.path: truncated LightGBM model: {one_line(err)[:120]}; allowed: a complete file written by save_model, whose last line is 'pandas_categorical:<json>'") from None


_LOADED_SAFELY: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) a child loaded without crashing


def _first_load_in_child(path: Path) -> None:
    """Load the file once in a child process first: a complete but corrupt file (a damaged tree
    block) still makes LightGBM abort the process it loads in (C++ terminate, measured on files with
    a few bytes changed), which would end the build with no report. Once per file per process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _LOADED_SAFELY:
        return
    allowed = "; allowed: a file written by LightGBM's save_model (.txt)"
    try:
        run_in_child(str(path), "kiln.sources.lightgbm:child_load", {"path": str(path)}, "source.path: not a readable LightGBM model", allowed)
    except StepError as err:  # a crash's message says how the child died, and not yet what is allowed
        raise StepError(str(path), err.problem if err.problem.endswith(allowed) else err.problem + allowed) from None
    _LOADED_SAFELY.add(key)


def child_load() -> None:
    """In the child: load the model and predict one row, as the steps will (run_in_child's job)."""
    import lightgbm
    import numpy as np

    try:
        booster = lightgbm.Booster(model_file=read_job()["path"])
        booster.predict(np.zeros((1, booster.num_feature())))
    except (lightgbm.basic.LightGBMError, ValueError, MemoryError) as err:  # what LightGBM raises rather than aborting
        fail(err)


def objective(booster: Any, origin: str) -> str:
    """The booster's objective name ('binary', 'multiclass', 'regression'...), if kiln converts it."""
    name = str(booster.params.get("objective") or "")
    if not name:  # params absent: the model text's header says it ("objective=binary sigmoid:1")
        header = booster.model_to_string(num_iteration=1).split("\n", 64)
        name = next((line.split("=", 1)[1] for line in header if line.startswith("objective=")), "")
    name = name.split()[0] if name else "<none>"
    if name not in (*CLASSIFIER_OBJECTIVES, *REGRESSOR_OBJECTIVES):
        raise StepError(origin, f"objective {name!r} is not one kiln converts; allowed: {[*CLASSIFIER_OBJECTIVES, *REGRESSOR_OBJECTIVES]}")
    return name


def booster_results(booster: Any, features: Any) -> tuple:
    """A Booster's own predictions in onnxmltools' order: a classifier's class (argmax) and class
    probabilities (binary: [1 - p, p]); a regressor's values."""
    import numpy as np

    predicted = np.asarray(booster.predict(features))
    name = objective(booster, "source")
    if name not in CLASSIFIER_OBJECTIVES:
        return (predicted,)
    probabilities = np.stack([1 - predicted, predicted], axis=1) if name == "binary" else predicted
    return np.argmax(probabilities, axis=1), probabilities


def float32_exact(model: Any) -> Any:
    """The model with every split threshold rounded down to a float32 value, for the converter.

    LightGBM compares a feature, as a double, with double thresholds; the ONNX tree operators hold
    float32 thresholds, and onnxmltools rounds each to the nearest float32, which can land on a
    feature value and send that sample down the other branch (measured: one of the 100 diabetes
    rows off by 27). For a float32 feature x, x <= t exactly when x <= the largest float32 <= t, so
    the rounded-down thresholds decide every float32 input as LightGBM does, and the converter then
    keeps them exactly. A copy: the reference still predicts with the model as it was given."""
    import copy

    import lightgbm

    booster = model if isinstance(model, lightgbm.Booster) else model.booster_
    # tree_sizes (byte offsets LightGBM parses trees by) is left out: the new thresholds change them
    lines = [line for line in booster.model_to_string().split("\n") if not line.startswith("tree_sizes=")]
    rounded = lightgbm.Booster(model_str="\n".join(_rounded_down(line) if line.startswith("threshold=") else line for line in lines))
    if isinstance(model, lightgbm.Booster):
        return rounded
    wrapper = copy.copy(model)
    wrapper._Booster = rounded  # the sklearn wrapper keeps its classes_, which the converter reads
    return wrapper


def _rounded_down(line: str) -> str:
    import numpy as np

    values = np.array(line.split("=", 1)[1].split(), dtype=np.float64)
    down = values.astype(np.float32)
    down = np.where(down.astype(np.float64) > values, np.nextafter(down, np.float32(-np.inf)), down)
    return "threshold=" + " ".join(repr(float(v)) for v in down)
