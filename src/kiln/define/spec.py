"""Validate a raw manifest into a frozen Spec (pydantic v2).

The Spec is assembled from the registries: its targets are the discriminated union (on `format`) of
every kiln.formats target model, its source the union (on `kind`) of every kiln.sources model, in
registry order. Every model forbids unknown keys, so an error names exactly the key that is wrong;
validate() turns pydantic's errors into one ManifestError line (kiln.schema.messages). Checks that
span several keys run here, each format's and source's own first, in a fixed order so the first
error is always the same. Checks that need the disk (files exist, pickle policy) are in
kiln.define.resolve.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field, ValidationError, model_validator

from kiln.formats import FORMATS, target_format
from kiln.schema.fields import BATCH, NAME, PRECISION_DEFAULTS, CalibrationData, CrossError, ModelInfo, Strict, TensorSpec, Thresholds, Validation
from kiln.schema.manifest import RawManifest
from kiln.schema.messages import manifest_error
from kiln.sources import SOURCES, source_kind

Source = Annotated[Union[tuple(kind.Source for kind in SOURCES)], Field(discriminator="kind")]
Target = Annotated[Union[tuple(fmt.Target for fmt in FORMATS)], Field(discriminator="format")]


class Spec(Strict):
    """A validated manifest. Frozen: later stages cannot change what the user asked for."""

    model: ModelInfo
    source: Source
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    targets: dict[Annotated[str, Field(pattern=NAME)], Target] = Field(min_length=1)
    validation: Validation
    calibration: CalibrationData | None = None

    @model_validator(mode="after")
    def _cross_checks(self) -> "Spec":
        for group in ("inputs", "outputs"):
            seen: set[str] = set()
            for i, tensor in enumerate(getattr(self, group)):
                if tensor.name in seen:
                    raise CrossError(f"{group}[{i}].name", tensor.name, "a name not used by another of the " + group)
                seen.add(tensor.name)
        for i, tensor in enumerate(self.outputs):
            if tensor.columns is not None:
                raise CrossError(f"outputs[{i}].columns", tensor.columns, "no columns on an output (columns say which .csv columns feed an input)")
        source = source_kind(self.source.kind)
        for name, target in self.targets.items():
            fmt = target_format(target.format)
            fmt.check(self, name, target)
            needed = fmt.source_frameworks
            if needed is not None and source.framework not in needed:
                article = "an" if source.kind[0] in "aeiou" else "a"
                raise CrossError(f"targets.{name}.format", target.format, f"a format {article} {source.kind} source can give {_formats_given(source)}; {target.format} needs a {_kinds_giving(needed)} source")
            source.check_target(name, target)
        source.check_spec(self)
        inputs = [t.name for t in self.inputs]
        if self.validation.padding_mask is not None and self.validation.padding_mask not in inputs:
            raise CrossError("validation.padding_mask", self.validation.padding_mask, f"one of the inputs: {inputs}")
        self._check_batch_axes()
        known = {o.name for o in self.outputs}
        for name in self.validation.outputs or []:
            if name not in known:
                raise CrossError("validation.outputs", name, f"one of the declared outputs: {sorted(known)}")
        for metric in self.thresholds_keys():
            if metric not in self.validation.metrics:
                raise CrossError("validation.metrics", self.validation.metrics, f"a list including {metric!r}, which a threshold gates on")
        return self

    def _check_batch_axes(self) -> None:
        """What the batch axis rule (the axis named "batch" holds the samples; inputs without it are
        fed whole) makes impossible: batch settings with nothing to batch, a padding mask without
        samples to mask, text data for an input whose samples are not on axis 0."""
        batched = [t.name for t in self.inputs if t.batch_axis is not None]
        tables = [("validation", self.validation)] + ([("calibration", self.calibration)] if self.calibration else [])
        for table, settings in tables:
            for key in ("batch_size", "max_samples"):
                if not batched and key in settings.model_fields_set:
                    raise CrossError(f"{table}.{key}", getattr(settings, key), f"no {key}: no input's shape names a {BATCH!r} axis, so the data is fed whole as one sample (name the axis that holds the samples \"{BATCH}\" to batch it)")
            if settings.data.endswith(".txt"):
                for i, tensor in enumerate(self.inputs):
                    if tensor.batch_axis not in (0, None):
                        raise CrossError(f"inputs[{i}].shape", tensor.shape, f"{BATCH!r} on axis 0: {table}.data is text, which the tokenizer turns into [batch, sequence] arrays")
        mask = self.validation.padding_mask
        if mask is not None and mask not in batched:
            raise CrossError("validation.padding_mask", mask, f"a batched input (its shape names {BATCH!r}): {batched}")

    def thresholds_keys(self) -> set[str]:
        keys = {k for k, v in self.validation.thresholds.model_dump().items() if v is not None}
        for target in self.targets.values():
            keys |= {k for k, v in target.thresholds.model_dump().items() if v is not None}
        return keys


# Some formats are made from the source model in its own framework, not from the fp32 ONNX every
# source gives: torch programs and weights from an nn.Module, TFLite from a TensorFlow model. A format
# names the frameworks it is made from (`source_frameworks`), a source kind the framework its model
# is in (`framework`).


def _formats_given(kind: Any) -> tuple[str, ...]:
    return tuple(fmt.format for fmt in FORMATS if fmt.source_frameworks is None or kind.framework in fmt.source_frameworks)


def _kinds_giving(frameworks: frozenset[str]) -> str:
    return " or ".join(kind.kind for kind in reversed(SOURCES) if kind.framework in frameworks)


def effective_thresholds(spec: Spec, target_name: str) -> Thresholds:
    """Per-precision defaults, with the format's own where its runtime cannot match the CPU reference
    as closely (TensorRT fp32: Tensorrt.threshold_defaults), overridden by [validation.thresholds],
    overridden by the target's."""
    target = spec.targets[target_name]
    merged = PRECISION_DEFAULTS[target.precision].model_dump()
    merged |= getattr(target_format(target.format), "threshold_defaults", {}).get(target.precision, {})
    for layer in (spec.validation.thresholds, target.thresholds):
        merged |= {k: v for k, v in layer.model_dump().items() if v is not None}
    return Thresholds(**merged)


def validate(raw: RawManifest) -> Spec:
    try:
        return Spec.model_validate(raw.data)
    except ValidationError as err:
        raise manifest_error(raw, err, Spec) from None


def json_schema() -> dict[str, Any]:
    return Spec.model_json_schema()
