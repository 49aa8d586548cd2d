"""build_tensorrt: an ONNX model -> a serialized TensorRT engine (model.engine) on an NVIDIA GPU, with
the tensorrt package's builder and ONNX parser.

Precision comes from the graph (strongly typed networks: TensorRT 10's STRONGLY_TYPED flag, always on
in TensorRT 11, which dropped the FP16/INT8 builder flags and implicit calibration): kiln's fp32,
fp16 or int8 QDQ ONNX. One optimization profile holds the manifest's [min, opt, max] for every
dynamic axis. TF32 is off unless asked for, so an fp32 engine computes in fp32.

Timing cache: tactic timings are what make two engine builds differ. The step starts from the
workspace's timing cache for this GPU and TensorRT version (build/.kiln/tensorrt/<hardware>.cache),
publishes the cache it ends with beside the engine (timing.cache) and merges it back, so later builds
(other targets, a changed parameter, a clean rebuild) reuse the measured tactics. The cache is not
part of the key: it changes which of several correct kernels is picked, not what the model computes.

Without a usable GPU the step fails with what is missing (package, driver or device) and writes
nothing; kiln never writes a stand-in engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.base.cuda import CudaUnavailable, check, cudart, device_facts
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
        try:
            return device_facts(params.get("device", 0))
        except CudaUnavailable as err:  # the step will fail with this reason when it runs
            return {"unavailable": str(err)}

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: BuildTensorrtParams, ctx: RunContext) -> dict[str, Any]:
        try:
            facts = device_facts(params.device)
            check(cudart().cudaSetDevice(params.device), "cudaSetDevice")
        except CudaUnavailable as err:
            raise StepError(ctx.step, f"a TensorRT engine is built on an NVIDIA GPU, and this machine cannot: {err}") from None
        import tensorrt as trt

        if int(trt.__version__.split(".")[0]) < 10:
            raise StepError(ctx.step, f"TensorRT {trt.__version__} is too old: kiln needs TensorRT >= 10 (strongly typed networks); pip install -U 'kiln[tensorrt]'")
        logger = _Logger(trt)
        builder = trt.Builder(logger)
        network = builder.create_network(_network_flags(trt))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(inputs["model"][0])):
            errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
            raise StepError(ctx.step, f"TensorRT's ONNX parser refused {inputs['model'][0].name}: {errors[:400]}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, params.workspace_mib << 20)
        config.builder_optimization_level = params.optimization_level
        if not params.tf32:
            config.clear_flag(trt.BuilderFlag.TF32)
        config.add_optimization_profile(_profile(builder, network, params, ctx))
        shared = _shared_cache_path(ctx.root, facts)
        cache = config.create_timing_cache(shared.read_bytes() if shared.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise StepError(ctx.step, f"TensorRT could not build the engine: {logger.last_error or 'no error logged'}")
        outputs["engine"].write_bytes(memoryview(engine))
        timing = bytes(memoryview(config.get_timing_cache().serialize()))
        outputs["timing_cache"].write_bytes(timing)
        write_bytes_atomic(shared, timing)
        return {"engine_bytes": outputs["engine"].stat().st_size, "timing_cache_bytes": len(timing), **facts}


def _network_flags(trt) -> int:
    """STRONGLY_TYPED on TensorRT 10 (types from the graph); TensorRT 11 is always strongly typed and
    only keeps the flag as a deprecated no-op."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if flag is not None and int(trt.__version__.split(".")[0]) == 10 else 0


def _profile(builder, network, params: BuildTensorrtParams, ctx: RunContext):
    """[min, opt, max] shapes of every network input, from the manifest's axis names."""
    by_name = {t["name"]: t for t in params.inputs}
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        spec = by_name.get(tensor.name)
        if spec is None:
            raise StepError(ctx.step, f"the ONNX model has an input {tensor.name!r} that the manifest's [[inputs]] do not declare: {sorted(by_name)}")
        dims = spec.get("shape") or list(tensor.shape)
        shapes = [[d if isinstance(d, int) else params.profile[d][k] for d in dims] for k in range(3)]
        profile.set_shape(tensor.name, *shapes)
    return profile


def _shared_cache_path(root: Path, facts: dict[str, Any]) -> Path:
    return state_dir(root) / "tensorrt" / f"{sha256_text(canonical_json(facts))[:16]}.timing.cache"


class _Logger:
    """A TensorRT logger that keeps the last error, for a one-line StepError."""

    def __new__(cls, trt):
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.last_error = ""

            def log(self, severity, msg):
                if int(severity) <= int(trt.ILogger.Severity.ERROR):  # INTERNAL_ERROR (0) and ERROR (1)
                    self.last_error = " ".join(str(msg).split())

        return Logger()
