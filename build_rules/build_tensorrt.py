"""build_tensorrt: an ONNX model -> a serialized TensorRT engine (model.engine) on an NVIDIA GPU, with
the tensorrt package's builder and ONNX parser.

Precision comes from the graph (strongly typed networks: TensorRT 10's STRONGLY_TYPED flag, always on
in TensorRT 11, which dropped the FP16/INT8 builder flags and implicit calibration): kiln's fp32,
fp16 or int8 QDQ ONNX. One optimization profile holds the manifest's [min, opt, max] for every
dynamic axis. TF32 is off unless asked for, so an fp32 engine computes in fp32.

Timing cache: tactic timings are what make two engine builds differ. The step starts from the
workspace's timing cache for this GPU and TensorRT version (build/.kiln/tensorrt/<hardware>.cache),
publishes the cache it ends with beside the engine (timing.cache) and merges it back as Polygraphy
does: under a file lock, reload the shared file (another build may have added to it meanwhile),
combine, write via temp + rename, so concurrent builds add to it instead of the last one winning. A
shared cache TensorRT rejects or cannot read (truncated, another version) is replaced by an empty
one, and the step's facts say so (timing_cache_start). The cache is not part of the key: it changes
which of several correct kernels is picked, not what the model computes.

Failures say why in one line: Builder/OnnxParser creation (pybind's "factory function returned
nullptr" when TensorRT cannot initialise CUDA), parser errors with the node's name and operator, and a
failed build with TensorRT's first and last ERROR and its relevant WARNINGs (kiln.base.cuda.TensorrtLog).

Without a usable GPU the step fails with what is missing (package, driver or device) and writes
nothing; kiln never writes a stand-in engine. The input shapes are checked before the build: an axis
left dynamic (-1) that no manifest axis names, or a manifest axis the ONNX fixes to another size,
fails naming the input.
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Any

from kiln.base.cuda import CudaUnavailable, TensorrtLog, check, create, cudart, device_facts
from kiln.base.fsio import write_bytes_atomic
from kiln.base.hashing import canonical_json, sha256_text
from kiln.base.paths import state_dir
from kiln.errors import StepError
from kiln.rules import Params, Rule, RunContext, register


class BuildTensorrtParams(Params):
    device: int = 0
    inputs: list[dict[str, Any]]  # the manifest's inputs: names and shapes (axis names -> profile)
    profile: dict[str, list[int]]  # axis name -> [min, opt, max]
    workspace_mib: int = 1024
    optimization_level: int = 3
    tf32: bool = False


@register
class BuildTensorrt(Rule):
    name = "build_tensorrt"
    version = 1
    tools = ("onnx",)  # TensorRT's version is in the hardware facts, with the GPU it built for
    Params = BuildTensorrtParams
    memory_base_mib = 2048  # the builder's host-side network and tactic search

    @classmethod
    def hardware_for(cls, params: dict[str, Any]) -> dict[str, Any]:
        """The probe's facts (kiln.base.cuda: a subprocess, so the doit parent never initialises CUDA)."""
        try:
            return device_facts(params.get("device", 0))
        except CudaUnavailable as err:  # the step will fail with this reason when it runs
            return {"unavailable": str(err)}

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: BuildTensorrtParams, ctx: RunContext) -> dict[str, Any]:
        try:
            facts = device_facts(params.device)
            check(cudart().cudaSetDevice(params.device), "cudaSetDevice")  # the builder works on the current device
        except CudaUnavailable as err:
            raise StepError(ctx.step, f"a TensorRT engine is built on an NVIDIA GPU, and this machine cannot: {err}") from None
        import tensorrt as trt

        if int(trt.__version__.split(".")[0]) < 10:
            raise StepError(ctx.step, f"TensorRT {trt.__version__} is too old: kiln needs TensorRT >= 10 (strongly typed networks); pip install -U 'kiln[tensorrt-cu13]' or 'kiln[tensorrt-cu12]'")
        log = TensorrtLog()
        logger = log.logger(trt)

        def fail(message: str):
            raise StepError(ctx.step, message)

        builder = create(lambda: trt.Builder(logger), "Builder", log, fail)
        network = builder.create_network(_network_flags(trt))
        parser = create(lambda: trt.OnnxParser(network, logger), "ONNX parser", log, fail)
        model = inputs["model"][0]
        if not parser.parse_from_file(str(model)):
            errors = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
            raise StepError(ctx.step, f"TensorRT's ONNX parser refused {model.name}: {errors[:600]}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, params.workspace_mib << 20)
        config.builder_optimization_level = params.optimization_level
        if not params.tf32:
            config.clear_flag(trt.BuilderFlag.TF32)
        config.add_optimization_profile(_profile(builder, network, params, ctx))
        shared = _shared_cache_path(ctx.root, facts)
        start = _start_timing_cache(config, shared)
        try:
            engine = builder.build_serialized_network(network, config)
        except (RuntimeError, TypeError) as err:
            raise StepError(ctx.step, f"TensorRT could not build the engine ({' '.join(str(err).split())[:300]}): {log.summary() or 'no error logged'}") from None
        if engine is None:
            raise StepError(ctx.step, f"TensorRT could not build the engine: {log.summary() or 'no error logged'}")
        write_bytes_atomic(outputs["engine"], bytes(memoryview(engine)))
        built = config.get_timing_cache()
        timing = bytes(memoryview(built.serialize()))
        write_bytes_atomic(outputs["timing_cache"], timing)
        merged = _merge_into_shared(config, built, shared)
        return {"engine_bytes": outputs["engine"].stat().st_size, "timing_cache_bytes": len(timing),
                "timing_cache_start": start, "timing_cache_merge": merged, **facts}


def _network_flags(trt) -> int:
    """STRONGLY_TYPED on TensorRT 10 (types from the graph); TensorRT 11 is always strongly typed and
    only keeps the flag as a deprecated no-op."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if flag is not None and int(trt.__version__.split(".")[0]) == 10 else 0


def _parser_error(error) -> str:
    """One parser error with the node it is about: node_name()/node_operator() exist since TensorRT
    10.0 (node() is the index, for graphs whose nodes have no names)."""
    where = []
    name = _call(error, "node_name")
    operator = _call(error, "node_operator")
    if name:
        where.append(f"node {name!r}")
    elif _call(error, "node") not in (None, -1):
        where.append(f"node #{_call(error, 'node')}")
    if operator:
        where.append(f"({operator})")
    desc = " ".join(str(error.desc()).split())
    return f"{' '.join(where)}: {desc}" if where else desc


def _call(obj, method: str):
    found = getattr(obj, method, None)
    return found() if callable(found) else None


def _profile(builder, network, params: BuildTensorrtParams, ctx: RunContext):
    """[min, opt, max] shapes of every network input, from the manifest's axis names, checked against
    the shape in the ONNX (tensor.shape, -1 where dynamic)."""
    by_name = {t["name"]: t for t in params.inputs}
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        spec = by_name.get(tensor.name)
        if spec is None:
            raise StepError(ctx.step, f"the ONNX model has an input {tensor.name!r} that the manifest's [[inputs]] do not declare: {sorted(by_name)}")
        profile.set_shape(tensor.name, *input_shapes(tensor.name, spec.get("shape"), list(tensor.shape), params.profile, ctx.step))
    return profile


def input_shapes(name: str, declared: list | None, onnx_shape: list[int], profile: dict[str, list[int]], step: str) -> list[list[int]]:
    """[min, opt, max] shapes of input `name`: each axis from the manifest (a fixed size, or an axis
    name whose [min, opt, max] the profile holds), else from the ONNX. set_shape needs concrete
    sizes, so an axis the ONNX leaves dynamic (-1) and the manifest does not size fails here, naming
    the input, as does a manifest that disagrees with the ONNX (which would only fail at build time,
    as a profile mismatch)."""
    dims = list(declared) if declared else list(onnx_shape)
    if len(dims) != len(onnx_shape):
        raise StepError(step, f"input {name!r}: the manifest's shape {dims} has {len(dims)} axes, the ONNX model's {onnx_shape} has {len(onnx_shape)}")
    shapes: list[list[int]] = [[], [], []]
    for axis, (dim, fixed) in enumerate(zip(dims, onnx_shape)):
        sizes = [dim] * 3 if isinstance(dim, int) else list(profile.get(dim, []))
        if len(sizes) != 3:
            raise StepError(step, f"input {name!r} axis {axis} is named {dim!r}, which the target's profile does not size: {sorted(profile)}")
        if any(size < 0 for size in sizes):
            raise StepError(step, f"input {name!r} axis {axis} is dynamic in the ONNX model ({onnx_shape}) and the manifest gives it no size; "
                                  "name the axis in [[inputs]] shape and give it a [min, opt, max] in the target's profile")
        if fixed >= 0 and any(size != fixed for size in sizes):
            what = f"axis {dim!r} with profile {sizes}" if isinstance(dim, str) else f"size {dim}"
            raise StepError(step, f"input {name!r} axis {axis}: the ONNX model fixes it to {fixed}, the manifest gives {what}")
        for k in range(3):
            shapes[k].append(int(sizes[k]))
    return shapes


def _shared_cache_path(root: Path, facts: dict[str, Any]) -> Path:
    return state_dir(root) / "tensorrt" / f"{sha256_text(canonical_json(facts))[:16]}.timing.cache"


def _start_timing_cache(config, shared: Path) -> str:
    """Give the builder the shared timing cache, or an empty one where TensorRT cannot read it
    (create_timing_cache returns None for a truncated file) or rejects it (set_timing_cache returns
    False: another device or version). Returns what it started from, for the step's facts."""
    data = shared.read_bytes() if shared.exists() else b""
    if data:
        cache = _load_cache(config, data)
        if cache is None:
            start = "empty: the shared timing cache could not be read (truncated or not a timing cache)"
        elif not config.set_timing_cache(cache, ignore_mismatch=False):
            start = "empty: TensorRT rejected the shared timing cache (made for another GPU or TensorRT version)"
        else:
            return f"shared ({len(data)} bytes)"
    else:
        start = "empty: no shared timing cache yet"
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)  # an empty cache matches any GPU
    return start


def _load_cache(config, data: bytes):
    try:
        return config.create_timing_cache(data)
    except (RuntimeError, TypeError, ValueError):  # some releases raise instead of returning None
        return None


def _merge_into_shared(config, built, shared: Path) -> str:
    """Merge this build's timing cache into the shared one, as Polygraphy does: under an exclusive
    lock (other builds, threads or processes, merge into the same file), reload the file, combine it
    into this build's cache, serialize, write via temp + rename. Returns what happened, for the facts."""
    shared.parent.mkdir(parents=True, exist_ok=True)
    with open(shared.with_name(shared.name + ".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = shared.read_bytes() if shared.exists() else b""
            previous = _load_cache(config, data) if data else None
            if data and previous is None:
                outcome = "replaced: the shared timing cache could not be read"
            elif previous is not None and not built.combine(previous, ignore_mismatch=False):
                outcome = "replaced: TensorRT would not combine the shared timing cache (another GPU or version)"
            else:
                outcome = "merged" if previous is not None else "created"
            write_bytes_atomic(shared, bytes(memoryview(built.serialize())))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return outcome
