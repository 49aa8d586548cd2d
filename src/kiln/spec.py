"""Stage 2: validate a raw manifest into a frozen Spec (pydantic v2).

Every model forbids unknown keys. Targets are a discriminated union on `format`, sources on `kind`,
so an error names exactly the key that is wrong. `validate()` turns pydantic's errors into one
ManifestError line: file, dotted key (`targets.onnx_fp32.opset`), the bad value, what is allowed.
Checks that need the disk (files exist, pickle policy) are in kiln.sources, not here.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kiln.errors import ManifestError
from kiln.manifest import RawManifest

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
TENSOR_NAME = r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,127}$"
# torch.onnx.export's TorchScript exporter supports opsets 7..20; 14 is the first with the ops
# transformer attention exports to (Trilu, scaled_dot_product_attention's decomposition).
MIN_OPSET, MAX_OPSET = 14, 20
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool")
METRICS = ("max_abs_diff", "max_rel_diff", "mean_cosine", "min_cosine")


class Strict(BaseModel):
    # strict: "17" is not an opset and 1 is not true; TOML has real types, so demand them.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelInfo(Strict):
    """The model's name names its build folder: build/<name>/."""

    name: str = Field(pattern=NAME, description="letters, digits, _ . - ; names build/<name>/")
    description: str = ""
    allow_outside_workspace: bool = Field(False, description="let the manifest's file paths (source, data) point outside the workspace; pkg: paths are always allowed")


class HuggingFaceSource(Strict):
    """A local Hugging Face model folder (config.json + weights), loaded with transformers.AutoModel."""

    kind: Literal["huggingface"]
    path: str = Field(
        min_length=1,
        description="folder relative to the manifest, or pkg:<package>/<subdir> inside an installed package",
    )
    allow_pickle: bool = Field(False, description="allow .bin/.pt weights (pickle can run code)")
    trust_remote_code: bool = Field(False, description="let transformers run Python code from the folder")


class TorchSource(Strict):
    """A Python factory `module:function` returning a torch.nn.Module, with optional weights."""

    kind: Literal["torch"]
    factory: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description="module:function")
    weights: str | None = Field(None, description=".safetensors file (or .pt/.bin with allow_pickle)")
    allow_pickle: bool = False


class OnnxSource(Strict):
    """An existing ONNX file; targets are validated against it in onnxruntime."""

    kind: Literal["onnx"]
    path: str = Field(min_length=1)


class SklearnSource(Strict):
    """A scikit-learn estimator: a `module:function` factory returning a fitted estimator (found
    beside the manifest or from the workspace root), or a joblib/pickle file (only with allow_pickle,
    since unpickling runs code). Converted to ONNX with skl2onnx (pip install 'kiln[sklearn]')."""

    kind: Literal["sklearn"]
    factory: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description="module:function returning a fitted estimator")
    path: str | None = Field(None, min_length=1, description="a .joblib/.pkl file with a fitted estimator (needs allow_pickle = true)")
    allow_pickle: bool = Field(False, description="allow loading a pickled estimator (pickle can run code)")

    @model_validator(mode="after")
    def _one_origin(self) -> "SklearnSource":
        if (self.factory is None) == (self.path is None):
            raise _CrossError("factory", self.factory if self.factory is not None else "<missing>", "exactly one of source.factory (module:function) or source.path (a joblib/pickle file)")
        return self


Source = Annotated[Union[HuggingFaceSource, TorchSource, OnnxSource, SklearnSource], Field(discriminator="kind")]


class TensorSpec(Strict):
    """A model input or output. Shape entries: an int (fixed) or a name (a dynamic axis)."""

    name: str = Field(pattern=TENSOR_NAME)
    dtype: Literal[DTYPES] = "float32"  # type: ignore[valid-type]
    shape: list[Annotated[int, Field(ge=1)] | Annotated[str, Field(pattern=r"^[A-Za-z_]\w*$")]] | None = None
    range: list[float] | None = Field(
        None, min_length=2, max_length=2,
        description="[low, high) of generated example values (ints: token ids, classes...)",
    )

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape or []) if isinstance(d, str)}


