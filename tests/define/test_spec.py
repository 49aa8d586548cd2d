"""Bad manifests: each gives one line naming the file, the dotted key, the bad value and what is
allowed. Mutations of the real manifests/bert.toml, so every case differs from a good manifest by
exactly one thing."""

from __future__ import annotations

import copy
import tomllib

import pytest
from pydantic import ValidationError

from conftest import REPO
from kiln.errors import ManifestError
from kiln.schema.manifest import RawManifest
from kiln.define.spec import effective_thresholds, json_schema, validate

GOOD = tomllib.loads((REPO / "manifests/bert.toml").read_text())
# The bad-manifest cases change inputs and axes; the Core ML target's own axis bounds would then be
# the first complaint, so the cases start from bert without it (its checks have their own tests).
GOOD_WITHOUT_COREML = {**GOOD, "targets": {k: v for k, v in GOOD["targets"].items() if v.get("format") != "coreml"}}


def _set(path: str, value):
    def change(data):
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is DELETE:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return change


DELETE = object()

# (mutation, dotted key the message must name, text the message must contain)
BAD = [
    (_set("targets.onnx_fp32.opset", 99), "targets.onnx_fp32.opset", "99 is not allowed; expected less than or equal to 20"),
    (_set("targets.onnx_fp32.opset", 9), "targets.onnx_fp32.opset", "greater than or equal to 14"),
    (_set("targets.onnx_fp32.opset", "17"), "targets.onnx_fp32.opset", "'17' is not allowed; expected a valid integer"),
    (_set("targets.onnx_fp32.format", "ncnn"), "targets.onnx_fp32.format", "'ncnn' is not allowed; expected one of 'onnx'"),
    (_set("targets.onnx_fp32.format", DELETE), "targets.onnx_fp32.format", "required key is missing"),
    (_set("targets.onnx_fp32.precision", "int3"), "targets.onnx_fp32.precision", "'int3' is not allowed; expected 'fp32', 'fp16', 'int8' or 'int4'"),
    (_set("targets.onnx_int8.options.quantization", "qat"), "targets.onnx_int8.options.quantization", "'qat' is not allowed; expected 'dynamic' or 'static'"),
    (_set("calibration", DELETE), "targets.onnx_int8.options.smoothing", "expected a [calibration] table naming the data its per-channel activation maxima come from"),
    (_set("targets.onnx_int8_static.options.smoothing", 1.5), "targets.onnx_int8_static.options.smoothing", "1.5 is not allowed; expected less than or equal to 1"),
    (_set("targets.onnx_int8.options.fallback", "yes"), "targets.onnx_int8.options.fallback", "'yes' is not allowed; expected 'none' or 'auto'"),
    (_set("targets.onnx_fp16.options.embeddings", "int8"), "targets.onnx_fp16.options.embeddings", "it applies to precision = \"int8\" or \"int4\" only"),
    (_set("targets.onnx_int4.options.smoothing", 0.5), "targets.onnx_int4.options.smoothing", "it applies to precision = \"int8\" only"),
    (_set("targets.onnx_int4.options", {"scan_samples": 8}), "targets.onnx_int4.options.scan_samples", "expected no scan_samples without fallback = \"auto\""),
    (_set("targets.onnx_fp32.options.keep_fp32_ops", ["Softmax"]), "targets.onnx_fp32.options.keep_fp32_ops", "expected no keep_fp32_ops for precision = \"fp32\" (it applies to precision = \"fp16\" only)"),
    (_set("targets.onnx_int8.options.calibration", "entropy"), "targets.onnx_int8.options.calibration", "expected no calibration with quantization = \"dynamic\" (it applies to quantization = \"static\" only)"),
    (_set("targets.onnx_int8_static.options.calibration", "kl"), "targets.onnx_int8_static.options.calibration", "'kl' is not allowed; expected 'minmax', 'percentile', 'entropy' or 'mse'"),
    (_set("targets.onnx_int8_static.options.percentile", 0.0), "targets.onnx_int8_static.options.percentile", "0.0 is not allowed; expected greater than 0"),
    (_set("targets.onnx_int4.options.block_size", 48), "targets.onnx_int4.options.block_size", "48 is not allowed; expected one of 16, 32, 64, 128, 256"),
    (_set("targets.onnx_int4.options.accuracy_level", 5), "targets.onnx_int4.options.accuracy_level", "5 is not allowed; expected 0, 1, 2, 3 or 4"),
    (_set("targets.onnx_fp16.options.block_size", 64), "targets.onnx_fp16.options.block_size", "expected no block_size for precision = \"fp16\" (it applies to precision = \"int4\" only)"),
    (_set("targets.onnx_fp32.options.exclude_nodes", ["Gemm_1"]), "targets.onnx_fp32.options.exclude_nodes", "it applies to precision = \"int8\" or \"int4\" only"),
    (_set("calibration.bins", 100), "calibration.bins", "100 is not allowed; expected greater than or equal to 128"),
    (_set("calibration.bins", 1001), "calibration.bins", "1001 is not allowed; expected a multiple of 2"),
    (_set("calibration.samples", 10), "calibration.samples", "unknown key; allowed keys here: batch_size, bins, data, max_length, max_samples"),
    (_set("targets.onnx_fp16.options.keep_fp32_ops", ["Soft max"]), "targets.onnx_fp16.options.keep_fp32_ops[0]", "'Soft max' is not allowed"),
    (_set("targets.onnx_fp32.hardware", "tpu"), "targets.onnx_fp32.hardware", "'tpu' is not allowed; expected 'cpu'"),
    (_set("targets.onnx_fp32.optimise", True), "targets.onnx_fp32.optimise", "unknown key; allowed keys here: allow_unvalidated, format, hardware, opset, options, precision, thresholds"),
    (_set("targets.onnx_fp32.options.simplfy", True), "targets.onnx_fp32.options.simplfy", "allowed keys here: accuracy_level, activation_type, block_size, calibration, constant_folding, embeddings, exclude_nodes, external_data, fallback, keep_fp32_ops, keep_io_types, op_types, percentile, quantization, scan_samples, simplify, smoothing, symmetric"),
    (_set("targets.onnx_fp32.options.simplify", "yes"), "targets.onnx_fp32.options.simplify", "'yes' is not allowed; expected a valid boolean"),
    (_set("targets.onnx_fp32.thresholds", {"min_cosine": 1.5}), "targets.onnx_fp32.thresholds.min_cosine", "1.5 is not allowed"),
    (_set("targets", {}), "targets", "at least 1 item"),
    (_set("targets.bad name", {"format": "onnx"}), 'targets."bad name"', "'bad name' is not allowed; string should match pattern"),
    (_set("targets.t2", "onnx"), "targets.t2", "'onnx' is not allowed"),
    (_set("source.kind", "jax"), "source.kind", "'jax' is not allowed; expected one of 'huggingface', 'torch', 'onnx'"),
    (_set("source.path", DELETE), "source.path", "required key is missing"),
    (_set("source.pth", "x"), "source.pth", "unknown key; allowed keys here: allow_pickle, kind, model_class, path, task, trust_remote_code"),
    (_set("source.allow_pickle", 1), "source.allow_pickle", "1 is not allowed; expected a valid boolean"),
    (_set("inputs.1.dtype", "int4"), "inputs[1].dtype", "'int4' is not allowed; expected 'float32'"),
    (_set("inputs.1.shape", ["batch", 0]), "inputs[1].shape[1]", "0 is not allowed"),
    (_set("inputs.2.name", "input_ids"), "inputs[2].name", "'input_ids' is not allowed; expected a name not used by another of the inputs"),
    (_set("inputs", []), "inputs", "at least 1 item"),
    (_set("outputs.0.name", "3d"), "outputs[0].name", "'3d' is not allowed; string should match pattern"),
    (_set("model.name", "my model"), "model.name", "'my model' is not allowed"),
    (_set("model", DELETE), "model", "required key is missing"),
    (_set("modle", {"name": "x"}), "modle", "unknown key; allowed keys here: calibration, inputs, model, outputs, source, targets, validation"),
    (_set("validation.batch_size", 0), "validation.batch_size", "0 is not allowed; expected greater than or equal to 1"),
    (_set("validation.metrics", ["min_cosine", "max_abs_diff", "bleu"]), "validation.metrics[2]", "'bleu' is not allowed"),
    (_set("validation.metrics", ["min_cosine"]), "validation.metrics", "expected a list including 'max_abs_diff', which a threshold gates on"),
    (_set("validation.padding_mask", "mask"), "validation.padding_mask", "'mask' is not allowed; expected one of the inputs: ['input_ids', 'attention_mask', 'token_type_ids']"),
    (_set("validation.outputs", ["logits"]), "validation.outputs", "'logits' is not allowed; expected one of the declared outputs"),
    (_set("validation.thresholds", {"max_abs_diff": -1.0}), "validation.thresholds.max_abs_diff", "-1.0 is not allowed; expected greater than or equal to 0"),
    (_set("targets.safetensors_fp16.precision", "int8"), "targets.safetensors_fp16.precision", "'int8' is not allowed; expected 'fp32', 'fp16' or 'bf16'"),
    (_set("targets.safetensors_fp16.opset", 17), "targets.safetensors_fp16.opset", "unknown key; allowed keys here: allow_unvalidated, format, hardware, precision, thresholds"),
    (_set("source", {"kind": "onnx", "path": "m.onnx"}), "targets.torchscript.format", "'torchscript' is not allowed; expected a format an onnx source can give ('onnx', 'openvino', 'tensorrt'); torchscript needs a torch or huggingface source"),
    (_set("targets.openvino_fp16.precision", "int8"), "targets.openvino_fp16.precision", "'int8' is not allowed; expected 'fp32' or 'fp16'"),
    (_set("targets.openvino_fp32.options", {"keep_io_types": True}), "targets.openvino_fp32.options.keep_io_types", "unknown key; allowed keys here: constant_folding, external_data, simplify"),
    (_set("targets.torchscript.mode", "compile"), "targets.torchscript.mode", "'compile' is not allowed; expected 'trace' or 'script'"),
    (_set("targets.torch_export.precision", "fp16"), "targets.torch_export.precision", "'fp16' is not allowed; expected 'fp32'"),
    (_set("targets.torch_export.mode", "trace"), "targets.torch_export.mode", "unknown key; allowed keys here: allow_unvalidated, format, hardware, precision, thresholds"),
    # batch axes: the axis named "batch" holds the samples; inputs without it are fed whole
    (_set("inputs.0.shape", ["batch", "batch"]), "inputs[0].shape", "['batch', 'batch'] is not allowed; expected 'batch' on one axis at most"),
    (_set("outputs.0.shape", ["batch", "sequence", "batch"]), "outputs[0].shape", "expected 'batch' on one axis at most"),
    (_set("inputs.1.shape", ["sequence", "batch"]), "inputs[1].shape", "['sequence', 'batch'] is not allowed; expected 'batch' on axis 0: validation.data is text"),
    (lambda d: _unbatched(d, npz=False), "validation.batch_size", "32 is not allowed; expected no batch_size: no input's shape names a 'batch' axis"),
    (lambda d: _unbatched(d, npz=True), "validation.padding_mask", "'attention_mask' is not allowed; expected a batched input (its shape names 'batch'): []"),
    (lambda d: (_unbatched(d, npz=True), d["validation"].pop("padding_mask"), d["validation"].__setitem__("max_samples", 5)), "validation.max_samples", "expected no max_samples"),
    (lambda d: (_unbatched(d, npz=True), d["validation"].pop("padding_mask"), d["calibration"].__setitem__("batch_size", 8)), "calibration.batch_size", "expected no batch_size"),
]


