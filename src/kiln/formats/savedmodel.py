"""format = "savedmodel": a TensorFlow SavedModel folder (model.savedmodel/: saved_model.pb and
variables/) written from a TensorFlow source by build_rules/export_savedmodel.py, validated by
loading it as a user does, tf.saved_model.load, and calling its "serving_default" signature with the
manifest's inputs by name. Its outputs are the manifest's, by name. fp32 only (it is the source
model itself, re-exported with the manifest's signature). Needs pip install 'kiln[tensorflow]'.

The folder holds no fingerprint.pb (a random UUID per save; tf.saved_model.load does without it),
so two builds give the same bytes. Layout: the source's (Keras: NHWC).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from kiln.errors import StepError, one_line
from kiln.formats.base import TargetFormat
from kiln.runtime.runners import Artifact, Runner, require_outputs
from kiln.schema.fields import TargetBase
from kiln.sources.tensorflow import SERVING_SIGNATURE as SIGNATURE

if TYPE_CHECKING:
    from kiln.plan.chains import Planner


class SavedmodelTarget(TargetBase):
    """A SavedModel folder with the manifest's serving signature, validated with tf.saved_model.load."""

    format: Literal["savedmodel"]
    precision: Literal["fp32"] = "fp32"


class Savedmodel(TargetFormat):
    format = "savedmodel"
    Target = SavedmodelTarget
    extra = ("tensorflow", "tensorflow")
    source_frameworks = frozenset({"tensorflow"})  # saved from the model itself (kiln.define.spec)
    validation_tools = ("tensorflow", "tensorflow-cpu")

    def chain(self, planner: Planner, name: str, target: SavedmodelTarget) -> None:
        reference = planner.reference(name)
        step = planner.add(name, "export_savedmodel", {"source": planner.source_params, "inputs": planner.inputs, "outputs": planner.outputs},
                           {"source": planner.resolved.source_files}, {"model": "model.savedmodel"})
        planner.validate(name, target, step.outputs["model"], step, reference)

    def open_runner(self, artifact: Artifact) -> Runner:
        """tf.saved_model.load on the folder; its serving signature called with the feed's inputs by name."""
        from kiln.sources.tensorflow import import_tensorflow

        tf = import_tensorflow()
        try:
            loaded = tf.saved_model.load(str(artifact.path))
        except Exception as err:  # OSError, ValueError, protobuf's DecodeError for a damaged folder
            raise StepError(artifact.step, f"tf.saved_model.load cannot load {artifact.path.name}: {one_line(err)[:300]}") from None
        if SIGNATURE not in loaded.signatures:
            raise StepError(artifact.step, f"{artifact.path.name} has no {SIGNATURE!r} signature (it has {sorted(loaded.signatures)})")
        signature = loaded.signatures[SIGNATURE]
        takes = sorted(signature.structured_input_signature[1])
        names = artifact.outputs
        require_outputs(set(signature.structured_outputs), names, "SavedModel", artifact.step)

        def run(feed: dict) -> dict:
            missing = [n for n in takes if n not in feed]
            if missing:
                raise StepError(artifact.step, f"{artifact.path.name} takes input {missing[0]!r}, which the validation data does not have (it has {sorted(feed)})")
            result = signature(**{n: tf.constant(feed[n]) for n in takes})
            return {n: result[n].numpy() for n in names}

        run.loaded = loaded  # keeps the variables alive as long as the runner
        return run