class Thresholds(Strict):
    """Validation gates; unset ones fall back to the per-precision defaults (see defaults_for)."""

    min_cosine: float | None = Field(None, ge=-1.0, le=1.0)
    mean_cosine: float | None = Field(None, ge=-1.0, le=1.0)
    max_abs_diff: float | None = Field(None, ge=0.0)
    max_rel_diff: float | None = Field(None, ge=0.0)


# fp32 export should be numerically the same model: cosine within float rounding, and absolute
# differences at the level of accumulated fp32 reordering (measured ~7e-5 on all-MiniLM-L6-v2).
# fp16/bf16 weights (widened back to fp32 at run time) lose 11/8 mantissa bits: per-token cosine
# stays above 1 - 1e-3 (fp16) and 1 - 1e-2 (bf16) on all-MiniLM-L6-v2; absolute error is not gated.
PRECISION_DEFAULTS: dict[str, Thresholds] = {
    "fp32": Thresholds(min_cosine=0.9999, mean_cosine=0.99999, max_abs_diff=1e-4),
    "fp16": Thresholds(min_cosine=0.999, mean_cosine=0.9999),
    "bf16": Thresholds(min_cosine=0.99, mean_cosine=0.999),
    # Dynamic int8 with per-tensor activation scales: on all-MiniLM-L6-v2 the mean per-token cosine
    # is ~0.989 and the worst real token ~0.94 (outlier channels in the early FFNs). The gate
    # catches a broken quantization (a collapsed model scores < 0.5) without failing a sound one;
    # tighten it per target where the model allows.
    "int8": Thresholds(min_cosine=0.9, mean_cosine=0.98),
    # int4 weights (blocks of 32 along K, fp32 activations) lose more: on all-MiniLM-L6-v2 the mean
    # per-token cosine is ~0.972 and the worst real token ~0.877. Small models suffer most (every one
    # of its 384 channels matters); the gate again separates "lossy" from "broken".
    "int4": Thresholds(min_cosine=0.8, mean_cosine=0.95),
}


class ExportOptions(Strict):
    """How the fp32 ONNX is made (shared by every target that converts it: onnx, openvino)."""

    simplify: bool = Field(True, description="run onnxsim after the ONNX export")
    constant_folding: bool = Field(True, description="torch.onnx.export do_constant_folding")


