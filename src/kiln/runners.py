"""Run an artifact on a batch of inputs, in the runtime its format deploys with. validate uses these
to compare every artifact with the reference outputs of the source model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from kiln.errors import StepError, one_line

Runner = Callable[[dict], dict]


class RuntimeUnavailable(Exception):
    """The format's runtime does not exist on this machine (str(): why); validate then publishes the
    artifact only if the manifest accepts an unvalidated one."""


def open_runner(fmt: str, artifact: Path, outputs: list[str], step: str, source: dict[str, Any] | None = None,
                source_files: list[Path] | None = None, inputs: list[dict] | None = None, root: Path | None = None,
                device: int | None = None) -> Runner:
    if fmt == "onnx":
        return _onnx(artifact, outputs, step)
    if fmt == "tensorrt":
        return _tensorrt(artifact, outputs, step, device or 0)
    if fmt == "safetensors":
        return _torch_with_weights(artifact, outputs, step, source, source_files, inputs, root)
    if fmt == "openvino":
        return _openvino(artifact, outputs, step)
    if fmt in ("torchscript", "torch_export"):
        return _torch_program(fmt, artifact, outputs, step, [t["name"] for t in inputs])
    raise StepError(step, f"no runtime to validate format {fmt!r}")


def _openvino(artifact: Path, names: list[str], step: str) -> Runner:
    """OpenVINO's CPU runtime, one inference thread (fixed reduction order, as for onnxruntime), and
    f32 inference precision: on CPUs with bf16 units the plugin otherwise computes in bf16 by default,
    which would gate the runtime's shortcut rather than the artifact (max abs diff 0.03 on bert)."""
    import openvino as ov

    core = ov.Core()
    if "CPU" not in core.available_devices:
        raise RuntimeUnavailable(f"OpenVINO has no CPU device on this machine (it has {core.available_devices})")
    try:
        compiled = core.compile_model(str(artifact), "CPU", {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"})
    except Exception as err:  # openvino raises RuntimeError for a bad IR
        raise StepError(step, f"OpenVINO cannot load {artifact.name}: {one_line(err)[:300]}") from None
    _require_outputs({name for output in compiled.outputs for name in output.get_names()}, names, "OpenVINO", step)
    request = compiled.create_infer_request()

    def run(feed: dict) -> dict:
        result = request.infer(feed)
        return {name: result[compiled.output(name)].copy() for name in names}

    return run


def _torch_program(fmt: str, artifact: Path, names: list[str], step: str, input_names: list[str]) -> Runner:
    """A self-contained torch artifact, loaded as a user loads it: inputs passed positionally in the
    manifest's order, outputs matched to the manifest's by position (or name, for a dict)."""
    import torch

    try:
        module = torch.jit.load(str(artifact)) if fmt == "torchscript" else torch.export.load(str(artifact)).module()
    except Exception as err:  # torch raises RuntimeError and friends for a bad archive
        raise StepError(step, f"torch cannot load {artifact.name}: {one_line(err)[:300]}") from None
    return _torch_runner(module, input_names, names)


def _torch_runner(module, input_names: list[str], names: list[str]) -> Runner:
    """Call a torch module with the feed's tensors positionally (manifest order), no autograd; its
    outputs matched to `names` by position (or by name, for a dict)."""
    import torch

    from kiln.sources import pick_outputs

    def run(feed: dict) -> dict:
        with torch.inference_mode():
            result = pick_outputs(module(*(torch.from_numpy(feed[name]) for name in input_names)), names)
        return {name: value.numpy() for name, value in zip(names, result)}

    return run


def _tensorrt(artifact: Path, names: list[str], step: str, device: int) -> Runner:
    """TensorRT's runtime on the GPU the engine was built for: each batch's inputs are copied to the
    device, the engine runs with the batch's shapes (within its optimization profile), outputs are
    copied back."""
    from kiln.cuda import CudaUnavailable, DeviceBuffers, unavailable_reason

    reason = unavailable_reason(device)
    if reason:
        raise RuntimeUnavailable(f"TensorRT engines run on an NVIDIA GPU: {reason}")
    import numpy as np
    import tensorrt as trt

    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(artifact.read_bytes())
    if engine is None:
        raise StepError(step, f"TensorRT cannot load {artifact.name} (built for another GPU or TensorRT version?)")
    context = engine.create_execution_context()
    tensors = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    is_input = {name: engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT for name in tensors}
    _require_outputs({n for n in tensors if not is_input[n]}, names, "TensorRT", step)
    buffers = DeviceBuffers(device)

    def run(feed: dict) -> dict:
        try:
            for name in (n for n in tensors if is_input[n]):
                array = np.ascontiguousarray(feed[name], dtype=trt.nptype(engine.get_tensor_dtype(name)))
                if not context.set_input_shape(name, array.shape):
                    raise StepError(step, f"input {name!r} of shape {list(array.shape)} is outside the engine's optimization profile; widen the target's profile")
                context.set_tensor_address(name, buffers.upload(name, array))
            results = {}
            for name in (n for n in tensors if not is_input[n]):
                results[name] = np.empty(tuple(context.get_tensor_shape(name)), dtype=trt.nptype(engine.get_tensor_dtype(name)))
                context.set_tensor_address(name, buffers.pointer(name, results[name].nbytes))
            if not context.execute_async_v3(int(buffers.stream)):
                raise StepError(step, "TensorRT failed to run the engine (see TensorRT's log above)")
            buffers.synchronize()
            for name, array in results.items():
                buffers.download(name, array)
        except CudaUnavailable as err:
            raise StepError(step, f"CUDA error while running the engine: {err}") from None
        return {name: results[name] for name in names}

    return run


def _onnx(artifact: Path, names: list[str], step: str) -> Runner:
    from kiln.onnx_runtime import session

    try:
        sess = session(artifact)
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
        raise StepError(step, f"onnxruntime cannot load {artifact.name}: {one_line(err)}") from None
    _require_outputs({o.name for o in sess.get_outputs()}, names, "ONNX", step)
    return lambda feed: dict(zip(names, sess.run(names, feed)))


def _torch_with_weights(artifact: Path, names: list[str], step: str, source, source_files, inputs, root) -> Runner:
    """The source architecture with the artifact's weights loaded (strictly: every key, every shape).
    Weights stored at fp16/bf16 are widened to the model's own dtype, as a CPU user loads them."""
    import numpy as np
    import torch

    from kiln import safetensors
    from kiln.sources import load_torch_model

    model = load_torch_model(source, source_files, [t["name"] for t in inputs], names, root)
    expected = model.model.state_dict()
    state = {}
    for key, array in safetensors.load_file(artifact).items():
        target = expected.get(key)
        tensor = torch.from_numpy(np.asarray(array, dtype=np.float32) if array.dtype.kind == "f" or "bfloat16" in str(array.dtype) else array)
        state[key] = tensor.to(target.dtype) if target is not None else tensor
    try:
        model.model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise StepError(step, f"weights of {artifact.name} do not fit the source architecture: {one_line(err)[:400]}") from None
    return _torch_runner(model, [t["name"] for t in inputs], names)


def onnx_latency(artifact: Path, feed: dict, runs: int = 30, threads: int = 2, sequence: int = 128) -> dict[str, Any]:
    """CPU latency of one ONNX artifact: batch 1, dynamic non-batch axes at `sequence`, median of
    `runs` timed runs after 5 warm-ups. Inputs are the first validation sample, repeated or cut to
    that length. Goes to the report only: timings are not reproducible bytes."""
    import time

    import numpy as np

    from kiln.onnx_runtime import session

    sess = session(artifact, threads=threads)
    shaped = {}
    for spec in sess.get_inputs():
        sample = feed[spec.name][:1]
        shape = [1 if axis == 0 else (sequence if isinstance(dim, str) or dim is None else dim) for axis, dim in enumerate(spec.shape)]
        shaped[spec.name] = np.resize(sample, shape).astype(sample.dtype)
    for _ in range(5):
        sess.run(None, shaped)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, shaped)
        times.append(time.perf_counter() - start)
    return {"median_ms": round(1000 * float(np.median(times)), 3), "p10_ms": round(1000 * float(np.percentile(times, 10)), 3),
            "runs": runs, "threads": threads, "shape": {k: list(v.shape) for k, v in shaped.items()}}


def _require_outputs(known: set[str], names: list[str], kind: str, step: str) -> None:
    missing = [n for n in names if n not in known]
    if missing:
        raise StepError(step, f"output {missing[0]!r} is not in the {kind} model; it has {sorted(known)}")