def _unbatched(data: dict, npz: bool) -> None:
    """Every input fixed at one sample (no "batch" axis); with npz, the data settings that only
    batching uses are left unset."""
    for tensor in data["inputs"]:
        tensor["shape"] = [1, "sequence"]
    if npz:
        data["validation"]["data"], data["calibration"]["data"] = "data/x.npz", "data/c.npz"
        del data["validation"]["batch_size"], data["calibration"]["batch_size"]


@pytest.mark.parametrize("mutate,key,text", BAD, ids=[case[1] + ":" + case[2][:20] for case in BAD])
def test_bad_manifest_names_file_key_value_and_what_is_allowed(mutate, key, text):
    data = copy.deepcopy(GOOD_WITHOUT_COREML)
    mutate(data)
    with pytest.raises(ManifestError) as caught:
        validate(RawManifest(REPO / "manifests/bert.toml", data))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{REPO / 'manifests/bert.toml'}: {key}: "), message
    assert text in message, message


def test_the_default_manifest_is_valid():
    spec = validate(RawManifest(REPO / "manifests/bert.toml", GOOD))
    assert spec.model.name == "bert" and list(spec.targets) == ["onnx_fp32", "onnx_fp16", "onnx_int8", "onnx_int8_static", "onnx_int4", "torchscript", "torch_export", "openvino_fp32", "openvino_fp16", "safetensors_fp16", "safetensors_bf16", "coreml_fp16"]
    assert spec.inputs[0].dynamic_axes == {0: "batch", 1: "sequence"}