class OnnxOptions(ExportOptions):
    keep_io_types: bool = Field(True, description="fp16: keep the model's float inputs and outputs fp32")
    keep_fp32_ops: list[Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")]] = Field([], description="fp16: op types to keep in fp32, e.g. [\"Softmax\"]")
    quantization: Literal["dynamic", "static"] = Field("dynamic", description="int8: 'dynamic' quantizes activations at run time; 'static' uses ranges calibrated on [calibration].data (QDQ)")
    calibration: Literal["minmax", "percentile", "entropy"] = Field("percentile", description="int8 static: how calibrated histograms become activation ranges")
    percentile: float = Field(99.999, gt=0.0, le=100.0, description="int8 static, calibration = 'percentile': the share of |x| kept inside the range")
    activation_type: Literal["uint8", "int8"] = Field("uint8", description="int8 static: activation type (uint8 is asymmetric, the fast path on x86 CPUs)")
    exclude_nodes: list[Annotated[str, Field(min_length=1)]] = Field([], description="int8/int4: graph node names left in fp32 (per-layer fallback for sensitive layers)")
    block_size: int = Field(32, description="int4: weights per quantization block along K (16, 32, 64, 128 or 256)")
    symmetric: bool = Field(False, description="int4: symmetric blocks (no zero points); false stores a zero point per block")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(4, description="int4: MatMulNBits accuracy_level (4: int8 activations in the kernel, fastest on CPU; 0: fp32 activations)")

    @model_validator(mode="after")
    def _block_size_is_a_power_of_two(self) -> "OnnxOptions":
        if self.block_size not in (16, 32, 64, 128, 256):
            raise _CrossError("block_size", self.block_size, "one of 16, 32, 64, 128, 256")
        return self


# Which precision each option applies to: setting one for another precision is a mistake worth naming.
OPTION_PRECISIONS: dict[str, tuple[str, ...]] = {
    "keep_io_types": ("fp16",), "keep_fp32_ops": ("fp16",), "quantization": ("int8",),
    "calibration": ("int8",), "percentile": ("int8",), "activation_type": ("int8",),
    "exclude_nodes": ("int8", "int4"), "block_size": ("int4",), "symmetric": ("int4",), "accuracy_level": ("int4",),
}
STATIC_ONLY_OPTIONS = ("calibration", "percentile", "activation_type")


class TargetBase(Strict):
    """What every target has besides its format and precision."""

    hardware: Literal["cpu"] = "cpu"
    thresholds: Thresholds = Field(Thresholds(), description="overrides [validation.thresholds] for this target")
    allow_unvalidated: bool = Field(False, description="publish the artifact when no runtime for its format exists on this machine (the report then says 'not validated: <reason>'); a failed comparison still fails")


class OnnxTarget(TargetBase):
    format: Literal["onnx"]
    precision: Literal["fp32", "fp16", "int8", "int4"] = "fp32"
    opset: int = Field(17, ge=MIN_OPSET, le=MAX_OPSET)
    options: OnnxOptions = OnnxOptions()


class SafetensorsTarget(TargetBase):
    """The source model's weights (its state_dict) as SafeTensors, floats cast to `precision`."""

    format: Literal["safetensors"]
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"


class TorchscriptTarget(TargetBase):
    """The source model as TorchScript (.pt), reloaded with torch.jit.load for validation."""

    format: Literal["torchscript"]
    precision: Literal["fp32"] = "fp32"
    mode: Literal["trace", "script"] = Field("trace", description="trace: record one run (any model); script: compile the Python (input-dependent control flow)")


class TorchExportTarget(TargetBase):
    """The source model as a torch.export ExportedProgram (.pt2), reloaded with torch.export.load."""

    format: Literal["torch_export"]
    precision: Literal["fp32"] = "fp32"


class OpenvinoTarget(TargetBase):
    """OpenVINO IR (model.xml + model.bin) converted from the ONNX export by the openvino package,
    validated with OpenVINO's CPU runtime. fp16: weights compressed to fp16 (computed in fp32 on CPU)."""

    format: Literal["openvino"]
    precision: Literal["fp32", "fp16"] = "fp32"
    opset: int = Field(17, ge=MIN_OPSET, le=MAX_OPSET, description="opset of the ONNX export it converts")
    options: ExportOptions = ExportOptions()


class TensorrtOptions(ExportOptions):
    """How the engine is built. Precision comes from the ONNX graph it is built from (TensorRT 10's
    strongly typed networks, the only kind in TensorRT 11): fp32 and fp16 from kiln's fp32 / fp16
    ONNX, int8 from a QDQ ONNX with int8 symmetric activations calibrated on [calibration].data."""

    keep_fp32_ops: list[Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")]] = Field([], description="fp16: op types kept in fp32 in the fp16 ONNX")
    calibration: Literal["minmax", "percentile", "entropy"] = Field("percentile", description="int8: how calibrated histograms become activation ranges")
    percentile: float = Field(99.999, gt=0.0, le=100.0, description="int8, calibration = 'percentile': the share of |x| kept inside the range")
    exclude_nodes: list[Annotated[str, Field(min_length=1)]] = Field([], description="int8: graph node names left unquantized")
    workspace_mib: int = Field(1024, ge=16, le=1 << 20, description="builder workspace memory pool limit, MiB")
    optimization_level: Literal[0, 1, 2, 3, 4, 5] = Field(3, description="builder optimization level (higher: longer builds, maybe faster engines)")
    tf32: bool = Field(False, description="fp32: allow TF32 matmuls (10-bit mantissa; faster on Ampere+, fails the fp32 gates on most models)")


TRT_OPTION_PRECISIONS = {"keep_fp32_ops": ("fp16",), "calibration": ("int8",), "percentile": ("int8",), "exclude_nodes": ("int8",), "tf32": ("fp32",)}


class TensorrtTarget(TargetBase):
    """A TensorRT engine (.engine) built from the matching ONNX artifact with the tensorrt package on
    an NVIDIA GPU, validated with TensorRT's runtime on that GPU. Engines are specific to the GPU
    model and TensorRT version, which enter the step key (pip install 'kiln[tensorrt]')."""

    format: Literal["tensorrt"]
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    hardware: Literal["cuda"] = Field("cuda", description="an NVIDIA GPU")
    device: int = Field(0, ge=0, le=63, description="CUDA device ordinal to build and validate on")
    opset: int = Field(17, ge=MIN_OPSET, le=MAX_OPSET, description="opset of the ONNX export it builds from")
    profile: dict[Annotated[str, Field(pattern=r"^[A-Za-z_]\w*$")], Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=3, max_length=3)]] = Field(
        {}, description="optimization profile: [min, opt, max] for every dynamic axis named in [[inputs]], e.g. { batch = [1, 8, 32], sequence = [1, 128, 128] }")
    options: TensorrtOptions = TensorrtOptions()


