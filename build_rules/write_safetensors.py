"""write_safetensors: the source model's weights (its state_dict) as a SafeTensors file, float32
tensors cast to the target precision by kiln's native kernels, written by kiln's streaming writer.
Names are the source architecture's state_dict keys, so `load_state_dict` takes the file as is.

For a Hugging Face source the step also writes what `from_pretrained` needs beside the weights, so
the published folder loads as it is (kiln.formats.safetensors.from_pretrained_files names them):
config.json with `dtype` (and `torch_dtype`, where the source has it) set to the precision and
`architectures` to the loaded class, as save_pretrained writes it; the folder's other files
(tokenizer, processor, generation config...) copied unchanged. Tied weights are stored once, under
the names transformers keeps (its own remove_tied_weights_from_state_dict, as save_pretrained does),
so a tied T5 at fp16 is half its fp32 size, not as big.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from kiln.rules import TORCH_MODEL_MEMORY, Params, Rule, RunContext, register
from kiln.runtime.runners import WEIGHT_DTYPES


class WriteSafetensorsParams(Params):
    source: dict[str, Any]
    precision: str


@register
class WriteSafetensors(Rule):
    name = "write_safetensors"
    version = 3  # 2: tied weights stored once; config.json and the tokenizer files beside the weights
    # 3: tensors in safetensors' own file order (dtype enum, then name): mixed dtypes of one width were ordered by name
    tools = ("torch", "transformers")
    Params = WriteSafetensorsParams
    memory_base_mib, memory_per_input = TORCH_MODEL_MEMORY

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: WriteSafetensorsParams, ctx: RunContext) -> dict[str, Any]:
        from kiln.native import safetensors
        from kiln.sources import load_torch_model

        model = load_torch_model(params.source, inputs["source"], [], [], ctx.root).model
        state = model.state_dict()
        kept = without_tied_copies(model, dict(state))
        tensors = {}
        cast = 0
        for key, tensor in kept.items():
            array = tensor.detach().cpu().contiguous().numpy()
            if array.dtype.name == "float32" and params.precision != "fp32":
                array = cast_weights(array, params.precision)
                cast += 1
            tensors[key] = array
        safetensors.save_file(tensors, outputs["weights"], metadata={"format": "pt", "producer": "kiln", "precision": params.precision})
        by_name = {p.name: p for p in inputs["source"]}
        for name, out in outputs.items():
            if name == "config.json":
                write_config(by_name[name], out, model, params.precision)
            elif name != "weights":
                shutil.copyfile(by_name[name], out)
        return {"tensors": len(tensors), "cast": cast, "precision": params.precision, "tied": len(state) - len(kept)}


def without_tied_copies(model, state: dict) -> dict:
    """A transformers model's state_dict as save_pretrained stores it: of tensors its tied-weight keys
    declare shared, only the one from_pretrained loads (the others are tied to it on load). Any other
    module's state_dict is kept whole: load_state_dict needs every key."""
    import sys

    transformers = sys.modules.get("transformers")  # not imported: the model cannot be one of its classes
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return state
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    return remove_tied_weights_from_state_dict(state, model)


def write_config(source: Path, out: Path, model, precision: str) -> None:
    """The source's config.json with the dtype the weights are stored in (from_pretrained's
    dtype="auto" loads that) and the class the weights are the state_dict of, as save_pretrained sets
    it; every other key as the source has it."""
    config = json.loads(source.read_text(encoding="utf-8"))
    config["dtype"] = WEIGHT_DTYPES[precision]
    if "torch_dtype" in config:  # read by transformers before 4.56; kept equal so no reader sees two dtypes
        config["torch_dtype"] = config["dtype"]
    config["architectures"] = [type(model).__name__]
    out.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def cast_weights(array, precision: str):
    from kiln.native import repack

    return {"fp16": repack.f32_to_f16, "bf16": repack.f32_to_bf16}[precision](array)
