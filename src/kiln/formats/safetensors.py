"""format = "safetensors": the source model's weights (its state_dict) as SafeTensors, written by
kiln's streaming writer, floats cast by kiln's kernels; validated by loading them strictly into the
source architecture and running it in torch. For a Hugging Face source the target's folder also holds
what from_pretrained needs (config.json for the precision, the tokenizer and processor files), so it
loads as it is; tied weights are stored once, as transformers stores them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kiln.errors import StepError, one_line
from kiln.formats.base import WeightsFormat, dtype_names
from kiln.runtime.runners import Artifact, Runner, require_precision, torch_runner
from kiln.schema.fields import TargetBase
from kiln.sources import load_torch_model

if TYPE_CHECKING:
    from kiln.plan.chains import Planner


class SafetensorsTarget(TargetBase):
    """The source model's weights (its state_dict) as SafeTensors, floats cast to `precision`."""

    format: Literal["safetensors"]
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"


class Safetensors(WeightsFormat):
    format = "safetensors"
    Target = SafetensorsTarget

    def chain(self, planner: Planner, name: str, target: SafetensorsTarget) -> None:
        reference = planner.reference(name)
        companions = from_pretrained_files(planner.source_params, planner.resolved.source_files)
        weights = planner.add(name, "write_safetensors", {"source": planner.source_params, "precision": target.precision},
                              {"source": planner.resolved.source_files}, {"weights": "model.safetensors"} | {f: f for f in companions})
        planner.validate(name, target, weights.outputs["weights"], weights, reference, {f: weights.outputs[f] for f in companions})

    def open_runner(self, artifact: Artifact) -> Runner:
        """The source architecture with the artifact's weights loaded strictly: every key, every shape.
        The one omission allowed is transformers' own: a tied weight stored once, under the name its
        model keeps (what save_pretrained writes), provided it really is tied in the loaded model, so
        the weight a key stands for came from the file and not from the source. Weights stored at
        fp16/bf16 are widened to the model's own dtype, as a CPU user loads them."""
        import numpy as np
        import torch

        from kiln.native import safetensors

        model = load_torch_model(artifact.source, artifact.source_files, artifact.input_names, artifact.outputs, artifact.root)
        expected = model.model.state_dict()
        arrays = safetensors.load_file(artifact.path)
        require_precision({key: str(a.dtype) for key, a in arrays.items()}, dtype_names(expected), artifact)
        state = {}
        for key, array in arrays.items():
            target = expected.get(key)
            tensor = torch.from_numpy(np.asarray(array, dtype=np.float32) if array.dtype.kind == "f" or "bfloat16" in str(array.dtype) else array)
            state[key] = tensor.to(target.dtype) if target is not None else tensor
        try:
            result = model.model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # a shape that does not fit
            raise StepError(artifact.step, f"weights of {artifact.path.name} do not fit the source architecture: {one_line(err)[:400]}") from None
        missing = sorted(set(result.missing_keys) - retied_keys(model.model, set(state)))
        if missing or result.unexpected_keys:
            problem = f"missing {missing[:5]} ({len(missing)} keys)" if missing else f"unexpected {sorted(result.unexpected_keys)[:5]} ({len(result.unexpected_keys)} keys)"
            raise StepError(artifact.step, f"weights of {artifact.path.name} do not fit the source architecture: {problem}")
        return torch_runner(model, artifact.input_names, artifact.outputs)


# Files of a Hugging Face folder that are weights (or index them): the target writes its own.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".pkl", ".joblib", ".index.json")
# Names the target folder already uses for itself; and sentence-transformers' modules.json, which
# names module sub-folders (1_Pooling/...) that a target's flat folder does not hold: with it,
# SentenceTransformer(folder) would fail on the missing folder; without it, it loads the weights with
# mean pooling, as it does any transformers folder.
RESERVED_NAMES = ("model.safetensors", "validation.json", "provenance.intoto.json", "modules.json")


def from_pretrained_files(source: dict[str, Any], files: tuple[Path, ...]) -> list[str]:
    """For a Hugging Face folder, the names of its files that from_pretrained needs beside the weights
    (config.json, which write_safetensors rewrites for the precision, then the tokenizer, processor,
    generation config and whatever else the folder holds that is not weights), in the folder's order.
    Other sources publish the weights alone."""
    if source.get("kind") != "huggingface":
        return []
    names = [p.name for p in files if not p.name.endswith(WEIGHT_SUFFIXES) and p.name not in RESERVED_NAMES]
    return sorted(names, key=lambda n: n != "config.json")


def retied_keys(model, stored: set[str]) -> set[str]:
    """State-dict keys a file may leave out because from_pretrained ties them to a stored one: the
    targets of the model's tied weights (transformers' all_tied_weights_keys, target -> source) whose
    source is stored and which share that source's storage in this model."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    params = dict(model.named_parameters(remove_duplicate=False))
    return {target for target, source in tied.items()
            if target not in stored and source in stored and target in params and source in params
            and params[target].data_ptr() == params[source].data_ptr()}

