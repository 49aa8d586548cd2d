"""onnxruntime sessions made the same way everywhere kiln runs a model."""

from __future__ import annotations

from pathlib import Path


def session(model: Path | bytes, optimize: bool = True, threads: int = 1, spinning: bool = True, external: dict | None = None):
    """A CPU session. One intra-op thread by default: reductions then run in a fixed order, so the
    validation metrics kiln reports are the same on every run and every machine size.
    spinning=False: idle worker threads sleep instead of spinning, which latency probes use: two
    spinning sessions (or other busy processes) on a small machine steal each other's cores and
    made side-by-side timings depend on the order they ran in (fp32 BERT read 75 ms instead of 24)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if external:  # {initializer name: OrtValue}, for the proto's external-data entries (SharedWeights)
        options.add_external_initializers(list(external), list(external.values()))
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=["CPUExecutionProvider"])


class SharedWeights:
    """Sessions of many variants of one model (a layer changed in each, as the per-layer scan makes)
    without serializing and parsing every weight for each: the model's large float initializers move
    out of its proto, once, into arrays this object keeps; the proto keeps each one's name, type and
    shape as an external-data entry, and session(..., external=this.used_by(variant)) hands
    onnxruntime the arrays for them (SessionOptions.add_external_initializers, which copies them in
    before any optimization).
    So a session gets the same graph, optimizations and kernels as one made from the whole model, and
    the same outputs bit for bit (tested), for a ~200 KB proto instead of the model's bytes: BERT's
    session creation went from 0.33 to 0.11 s. Tensors added to the model later stay in the proto."""

    MIN_BYTES = 4096  # smaller tensors (shapes, scales, biases of small layers) stay in the proto

    def __init__(self, model):
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper

        self.arrays = {}
        for tensor in model.graph.initializer:
            if tensor.data_type != onnx.TensorProto.FLOAT or tensor.data_location == onnx.TensorProto.EXTERNAL:
                continue
            array = numpy_helper.to_array(tensor)
            if array.nbytes < self.MIN_BYTES:
                continue
            self.arrays[tensor.name] = array
            tensor.ClearField("raw_data")
            tensor.ClearField("float_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", "kiln-shared-weights"), ("offset", "0"), ("length", str(array.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        # OrtValues wrap the arrays' memory (kept alive by self.arrays)
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in self.arrays.items()}

    def used_by(self, model) -> dict:
        """{name: OrtValue} of the shared initializers the model's nodes still read: onnxruntime drops
        unused initializers before it replaces the rest, and refuses a value for a dropped one."""
        read = set(_inputs_read(model.graph))
        return {name: value for name, value in self.values.items() if name in read}


def _inputs_read(graph):
    """Every tensor name a node of the graph reads, subgraphs (If, Loop, Scan bodies) included: a body
    may read the outer graph's initializers."""
    for node in graph.node:
        yield from node.input
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _inputs_read(sub)
