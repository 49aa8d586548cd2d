"""export_savedmodel: a TensorFlow source -> a SavedModel folder (model.savedmodel/: saved_model.pb,
variables/), whose "serving_default" signature takes the manifest's inputs by name (named axes
dynamic) and returns a dict of the manifest's outputs (kiln.sources.tensorflow.serving_function).

Saved with tf.saved_model.save from a tf.Module holding the model and its serving tf.function (not
Keras' ExportArchive, whose object graph lists the variables in an order that changes from process
to process). Runs in a fresh child (kiln.runtime.child): saved_model.pb names its functions from
process-wide counters (__inference_serve_1234). fingerprint.pb is deleted: it holds a random
UUID per save, and tf.saved_model.load does not need it. With both, two exports are byte-identical.
A model computing in float16 or bfloat16 (a Keras mixed precision policy) is refused: the target is fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.rules import Params, Rule, RunContext, register
from kiln.runtime.child import fail, read_job, run_in_child

FINGERPRINT = "fingerprint.pb"


class ExportSavedmodelParams(Params):
    source: dict[str, Any]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]


@register
class ExportSavedmodel(Rule):
    name = "export_savedmodel"
    version = 2  # 2: two or more inputs and outputs meet the model's by name, not by position
    tools = ("tensorflow", "tensorflow-cpu", "keras")
    Params = ExportSavedmodelParams
    memory_base_mib, memory_per_input = 1024, 4.0  # TensorFlow itself, the model, the saver's copies

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ExportSavedmodelParams, ctx: RunContext) -> dict[str, Any]:
        job = {"params": params.model_dump(), "files": [str(p) for p in inputs["source"]], "root": str(ctx.root), "model": str(outputs["model"])}
        run_in_child(ctx.step, "kiln.build_rules.export_savedmodel:child_main", job, "tf.saved_model.save failed")
        folder = outputs["model"]
        return {"files": sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())}


def child_main() -> None:
    from kiln.sources.tensorflow import SERVING_SIGNATURE, import_tensorflow, load_model, require_float32, serving_function

    job = read_job()
    params = ExportSavedmodelParams(**job["params"])
    tf = import_tensorflow()
    model = load_model(params.source, [Path(p) for p in job["files"]], Path(job["root"]))
    require_float32(model, "savedmodel")  # the format claims fp32 and is gated by fp32's thresholds
    serve, specs = serving_function(model, params.inputs, params.outputs)
    module = tf.Module()
    module.model = model  # tracked: its variables are saved
    module.serve = tf.function(serve, input_signature=specs)
    folder = Path(job["model"])
    try:
        tf.saved_model.save(module, str(folder), signatures={SERVING_SIGNATURE: module.serve.get_concrete_function()})
    except Exception as err:  # TF raises ValueError / TypeError for what it cannot trace or save
        fail(err)
    (folder / FINGERPRINT).unlink(missing_ok=True)
    for empty in sorted((p for p in folder.rglob("*") if p.is_dir() and not any(p.iterdir())), reverse=True):
        empty.rmdir()  # assets/ when there are none: a folder artifact is its files
