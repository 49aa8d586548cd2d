"""export_onnx_tf: a TensorFlow source (Keras model or SavedModel) -> ONNX, with tf2onnx.

The model's serving function (kiln.sources.tensorflow.export_serving: the manifest's inputs as
TensorSpecs, named axes dynamic, a dict of the manifest's outputs) is written as a SavedModel into a
scratch folder (kiln.sources.tensorflow.scratch_serving_savedmodel), loaded back, and converted with tf2onnx.convert.from_function
(tf2onnx.convert.from_keras is broken with Keras 3). The graph's inputs and outputs carry the
manifest's names, outputs in the manifest's order. The layout is the source's (Keras: NHWC).

Runs in a fresh child (kiln.runtime.child): tf2onnx names the nodes it adds from a process-wide
counter (Transpose__42) and Keras names the layers of a factory-built model from another
(conv2d_1), so a conversion after other work in the same process would write other bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.errors import StepError
from kiln.rules import Params, Rule, RunContext, register
from kiln.runtime.child import fail, read_job, run_in_child


class ExportOnnxTfParams(Params):
    source: dict[str, Any]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    opset: int


@register
class ExportOnnxTf(Rule):
    name = "export_onnx_tf"
    version = 2  # 2: two or more inputs and outputs meet the model's by name, not by position
    tools = ("tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "onnx")
    Params = ExportOnnxTfParams
    memory_base_mib, memory_per_input = 1024, 4.0  # TensorFlow itself, the model, the frozen graph, tf2onnx's copy

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ExportOnnxTfParams, ctx: RunContext) -> dict[str, Any]:
        import onnx

        job = {"source": params.source, "files": [str(p) for p in inputs["source"]], "inputs": params.inputs, "outputs": params.outputs,
               "opset": params.opset, "root": str(ctx.root), "model": str(outputs["model"]), "step": ctx.step}
        run_in_child(ctx.step, "kiln.build_rules.export_onnx_tf:child_main", job, f"tf2onnx failed at opset {params.opset}")
        return {"opset": params.opset, "nodes": len(onnx.load(str(outputs["model"]), load_external_data=False).graph.node)}


def child_main() -> None:
    from kiln.runtime.onnx_graph import publish
    from kiln.sources.tensorflow import SERVING_SIGNATURE, import_tensorflow, scratch_serving_savedmodel, tensor_specs

    job = read_job()
    tf = import_tensorflow()
    import tf2onnx

    output = Path(job["model"])
    names = [t["name"] for t in job["inputs"]]
    with scratch_serving_savedmodel(job["source"], [Path(p) for p in job["files"]], job["inputs"], job["outputs"], Path(job["root"]), output) as saved:
        loaded = tf.saved_model.load(str(saved))  # kept alive: the signature reads its variables
        signature = loaded.signatures[SERVING_SIGNATURE]  # takes its inputs by keyword only
        function = tf.function(lambda *args: signature(**dict(zip(names, args, strict=True))))
        try:
            model, _ = tf2onnx.convert.from_function(function, input_signature=tensor_specs(job["inputs"]), opset=job["opset"])
        except Exception as err:  # tf2onnx raises ValueError, KeyError, its own errors for unsupported ops
            fail(err)
    order = [t["name"] for t in job["outputs"]]
    produced = {o.name: o for o in model.graph.output}
    if set(produced) != set(order):
        raise StepError(job["step"], f"tf2onnx gave outputs {sorted(produced)}; the manifest declares {order}")
    outputs_in_order = [type(produced[name])() for name in order]  # tf2onnx lists a dict's outputs sorted by name
    for copy, name in zip(outputs_in_order, order, strict=True):
        copy.CopyFrom(produced[name])
    del model.graph.output[:]
    model.graph.output.extend(outputs_in_order)
    publish(model, output, job["step"])  # sorted, written, full-checked
