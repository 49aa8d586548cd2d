"""write_safetensors: the source model's weights (its state_dict) as a SafeTensors file, float32
tensors cast to the target precision by kiln's native kernels, written by kiln's streaming writer.
Names are the source architecture's state_dict keys, so `load_state_dict` (and transformers'
from_pretrained, for a Hugging Face folder with this file beside its config) take the file as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.rules import TORCH_MODEL_MEMORY, Params, Rule, RunContext, register


class WriteSafetensorsParams(Params):
    source: dict[str, Any]
    precision: str


@register
class WriteSafetensors(Rule):
    name = "write_safetensors"
    version = 1
    tools = ("torch", "transformers")
    Params = WriteSafetensorsParams
    memory_base_mib, memory_per_input = TORCH_MODEL_MEMORY

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: WriteSafetensorsParams, ctx: RunContext) -> dict[str, Any]:
        from kiln.native import safetensors
        from kiln.sources import load_torch_model

        model = load_torch_model(params.source, inputs["source"], [], [], ctx.root).model
        tensors = {}
        cast = 0
        for key, tensor in model.state_dict().items():
            array = tensor.detach().cpu().contiguous().numpy()
            if array.dtype.name == "float32" and params.precision != "fp32":
                array = cast_weights(array, params.precision)
                cast += 1
            tensors[key] = array
        safetensors.save_file(tensors, outputs["weights"], metadata={"format": "pt", "producer": "kiln", "precision": params.precision})
        return {"tensors": len(tensors), "cast": cast, "precision": params.precision}


def cast_weights(array, precision: str):
    from kiln.native import repack

    return {"fp16": repack.f32_to_f16, "bf16": repack.f32_to_bf16}[precision](array)
