"""convert_tflite_torch: a PyTorch source -> a LiteRT flatbuffer (model.tflite) with litert-torch
(torch.export underneath, no ONNX in between), in kiln's "litert_torch" tool environment.

litert-torch pins typing-extensions below what kiln's environment (coremltools) needs, so it cannot
live there: the conversion runs in a child of the tool environment's Python (kiln.base.toolenv,
kiln.runtime.toolchild), created from pinned requirements on first use; the environment's identity
("toolenv:litert_torch") is in the step's key. The child loads the source as every exporter does
(kiln.sources.model_and_example: seeded, eval mode, the example inputs with batch 2), has no network
and cannot import kagglehub (kiln.runtime.toolchild.no_downloads), and writes the file and its facts.

The .tflite has one signature, "serving_default", whose inputs and outputs carry the manifest's
names (the model is called with keyword inputs and returns a dict). Shapes: fixed at the example's
(batch 2, other named axes 8). litert-torch 0.10.0 with jax 0.10.2 cannot lower a dynamic axis here:
a dynamic batch fails even for Linear -> ReLU -> Linear ("AssertionError: float32[-9223372036854775808,40]"
in the jax bridge) and for the example convnet's flatten ("Shapes must be 1D sequences of concrete
values"), with any Dim bounds and with use_v2. LiteRT's interpreter resizes the inputs at run time
(the signature runner does it per call) and the graph then runs at the new size when it has no
shape baked in (the convnet at batch 5 and 8 matches torch to 1.5e-7). A graph with the batch baked
in (a Hugging Face ViT's reshapes) cannot be resized: the step checks the file runs at batch 3 and
fails, saying so, rather than leaving validation a bare delegate error; validation then checks the
values at the validation batches. The facts say so (`shapes`, and each input's shape as the file has it).
Layout: PyTorch's, e.g. NCHW images (`layout` in the facts); nothing is transposed.

Precisions: fp32; fp16 (weights stored as float16, computed in fp32: ai-edge-quantizer's
FLOAT_CASTING weight-only recipe); int8 dynamic range (int8 channelwise weights, activations
quantized at run time: ai-edge-quantizer's dynamic_wi8_afp32), both applied to the fp32 flatbuffer
offline. Full-integer (static) int8 starts from this rule's fp32 file: calibrate_tflite (kiln's
observers in LiteRT) and quantize_tflite (ai-edge-quantizer fed kiln's ranges), as for a TensorFlow
source. Two conversions are byte-identical (tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from kiln.base.temps import final_name, temp_path
from kiln.base.toolenv import tool_env
from kiln.errors import StepError
from kiln.rules import TORCH_MODEL_MEMORY, Params, Rule, RunContext, register
from kiln.runtime.child import fail, read_job
from kiln.runtime.toolchild import no_downloads, run_in_toolenv

ENV = "litert_torch"
LAYOUT = "the PyTorch source's (NCHW for images); kiln inserts no transposes"
SHAPES = "fixed at the example's (named axes: batch 2, others 8); LiteRT resizes inputs at run time where the graph allows"


class ConvertTfliteTorchParams(Params):
    source: dict[str, Any]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    quantization: Literal["dynamic"] | None = None  # int8 only: dynamic range


@register
class ConvertTfliteTorch(Rule):
    name = "convert_tflite_torch"
    version = 1
    tools = ("torch", "transformers", "ai-edge-litert", f"toolenv:{ENV}")
    Params = ConvertTfliteTorchParams
    memory_base_mib, memory_per_input = TORCH_MODEL_MEMORY[0] + 1024, TORCH_MODEL_MEMORY[1]  # + jax and the converter

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ConvertTfliteTorchParams, ctx: RunContext) -> dict[str, Any]:
        import json

        if (params.quantization is not None) != (params.precision == "int8"):
            raise StepError(ctx.step, f"quantization {params.quantization!r} with precision {params.precision!r}: int8 takes quantization = \"dynamic\", other precisions none")
        # the child's facts for the report, in a temp file a killed build's sweep removes
        facts_file = temp_path(outputs["model"].with_name(final_name(outputs["model"])), "facts")
        job = {"params": params.model_dump(), "files": [str(p) for p in inputs["source"]], "root": str(ctx.root),
               "model": str(outputs["model"]), "facts": str(facts_file), "step": ctx.step}
        try:
            run_in_toolenv(ctx.step, tool_env(ENV), "kiln.build_rules.convert_tflite_torch:child_main", job, "litert-torch conversion failed")
            return json.loads(facts_file.read_text())
        finally:
            facts_file.unlink(missing_ok=True)


def child_main() -> None:
    """In the tool environment: load the source, convert at the example's shapes, quantize
    at the precision, check the file runs in LiteRT at that precision, write it and its facts."""
    import json

    no_downloads()
    from kiln.formats.tflite import SIGNATURE, describe, open_interpreter, require_precision, tensor_dtypes
    from kiln.sources import model_and_example

    job = read_job()
    params = ConvertTfliteTorchParams(**job["params"])
    model, args = model_and_example(params.source, [Path(f) for f in job["files"]], params.inputs, params.outputs, Path(job["root"]))
    names = [t["name"] for t in params.inputs]
    try:
        content = convert(keyword_model(model, names, [t["name"] for t in params.outputs]), dict(zip(names, args, strict=True)))
        content = quantized(content, params.precision)
    except Exception as err:  # torch.export's, the jax bridge's and the MLIR converter's many error types
        fail(err)
    output = Path(job["model"])
    name = final_name(output)  # the step writes a temp file; errors name the file it becomes
    interpreter = open_interpreter(content, "the converted model", name)
    dtypes = tensor_dtypes(interpreter)
    require_precision(dtypes, params.precision, "the converted model", name)
    runner = interpreter.get_signature_runner(SIGNATURE)
    facts = {  # the shapes as the file has them: read before the batch check resizes the inputs
        "precision": params.precision, **({"quantization": params.quantization} if params.quantization else {}),
        "converter": "litert-torch", "layout": LAYOUT, "shapes": SHAPES, "tensor_dtypes": dtypes,
        "inputs": {n: describe(d) for n, d in sorted(runner.get_input_details().items())},
        "outputs": {n: describe(d) for n, d in sorted(runner.get_output_details().items())},
    }
    require_other_batch(runner, params.inputs, name)
    output.write_bytes(content)
    Path(job["facts"]).write_text(json.dumps(facts, sort_keys=True))


def keyword_model(model, input_names: list[str], output_names: list[str]):
    """kiln's calling convention (positional inputs, a tuple of outputs) as keyword inputs and a dict
    of outputs: litert-torch names the signature's tensors after them."""
    import torch

    class Signature(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **feed):
            return dict(zip(output_names, self.inner(*(feed[n] for n in input_names)), strict=True))

    return Signature(model).eval()


