"""write_pytorch: the source model's state_dict written with torch.save (model.pt), float32 tensors
cast to the target precision by kiln's native kernels (write_safetensors' cast). Every key of the
source module's state_dict is kept, so `model.load_state_dict(torch.load(f, weights_only=True))`
takes the file as it is, strictly.

Tensors that share memory in the model (tied weights) share one storage in the file, stored once, as
torch.save keeps storages: the cast is done per storage, and each tensor becomes the same view of
the cast storage. Saved through a buffer, since torch.save names the archive's root folder after the
(temporary) file; torch.save's records are otherwise deterministic, so the bytes are the same across
runs, processes and workspaces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.build_rules.write_safetensors import cast_weights
from kiln.rules import TORCH_MODEL_MEMORY, Params, Rule, RunContext, register


class WritePytorchParams(Params):
    source: dict[str, Any]
    precision: str


@register
class WritePytorch(Rule):
    name = "write_pytorch"
    version = 1
    tools = ("torch", "transformers")
    Params = WritePytorchParams
    memory_base_mib, memory_per_input = TORCH_MODEL_MEMORY

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: WritePytorchParams, ctx: RunContext) -> dict[str, Any]:
        import io

        import torch

        from kiln.sources import load_torch_model

        model = load_torch_model(params.source, inputs["source"], [], [], ctx.root).model
        state, cast = cast_state_dict(model.state_dict(), params.precision)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        outputs["weights"].write_bytes(buffer.getvalue())
        storages = len({t.untyped_storage().data_ptr() for t in state.values() if t.untyped_storage().nbytes()})
        return {"tensors": len(state), "storages": storages, "cast": cast, "precision": params.precision}


def cast_state_dict(state, precision: str):
    """(the state_dict with its float32 tensors cast to `precision`, how many were cast). Each float32
    storage is cast once, whole, and every tensor on it becomes its same view (offset, size, stride)
    of the cast storage, so tensors shared in the model stay shared. The state_dict's `_metadata`
    (module versions, which load_state_dict reads) is kept, as torch.save(model.state_dict()) keeps it."""
    import torch

    if precision == "fp32":
        return state, 0
    result = type(state)()
    cast_storages: dict[int, Any] = {}
    cast = 0
    for key, tensor in state.items():
        if tensor.dtype != torch.float32:
            result[key] = tensor
            continue
        storage = tensor.untyped_storage()
        whole = cast_storages.get(storage.data_ptr())
        if whole is None:
            flat = torch.empty(0, dtype=torch.float32).set_(storage, 0, (storage.nbytes() // 4,), (1,))
            whole = cast_storages[storage.data_ptr()] = as_tensor(cast_weights(flat.detach().numpy(), precision))
        result[key] = whole.as_strided(tensor.size(), tensor.stride(), tensor.storage_offset())
        cast += 1
    if hasattr(state, "_metadata"):
        result._metadata = state._metadata
    return result, cast


def as_tensor(array):
    """A cast numpy array as a torch tensor: bfloat16 (ml_dtypes, unknown to torch) through its bits."""
    import numpy as np
    import torch

    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)