Target = Annotated[Union[OnnxTarget, SafetensorsTarget, TorchscriptTarget, TorchExportTarget, OpenvinoTarget, TensorrtTarget], Field(discriminator="format")]
# Formats whose converter is an optional extra: (python module, pip extra).
FORMAT_EXTRAS = {"openvino": ("openvino", "openvino"), "tensorrt": ("tensorrt", "tensorrt")}
# Sources whose loader is an optional extra.
SOURCE_EXTRAS = {"sklearn": (("sklearn", "skl2onnx"), "sklearn")}
# Formats made from the PyTorch model itself: an ONNX source cannot give them.
TORCH_FORMATS = ("safetensors", "torchscript", "torch_export")


class Validation(Strict):
    data: str = Field(min_length=1, description=".txt (one text per line) or .npz/.npy arrays, relative to the manifest")
    batch_size: int = Field(32, ge=1, le=4096)
    max_length: int = Field(128, ge=2, le=8192, description="tokenizer truncation for text data")
    max_samples: int | None = Field(None, ge=1)
    metrics: list[Literal[METRICS]] = list(METRICS)  # type: ignore[valid-type]
    outputs: list[str] | None = Field(None, description="outputs to compare; default: all")
    padding_mask: str | None = Field(None, description="an input (e.g. attention_mask) whose zeros mark padding positions; their rows are left out of the metrics of outputs shaped [batch, sequence, ...]")
    thresholds: Thresholds = Thresholds()


class CalibrationData(Strict):
    """What static int8 targets calibrate their activation ranges on. Keep it apart from the
    validation data: a model calibrated on its test set looks better than it is."""

    data: str = Field(min_length=1, description=".txt (one text per line) or .npz/.npy arrays, relative to the manifest")
    batch_size: int = Field(8, ge=1, le=4096, description="samples per model run; memory holds one batch of activations (8: ~0.3 GB for a 384-wide BERT at 128 tokens)")
    max_length: int = Field(128, ge=2, le=8192, description="tokenizer truncation for text data")
    max_samples: int | None = Field(None, ge=1)
    bins: int = Field(2048, ge=128, le=1 << 20, multiple_of=2, description="histogram bins per tensor")


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
                    raise _CrossError(f"{group}[{i}].name", tensor.name, "a name not used by another of the " + group)
                seen.add(tensor.name)
        for name, target in self.targets.items():
            if target.format == "onnx":
                self._check_onnx_options(name, target)
            if target.format == "tensorrt":
                self._check_tensorrt(name, target)
            if target.format in TORCH_FORMATS and self.source.kind in ("onnx", "sklearn"):
                raise _CrossError(f"targets.{name}.format", target.format, f"a format an {self.source.kind} source can give ('onnx', 'openvino', 'tensorrt'); {target.format} needs a torch or huggingface source")
            if self.source.kind == "sklearn" and (target.format != "onnx" or target.precision != "fp32"):
                key, value = ("format", target.format) if target.format != "onnx" else ("precision", target.precision)
                raise _CrossError(f"targets.{name}.{key}", value, "format = \"onnx\" with precision = \"fp32\" for a sklearn source (skl2onnx's ai.onnx.ml operators have no fp16/int8 form and no OpenVINO or TensorRT kernels)")
        if self.source.kind == "sklearn" and len(self.inputs) != 1:
            raise _CrossError("inputs", [t.name for t in self.inputs], "one input for a sklearn source (the 2-D feature matrix the estimator's predict takes)")
        inputs = [t.name for t in self.inputs]
        if self.validation.padding_mask is not None and self.validation.padding_mask not in inputs:
            raise _CrossError("validation.padding_mask", self.validation.padding_mask, f"one of the inputs: {inputs}")
        known = {o.name for o in self.outputs}
        for name in self.validation.outputs or []:
            if name not in known:
                raise _CrossError("validation.outputs", name, f"one of the declared outputs: {sorted(known)}")
        for metric in self.thresholds_keys():
            if metric not in self.validation.metrics:
                raise _CrossError("validation.metrics", self.validation.metrics, f"a list including {metric!r}, which a threshold gates on")
        return self

    def _check_onnx_options(self, name: str, target: OnnxTarget) -> None:
        options = target.options
        _check_option_precisions(name, target, OPTION_PRECISIONS)
        for option in sorted(options.model_fields_set):
            if option in STATIC_ONLY_OPTIONS and options.quantization != "static":
                raise _CrossError(f"targets.{name}.options.{option}", getattr(options, option), f"no {option} with quantization = \"{options.quantization}\" (it applies to quantization = \"static\" only)")
        if target.precision == "int8" and options.quantization == "static" and self.calibration is None:
            raise _CrossError(f"targets.{name}.options.quantization", "static", "a [calibration] table naming the calibration data (or quantization = \"dynamic\")")

    def _check_tensorrt(self, name: str, target: TensorrtTarget) -> None:
        _check_option_precisions(name, target, TRT_OPTION_PRECISIONS)
        axes = sorted({axis for tensor in self.inputs for axis in tensor.dynamic_axes.values()})
        for axis in axes:
            if axis not in target.profile:
                raise _CrossError(f"targets.{name}.profile", target.profile, f"a [min, opt, max] entry for every dynamic input axis {axes}; {axis!r} is missing")
        for axis, (low, opt, high) in target.profile.items():
            if axis not in axes:
                raise _CrossError(f"targets.{name}.profile.{axis}", [low, opt, high], f"an axis named in the [[inputs]] shapes: {axes}")
            if not low <= opt <= high:
                raise _CrossError(f"targets.{name}.profile.{axis}", [low, opt, high], "min <= opt <= max")
        if target.precision == "int8" and self.calibration is None:
            raise _CrossError(f"targets.{name}.precision", "int8", "a [calibration] table naming the calibration data (TensorRT int8 is built from a calibrated QDQ ONNX)")

    def thresholds_keys(self) -> set[str]:
        keys = {k for k, v in self.validation.thresholds.model_dump().items() if v is not None}
        for target in self.targets.values():
            keys |= {k for k, v in target.thresholds.model_dump().items() if v is not None}
        return keys