def convert(model, example: dict) -> bytes:
    """The fp32 flatbuffer, at the example's shapes (see the module docstring for why not dynamic)."""
    import litert_torch

    return bytes(litert_torch.convert(model, sample_kwargs=example).model_content())


def require_other_batch(runner, inputs: list[dict], name: str) -> None:
    """The file was converted at batch 2; it must also run at another batch (LiteRT resizes the
    inputs), or validation and users' batches would fail later with a bare delegate error. A graph
    with the batch baked into a reshape (a Hugging Face ViT: "XNNPack delegate failed to reshape")
    fails here, saying why."""
    from kiln.runtime.data import BATCH, example_inputs

    if not any(BATCH in (t.get("shape") or []) for t in inputs):
        return
    try:
        runner(**example_inputs(inputs, seed=1, sizes={BATCH: 3}))
    except Exception as err:  # RuntimeError from the delegate or the interpreter's prepare step
        raise StepError(name, f"the converted model runs only at the example's batch of 2: litert-torch exports fixed shapes (it cannot lower a "
                              f"dynamic batch) and LiteRT cannot resize this graph to batch 3 ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


def quantized(content: bytes, precision: str) -> bytes:
    """fp16 weights or int8 dynamic range, by ai-edge-quantizer on the fp32 flatbuffer; fp32 as is."""
    if precision == "fp32":
        return content
    from ai_edge_quantizer import qtyping, quantizer, recipe, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    if precision == "fp16":
        manager = recipe_manager.RecipeManager()
        manager.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=16,
                                       algorithm_key=AlgorithmName.FLOAT_CASTING)
        chosen = manager.get_quantization_recipe()
    else:
        chosen = recipe.dynamic_wi8_afp32()
    result = quantizer.Quantizer(bytearray(content), chosen).quantize(enable_progress_report=False)
    return bytes(result.quantized_model)
