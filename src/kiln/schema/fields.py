"""The pieces of the manifest schema that formats and sources share (pydantic v2, strict, frozen,
unknown keys forbidden): the model table, tensors, thresholds and their per-precision defaults,
export options, what every target has, the validation and calibration tables, and CrossError, the
way a check spanning several keys names the key to blame.

Each format's target model (kiln.formats.<format>) and each source kind's model
(kiln.sources.<kind>) builds on these; kiln.define.spec assembles them into the Spec.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
TENSOR_NAME = r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,127}$"
# torch.onnx.export's TorchScript exporter supports opsets 7..20; 14 is the first with the ops
# transformer attention exports to (Trilu, scaled_dot_product_attention's decomposition).
MIN_OPSET, MAX_OPSET = 14, 20
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool")
METRICS = ("max_abs_diff", "max_rel_diff", "mean_cosine", "min_cosine")
FACTORY = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"  # module:function


class Strict(BaseModel):
    # strict: "17" is not an opset and 1 is not true; TOML has real types, so demand them.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelInfo(Strict):
    """The model's name names its build folder: build/<name>/."""

    name: str = Field(pattern=NAME, description="letters, digits, _ . - ; names build/<name>/")
    description: str = ""
    allow_outside_workspace: bool = Field(False, description="let the manifest's file paths (source, data) point outside the workspace; pkg: paths are always allowed")


# The dynamic axis name that marks where a tensor's samples lie (kiln.runtime.data.BATCH, which
# rules use at run time, is the same name; README: manifest reference, inputs).
BATCH = "batch"


class TensorSpec(Strict):
    """A model input or output. Shape entries: an int (fixed) or a name (a dynamic axis). The axis
    named "batch" holds the samples; a tensor whose shape lacks it is fed (or compared) whole."""

    name: str = Field(pattern=TENSOR_NAME)
    dtype: Literal[DTYPES] = "float32"  # type: ignore[valid-type]
    shape: list[Annotated[int, Field(ge=1)] | Annotated[str, Field(pattern=r"^[A-Za-z_]\w*$")]] | None = None
    range: list[float] | None = Field(
        None, min_length=2, max_length=2,
        description="[low, high) of generated example values (ints: token ids, classes...)",
    )
    columns: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=1,
        description="an input read from .csv data: its columns, in order (default: the column named like a 1-D input, or every column for a model's only input)",
    )

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape or []) if isinstance(d, str)}

    @property
    def batch_axis(self) -> int | None:
        """Where the samples lie: the axis named "batch"; 0 without a shape; None for a shape without it."""
        if self.shape is None:
            return 0
        return self.shape.index(BATCH) if BATCH in self.shape else None

    @model_validator(mode="after")
    def _one_batch_axis(self) -> "TensorSpec":
        if (self.shape or []).count(BATCH) > 1:
            raise CrossError("shape", self.shape, f"{BATCH!r} on one axis at most: it names the axis that holds the samples")
        return self

    @model_validator(mode="after")
    def _columns_fit_the_shape(self) -> "TensorSpec":
        if self.columns is None:
            return self
        shape = self.shape or []
        if len(shape) not in (1, 2) or shape[0] != BATCH or (len(shape) == 1 and len(self.columns) != 1):
            raise CrossError("columns", self.columns, f'one column for shape ["{BATCH}"], or N columns for ["{BATCH}", N]: a table row is one sample')
        if len(shape) == 2 and isinstance(shape[1], int) and shape[1] != len(self.columns):
            raise CrossError("columns", self.columns, f"{shape[1]} column names, one per feature of shape {shape}")
        if len(set(self.columns)) != len(self.columns):
            raise CrossError("columns", self.columns, "each column named once")
        return self


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
    external_data: bool | Literal["auto"] = Field(
        "auto", description="write every ONNX of this target's chain as model.onnx + model.onnx.data (all tensors in one file; "
                            "needed over protobuf's 2 GB limit); 'auto': when the source's files exceed 1.5 GiB (a factory "
                            "source without a weights file counts as small); onnxsim is not run on such models")


class TargetBase(Strict):
    """What every target has besides its format and precision."""

    hardware: Literal["cpu"] = "cpu"
    thresholds: Thresholds = Field(Thresholds(), description="overrides [validation.thresholds] for this target")
    allow_unvalidated: bool = Field(False, description="publish the artifact when no runtime for its format exists on this machine (the report then says 'not validated: <reason>'); a failed comparison still fails")


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


class CrossError(ValueError):
    """A rule spanning several keys; carries the key to blame so the message can name it."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}")


def check_option_precisions(name: str, target: Any, table: dict[str, tuple[str, ...]]) -> None:
    """Options set on a target that apply to other precisions only (table: option -> precisions)."""
    for option in sorted(target.options.model_fields_set):
        allowed = table.get(option)
        if allowed and target.precision not in allowed:
            wanted = " or ".join(f'"{p}"' for p in allowed)
            raise CrossError(f"targets.{name}.options.{option}", getattr(target.options, option), f"no {option} for precision = \"{target.precision}\" (it applies to precision = {wanted} only)")
