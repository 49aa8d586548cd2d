"""convert_tflite: a TensorFlow source -> a LiteRT flatbuffer (model.tflite) with TF's TFLiteConverter.

The model's serving function (kiln.sources.tensorflow.export_serving: the manifest's inputs as
TensorSpecs, named axes dynamic, a dict of the manifest's outputs, variables frozen by Keras'
ExportArchive) is written as a SavedModel into a scratch folder (kiln.sources.tensorflow.scratch_serving_savedmodel)
and converted from there, so the
.tflite's "serving_default" signature has the manifest's input and output names. Precisions (see
kiln.formats.tflite): fp32; fp16 weights; int8 dynamic range. Full-integer (static) int8 is not
made here: its fp32 output goes through calibrate_tflite (kiln's observers) and quantize_tflite, as
for a PyTorch source. Only LiteRT builtin ops are allowed: a model that would need
TensorFlow's Flex ops fails here, naming them.

Runs in a fresh child (kiln.runtime.child): the .tflite holds tensor names, which Keras derives from
process-wide layer counters (conv2d_1) for a factory-built model, so only a fresh process writes the
same bytes every time. Two conversions in fresh processes are byte-identical (tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from kiln.base.temps import final_name, temp_path
from kiln.errors import StepError
from kiln.rules import Params, Rule, RunContext, register
from kiln.runtime.child import fail, read_job, run_in_child


class ConvertTfliteParams(Params):
    source: dict[str, Any]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    precision: Literal["fp32", "fp16", "int8"]
    quantization: Literal["dynamic"] | None = None  # int8 only: dynamic range (static: quantize_tflite)


@register
class ConvertTflite(Rule):
    name = "convert_tflite"
    version = 2  # 2: two or more inputs and outputs meet the model's by name, not by position
    tools = ("tensorflow", "tensorflow-cpu", "keras", "ai-edge-litert")
    Params = ConvertTfliteParams
    memory_base_mib, memory_per_input = 1024, 4.0  # TensorFlow itself, the model, the converter's copies

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ConvertTfliteParams, ctx: RunContext) -> dict[str, Any]:
        import json

        # the child's facts for the report, in a temp file a killed build's sweep removes
        facts_file = temp_path(outputs["model"].with_name(final_name(outputs["model"])), "facts")
        if (params.quantization is not None) != (params.precision == "int8"):
            raise StepError(ctx.step, f"quantization {params.quantization!r} with precision {params.precision!r}: int8 takes quantization = \"dynamic\" "
                                      "(static int8 is calibrate_tflite + quantize_tflite), other precisions none")
        job = {"params": params.model_dump(), "files": [str(p) for p in inputs["source"]],
               "root": str(ctx.root), "model": str(outputs["model"]), "facts": str(facts_file), "step": ctx.step}
        try:
            run_in_child(ctx.step, "kiln.build_rules.convert_tflite:child_main", job, "TFLite conversion failed")
            return json.loads(facts_file.read_text())
        finally:
            facts_file.unlink(missing_ok=True)


def child_main() -> None:
    """Export the serving SavedModel, convert it at the precision, check the result runs in LiteRT at
    that precision, write it and its facts."""
    import json

    from kiln.formats.tflite import SIGNATURE, describe, open_interpreter, require_precision, tensor_dtypes
    from kiln.sources.tensorflow import import_tensorflow, scratch_serving_savedmodel

    job = read_job()
    params = ConvertTfliteParams(**job["params"])
    tf = import_tensorflow()
    output = Path(job["model"])
    with scratch_serving_savedmodel(params.source, [Path(p) for p in job["files"]], params.inputs, params.outputs, Path(job["root"]), output) as saved:
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved), signature_keys=[SIGNATURE])
        configure(converter, params, tf)
        try:
            content = converter.convert()
        except Exception as err:  # ConverterError for ops without a builtin kernel
            flex = needed_tf_ops(str(err))
            if flex:  # the child reports "<step>: source: the model needs ..."
                raise StepError("source", f"the model needs TensorFlow ops without a LiteRT builtin kernel {flex}: they would run only through "
                                          "the Flex delegate (Select TF ops), which the LiteRT runtime does not have; kiln converts to builtin ops only") from None
            fail(err)
    # what validate will open, checked now so a conversion that went wrong fails here, saying why
    name = final_name(output)  # the step writes a temp file; errors name the file it becomes
    interpreter = open_interpreter(content, "the converted model", name)
    dtypes = tensor_dtypes(interpreter)
    require_precision(dtypes, params.precision, "the converted model", name)
    output.write_bytes(content)
    runner = interpreter.get_signature_runner(SIGNATURE)
    facts = {
        "precision": params.precision, **({"quantization": params.quantization} if params.quantization else {}),
        "layout": "the source's (kiln inserts no transposes)", "tensor_dtypes": dtypes,
        "inputs": {name: describe(detail) for name, detail in sorted(runner.get_input_details().items())},
        "outputs": {name: describe(detail) for name, detail in sorted(runner.get_output_details().items())},
    }
    Path(job["facts"]).write_text(json.dumps(facts, sort_keys=True))


def configure(converter, params: ConvertTfliteParams, tf) -> None:
    """Builtin ops only (no Flex), and the precision's settings."""
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if params.precision == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif params.precision == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]


def needed_tf_ops(message: str) -> list[str]:
    """The TensorFlow ops a ConverterError says have no LiteRT builtin (it names them `tf.<Op>`)."""
    import re

    if "not supported by the native TFLite runtime" not in message and "Select TF" not in message and "Flex" not in message:
        return []
    return sorted(set(re.findall(r"\btf\.([A-Z]\w*)", message)))