STATEFUL = {
    "model": {"name": "cell"}, "source": {"kind": "torch", "factory": "cell:build"},
    "inputs": [{"name": "x", "shape": ["batch", 4]}, {"name": "state", "shape": [2, "batch", 8]}, {"name": "scale", "shape": []}],
    "outputs": [{"name": "y", "shape": ["batch", 4]}, {"name": "new_state", "shape": [2, "batch", 8]}],
    "targets": {"onnx_fp32": {"format": "onnx"}},
    "validation": {"data": "data/cell.npz", "batch_size": 4, "max_samples": 8},
}


def test_a_stateful_manifest_with_a_scalar_input_is_valid():
    spec = validate(RawManifest(REPO / "manifests/cell.toml", copy.deepcopy(STATEFUL)))
    assert [t.batch_axis for t in spec.inputs] == [0, 1, None]
    assert [t.batch_axis for t in spec.outputs] == [0, 1]


def test_a_manifest_without_batched_inputs_is_valid_when_no_batch_setting_is_given():
    data = copy.deepcopy(GOOD_WITHOUT_COREML)
    _unbatched(data, npz=True)
    del data["validation"]["padding_mask"]
    spec = validate(RawManifest(REPO / "manifests/bert.toml", data))
    assert all(t.batch_axis is None for t in spec.inputs)


def test_thresholds_layer_precision_defaults_then_validation_then_target():
    data = copy.deepcopy(GOOD)
    data["validation"]["thresholds"] = {"min_cosine": 0.999}
    data["targets"]["onnx_fp32"]["thresholds"] = {"max_abs_diff": 1e-3}  # replaces the manifest's own
    thresholds = effective_thresholds(validate(RawManifest(REPO / "x.toml", data)), "onnx_fp32")
    assert thresholds.min_cosine == 0.999  # from [validation.thresholds]
    assert thresholds.max_abs_diff == 1e-3  # from the target
    assert thresholds.mean_cosine == 0.99999  # the fp32 default


def test_spec_is_frozen():
    spec = validate(RawManifest(REPO / "manifests/bert.toml", GOOD))
    with pytest.raises(ValidationError):  # pydantic's frozen_instance error
        spec.model.name = "other"


def test_json_schema_describes_targets_as_a_union_on_format():
    schema = json_schema()
    assert schema["additionalProperties"] is False
    assert "OnnxTarget" in schema["$defs"] and schema["$defs"]["OnnxTarget"]["properties"]["opset"]["maximum"] == 20