class _CrossError(ValueError):
    """A rule spanning several keys; carries the key to blame so the message can name it."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}")


def _check_option_precisions(name: str, target: Any, table: dict[str, tuple[str, ...]]) -> None:
    """Options set on a target that apply to other precisions only (table: option -> precisions)."""
    for option in sorted(target.options.model_fields_set):
        allowed = table.get(option)
        if allowed and target.precision not in allowed:
            wanted = " or ".join(f'"{p}"' for p in allowed)
            raise _CrossError(f"targets.{name}.options.{option}", getattr(target.options, option), f"no {option} for precision = \"{target.precision}\" (it applies to precision = {wanted} only)")


def effective_thresholds(spec: Spec, target_name: str) -> Thresholds:
    """Per-precision defaults, overridden by [validation.thresholds], overridden by the target's."""
    target = spec.targets[target_name]
    merged = PRECISION_DEFAULTS[target.precision].model_dump()
    for layer in (spec.validation.thresholds, target.thresholds):
        merged |= {k: v for k, v in layer.model_dump().items() if v is not None}
    return Thresholds(**merged)


def validate(raw: RawManifest) -> Spec:
    try:
        return Spec.model_validate(raw.data)
    except ValidationError as err:
        raise _manifest_error(raw, err) from None


def json_schema() -> dict[str, Any]:
    return Spec.model_json_schema()


# ---- error messages -------------------------------------------------------------------------

def _manifest_error(raw: RawManifest, err: ValidationError) -> ManifestError:
    errors = err.errors(include_url=False)
    first = errors[0]
    cross = (first.get("ctx") or {}).get("error")
    if isinstance(cross, _CrossError):
        problem = f"{cross.value!r} is not allowed; expected {cross.allowed}"
        where = _locate(raw.data, first["loc"])[0]  # a nested model's check names its key relative to it
        return ManifestError(raw.path, f"{where}.{cross.key}" if where else cross.key, problem + _more(errors))
    key, value, annotation = _locate(raw.data, first["loc"])
    if first["type"].startswith("union_tag_"):  # blame the tag key itself: targets.x.format
        key = f"{key}.{first['ctx']['discriminator'].strip(chr(39))}"
    return ManifestError(raw.path, key, _describe(first, value, annotation) + _more(errors))


