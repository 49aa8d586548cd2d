"""kind = "xgboost": a fitted XGBoost model, from XGBoost's own model file (.json or .ubj), a
`module:function` factory returning an XGBClassifier/XGBRegressor or a Booster, or a pickle (only
with allow_pickle). Converted to ONNX by onnxmltools (build_rules/convert_trees.py); its reference
outputs are XGBoost's own predict / predict_proba. What the tree kinds share: kiln.sources.boosted_trees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from kiln.errors import StepError
from kiln.sources.base import REFERENCE_TOOLS
from kiln.sources.boosted_trees import BoostedTrees, TreesSource, library_error, load_origin

MODEL_SUFFIXES = (".json", ".ubj")
# XGBoost objectives by what the sklearn API wraps them in (what onnxmltools converts).
CLASSIFIER_PREFIXES = ("binary:logistic", "multi:")
REGRESSOR_PREFIXES = ("reg:",)


class XgboostSource(TreesSource):
    """An XGBoost model: its .json/.ubj model file, a `module:function` factory returning a fitted model
    (found beside the manifest or from the workspace root), or a pickle (only with allow_pickle).
    Converted to ONNX with onnxmltools (pip install 'kiln[xgboost]')."""

    kind: Literal["xgboost"]


class Xgboost(BoostedTrees):
    kind = "xgboost"
    framework: ClassVar[str | None] = "xgboost"  # gives onnx (onnxmltools) and pmml (sklearn2pmml)
    Source = XgboostSource
    library = "XGBoost"
    named = "an xgboost source"
    model_suffixes = MODEL_SUFFIXES
    extra: ClassVar = (("xgboost", "onnxmltools"), "xgboost")
    library_tools = ("xgboost", "xgboost-cpu")  # distributions: either installs the xgboost module
    reference_tools: ClassVar[tuple[str, ...]] = (*REFERENCE_TOOLS, *library_tools)

    def load_model(self, source: dict, files: list[Path], root: Path) -> Any:
        return load_model(source, files, root)


def load_model(source: dict[str, Any], files: list[Path], root: Path) -> Any:
    """The fitted model as XGBClassifier or XGBRegressor (a Booster is wrapped by its objective), with
    its feature names dropped: onnxmltools demands names f0..fN, and kiln feeds plain arrays (they
    stay in kiln_feature_names, to check the manifest's names against)."""
    import xgboost

    if source.get("path") and Path(files[0]).suffix in MODEL_SUFFIXES:
        booster = xgboost.Booster()
        try:
            booster.load_model(str(files[0]))
        except xgboost.core.XGBoostError as err:
            raise StepError(str(files[0]), f"source.path: not a readable XGBoost model ({library_error(str(err))}); allowed: a file written by XGBoost's save_model as {' or '.join(MODEL_SUFFIXES)}") from None
        model = _wrapped(booster, str(files[0]))
    else:
        model = load_origin(source, files, root)
        if isinstance(model, xgboost.Booster):
            model = _wrapped(model, source.get("factory") or files[0].name)
        elif not isinstance(model, (xgboost.XGBClassifier, xgboost.XGBRegressor)):
            raise StepError("source", f"{source.get('factory') or files[0].name} gave {type(model).__name__}; allowed: XGBClassifier, XGBRegressor or xgboost.Booster")
    booster = model.get_booster()
    # kept for kiln.sources.sklearn.model_feature_names: the manifest's names are checked against them
    model.kiln_feature_names = list(booster.feature_names) if booster.feature_names else None
    booster.feature_names = None
    booster.feature_types = None
    return model


def _wrapped(booster: Any, origin: str) -> Any:
    """The sklearn-API class for a Booster's objective, holding that booster (XGBoost's own load)."""
    import json

    import xgboost

    objective = json.loads(booster.save_config())["learner"]["objective"]["name"]
    if objective.startswith(CLASSIFIER_PREFIXES):
        model = xgboost.XGBClassifier()
    elif objective.startswith(REGRESSOR_PREFIXES):
        model = xgboost.XGBRegressor()
    else:
        raise StepError(origin, f"objective {objective!r} is not one kiln converts; allowed: {[p + '*' for p in (*CLASSIFIER_PREFIXES, *REGRESSOR_PREFIXES)]}")
    model.load_model(bytearray(booster.save_raw("ubj")))
    return model
