"""calibrate_tflite: run the float .tflite (the fp32 conversion, shared with a tflite_fp32 target)
in LiteRT's interpreter over the [calibration] data and fold every float activation tensor (the
signature's inputs and every operator's float output) into kiln's native observers: min/max and a
2048-bin |x| histogram per tensor, the same observers and loop as the ONNX calibrate rule
(kiln.build_rules.calibrate.observe_batches).

The interpreter keeps intermediate tensors (experimental_preserve_all_tensors), each batch's are
read and folded before the next batch runs. calibration.json is keyed by the flatbuffer's tensor
names, the names ai-edge-quantizer (quantize_tflite) keys its ranges by. The methods (minmax,
percentile, entropy) are derived later, so the key is the float model, the data and these params
only, and every static int8 TFLite target of the model shares one calibration.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from kiln.errors import StepError
from kiln.rules import Params, Rule, RunContext, register

# Fixed, so the activations (hence the histograms' bytes) do not depend on the machine's core count.
THREADS = 1


class CalibrateTfliteParams(Params):
    inputs: list[dict[str, Any]]
    batch_size: int
    max_length: int
    max_samples: int | None = None
    bins: int = 2048


@register
class CalibrateTflite(Rule):
    name = "calibrate_tflite"
    version = 1
    tools = ("ai-edge-litert", "tokenizers", "transformers", "numpy")
    Params = CalibrateTfliteParams
    memory_base_mib = 1024  # every intermediate tensor of one batch (preserved), plus the histograms

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: CalibrateTfliteParams, ctx: RunContext) -> dict[str, Any]:
        from ai_edge_litert.interpreter import Interpreter

        from kiln.build_rules.calibrate import observe_batches
        from kiln.formats.tflite import SIGNATURE, quantize

        content = inputs["model"][0].read_bytes()
        observed = float_activations(content, ctx.step)
        with warnings.catch_warnings():  # "for debugging purposes only": reading intermediates is this rule's purpose
            warnings.simplefilter("ignore", UserWarning)
            interpreter = Interpreter(model_content=content, num_threads=THREADS, experimental_preserve_all_tensors=True)
        runner = interpreter.get_signature_runner(SIGNATURE)
        details = runner.get_input_details()
        subgraph = signature_subgraph(content)

        def observe(feed: dict):
            missing = [n for n in details if n not in feed]
            if missing:
                raise StepError(ctx.step, f"the model takes input {missing[0]!r}, which the calibration data does not have (it has {sorted(feed)})")
            runner(**{n: quantize(feed[n], d) for n, d in details.items()})
            return ((name, interpreter.get_tensor(index, subgraph)) for name, (index, _rank) in observed.items())

        calibration, samples = observe_batches(observe, inputs, params, ctx.step, ctx.progress)
        outputs["calibration"].write_text(calibration.to_json() + "\n")
        return {"tensors": len(observed), "samples": samples, "bins": params.bins}


def signature_subgraph(content: bytes) -> int:
    """The subgraph the "serving_default" signature runs (0 for a model without signatures)."""
    from ai_edge_litert import schema_py_generated as schema

    from kiln.formats.tflite import SIGNATURE

    model = schema.Model.GetRootAs(content, 0)
    for i in range(model.SignatureDefsLength()):
        signature = model.SignatureDefs(i)
        if signature.SignatureKey().decode() == SIGNATURE:
            return signature.SubgraphIndex()
    return 0


def float_activations(content: bytes, step: str) -> dict[str, tuple[int, int]]:
    """name -> (tensor index, rank) of every float32 tensor the signature's subgraph computes or
    takes as input: what a static int8 model needs a range for. Read from the flatbuffer schema, not
    guessed from names; names must be unique, since calibration and quantizer both key by them."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(content, 0)
    graph = model.Subgraphs(signature_subgraph(content))
    indices = [int(i) for i in graph.InputsAsNumpy()]
    for o in range(graph.OperatorsLength()):
        op = graph.Operators(o)
        indices += [int(op.Outputs(j)) for j in range(op.OutputsLength()) if op.Outputs(j) >= 0]
    found: dict[str, tuple[int, int]] = {}
    for index in dict.fromkeys(indices):  # in graph order, once each
        tensor = graph.Tensors(index)
        if tensor.Type() != schema.TensorType.FLOAT32:
            continue
        name = tensor.Name().decode()
        if name in found:
            raise StepError(step, f"the float model has two tensors named {name!r} (indices {found[name][0]} and {index}): ranges are keyed by tensor name")
        found[name] = (index, tensor.ShapeLength())
    if not found:
        raise StepError(step, "the model has no float32 activation: it is not a float model, nothing to calibrate")
    return found