def _more(errors: list) -> str:
    extra = len(errors) - 1
    return f" (and {extra} more problem{'s' if extra > 1 else ''})" if extra else ""


def _locate(data: Any, loc: tuple) -> tuple[str, Any, Any]:
    """Walk the raw data and the type annotations along pydantic's loc.

    Returns the user's dotted key, the raw value found there and the annotation that validates it.
    Union tags and pydantic's "[key]" marker in loc are not part of the user's key and are skipped.
    """
    key = ""
    node: Any = data
    annotation: Any = Spec
    for item in loc:
        annotation = _unwrap(annotation)
        origin = typing.get_origin(annotation)
        if item == "[key]":
            node = None  # the error is about the dict key itself, already named in `key`
            continue
        if origin is Union:  # a discriminated union: continue with the member the data selects
            annotation = _union_member(annotation, node)
            origin = None
        if isinstance(node, dict) and item in (node.get("format"), node.get("kind")) and item not in node:
            continue  # a union tag in loc (one-member unions collapse, so check the data, not the type)
        if _is_model(annotation):
            field = annotation.model_fields.get(str(item))
            key = f"{key}.{_quote(str(item))}" if key else _quote(str(item))
            node = node.get(item, _MISSING) if isinstance(node, dict) else _MISSING
            annotation = field.annotation if field is not None else None
        elif origin is dict:
            key = f"{key}.{_quote(str(item))}"
            node = node.get(item, _MISSING) if isinstance(node, dict) else _MISSING
            annotation = typing.get_args(annotation)[1]
        elif origin in (list, tuple) and isinstance(item, int):
            key = f"{key}[{item}]"
            node = node[item] if isinstance(node, list) and item < len(node) else _MISSING
            args = typing.get_args(annotation)
            annotation = args[0] if args else None
        else:
            break  # inside a scalar union (int | str): the key is already precise
    return key, node, annotation


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and Optional[...] so the walk sees the container or model."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
        if all(_is_model(m) for m in members):
            return Union[tuple(members)]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _tag_values(annotation: Any) -> dict[str, type[BaseModel]]:
    """For a discriminated union of models: {tag value: model}."""
    found = {}
    for member in typing.get_args(_unwrap(annotation)):
        for field_name in ("format", "kind"):
            field = member.model_fields.get(field_name) if _is_model(member) else None
            if field is not None and typing.get_origin(field.annotation) is Literal:
                found[typing.get_args(field.annotation)[0]] = member
    return found


def _union_member(annotation: Any, node: Any) -> Any:
    if isinstance(node, dict):
        tags = _tag_values(annotation)
        for tag_key in ("format", "kind"):
            if node.get(tag_key) in tags:
                return tags[node[tag_key]]
    return None


def _quote(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else f'"{key}"'


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _describe(error: dict, value: Any, annotation: Any) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return f"unknown key; allowed keys here: {', '.join(_allowed_keys(error['loc']))}"
    if kind == "union_tag_invalid":
        return f"{ctx['tag']!r} is not allowed; expected one of {ctx['expected_tags']}"
    if kind == "union_tag_not_found":
        return "required key is missing"
    if kind == "literal_error":
        return f"{value!r} is not allowed; expected {ctx['expected']}"
    shown = error.get("input") if value is _MISSING or value is None else value
    msg = error["msg"].replace("Value error, ", "").replace("Input should be", "expected")
    return f"{shown!r} is not allowed; {msg[:1].lower()}{msg[1:]}"


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names of the model that holds the unknown key (walks the schema, not the data)."""
    annotation: Any = Spec
    for item in loc[:-1]:
        annotation = _unwrap(annotation)
        if _is_model(annotation):
            field = annotation.model_fields.get(str(item))
            annotation = field.annotation if field else annotation  # else: a union tag
        elif typing.get_origin(annotation) is Union:
            annotation = _tag_values(annotation).get(item)
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        elif typing.get_origin(annotation) in (list, tuple):
            annotation = typing.get_args(annotation)[0]
    annotation = _unwrap(annotation)
    return sorted(annotation.model_fields) if _is_model(annotation) else []
