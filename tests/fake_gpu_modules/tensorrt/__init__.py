"""A fake of the `tensorrt` Python bindings (TensorRT 10.x API) for kiln's CPU-only TensorRT tests.

Why a fake: TensorRT's libraries are published only on NVIDIA's own package index and the machines
these tests run on have no NVIDIA GPU, so the real package cannot be installed or run here. The
TensorRT tests replace the binding boundary (this module and ../cuda) and nothing else; this is the
only place in kiln's tests where that is done. It follows the real API's names and return
conventions as far as kiln uses them (Builder, OnnxParser with node_name()/node_operator(),
BuilderConfig and ITimingCache with combine(), Runtime, ICudaEngine, IExecutionContext) and the
failure modes kiln must report: a factory returning nullptr (pybind11's TypeError), parser errors,
a failed build returning None, a truncated timing cache (create_timing_cache -> None), a rejected
one (set_timing_cache -> False), create_execution_context() -> None.

The "engine" it builds is JSON: the network's inputs and outputs and the profile. Running it writes
2 * x + 1 of the first input to every output, reading and writing the fake CUDA memory (ctypes),
so a test sees real bytes go through kiln's device buffers. Tests steer it through FAKE.
"""

import ctypes
import enum
import json

import numpy as np

from cuda.bindings import runtime as _cuda

__version__ = "10.13.0.35"


class Behaviour:
    """What the next calls do; tests set fields, the fixture calls reset()."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.create_error = None  # an exception Builder() and Runtime() raise (after logging create_logs)
        self.create_logs = []  # [(severity name, message)] logged by a failing factory
        self.parse_errors = []  # [(desc, node_name, node_operator)]: parse_from_file fails with these
        self.build_logs = []  # [(severity name, message)] logged by build_serialized_network
        self.build_fails = False
        self.reject_cache = False  # a non-empty cache is from another device: set_timing_cache and combine (ignore_mismatch=False) return False
        self.tactic = "tactic-a"  # the entry a build adds to the timing cache
        self.context_none = False
        self.deserialized_on = []  # the fake CUDA current device at each deserialize_cuda_engine
        self.live = {"engine": 0, "context": 0}
        self.stream_handles = []  # what execute_async_v3 was given


FAKE = Behaviour()


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self):
        pass

    def log(self, severity, msg):
        pass


class Logger(ILogger):
    ERROR = ILogger.Severity.ERROR
    WARNING = ILogger.Severity.WARNING

    def __init__(self, min_severity=ILogger.Severity.WARNING):
        super().__init__()


def _log(logger, entries) -> None:
    for severity, message in entries:
        logger.log(ILogger.Severity[severity], message)


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class BuilderFlag(enum.IntEnum):
    TF32 = 7


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    INT64 = 10


_NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32, DataType.INT64: np.int64}
_FROM_ONNX = {1: DataType.FLOAT, 10: DataType.HALF, 6: DataType.INT32, 7: DataType.INT64}


def nptype(dtype):
    return _NUMPY[DataType(dtype)]


class ITensor:
    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype


class INetworkDefinition:
    def __init__(self, flags):
        self.flags = flags
        self.inputs = []
        self.outputs = []

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


class ParserError:
    def __init__(self, desc, node_name, node_operator):
        self._desc, self._name, self._operator = desc, node_name, node_operator

    def desc(self):
        return self._desc

    def node_name(self):
        return self._name

    def node_operator(self):
        return self._operator

    def node(self):
        return -1


class OnnxParser:
    def __init__(self, network, logger):
        self.network = network
        self.errors = []

    def parse_from_file(self, path):
        if FAKE.parse_errors:
            self.errors = [ParserError(*e) for e in FAKE.parse_errors]
            return False
        import onnx

        graph = onnx.load(path, load_external_data=False).graph
        initializers = {t.name for t in graph.initializer}
        for value in graph.input:
            if value.name in initializers:
                continue
            tensor = value.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
            self.network.inputs.append(ITensor(value.name, shape, _FROM_ONNX[tensor.elem_type]))
        self.network.outputs = [value.name for value in graph.output]
        return True

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]


class ITimingCache:
    HEADER = b"FAKE-TIMING-CACHE\n"

    def __init__(self, entries=()):
        self.entries = set(entries)

    @classmethod
    def parse(cls, data):
        if data == b"":
            return cls()
        if not data.startswith(cls.HEADER) or not data.endswith(b"\n"):
            return None  # what TensorRT does with a truncated or foreign file
        return cls(line for line in data[len(cls.HEADER):].decode().split("\n") if line)

    def serialize(self):
        return self.HEADER + "".join(f"{e}\n" for e in sorted(self.entries)).encode()

    def combine(self, other, ignore_mismatch):
        if FAKE.reject_cache and other.entries and not ignore_mismatch:
            return False
        self.entries |= other.entries
        return True


class IOptimizationProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, min, opt, max):
        for shape in (min, opt, max):
            if any(int(d) < 0 for d in shape):
                raise RuntimeError(f"setShape: negative dimension for {name}")  # what the real call does with -1
        self.shapes[name] = [list(min), list(opt), list(max)]


class IBuilderConfig:
    def __init__(self):
        self.builder_optimization_level = 3
        self.cleared = []
        self.profiles = []
        self.cache = None

    def set_memory_pool_limit(self, pool, size):
        self.workspace = size

    def clear_flag(self, flag):
        self.cleared.append(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)

    def create_timing_cache(self, data):
        return ITimingCache.parse(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache is None:  # pybind11 refuses None for a reference argument
            raise TypeError("set_timing_cache(): incompatible function arguments")
        if FAKE.reject_cache and cache.entries:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class Builder:
    def __init__(self, logger):
        if FAKE.create_error is not None:
            _log(logger, FAKE.create_logs)
            raise FAKE.create_error
        self.logger = logger

    def create_network(self, flags):
        return INetworkDefinition(flags)

    def create_builder_config(self):
        return IBuilderConfig()

    def create_optimization_profile(self):
        return IOptimizationProfile()

    def build_serialized_network(self, network, config):
        _log(self.logger, FAKE.build_logs)
        if FAKE.build_fails:
            return None
        config.cache.entries.add(FAKE.tactic)
        (profile,) = config.profiles
        plan = {"inputs": [[t.name, int(t.dtype)] for t in network.inputs], "outputs": network.outputs, "profile": profile.shapes,
                "network_flags": network.flags, "cleared_flags": [int(flag) for flag in config.cleared]}
        return json.dumps(plan).encode()


class Runtime:
    def __init__(self, logger):
        if FAKE.create_error is not None:
            _log(logger, FAKE.create_logs)
            raise FAKE.create_error

    def deserialize_cuda_engine(self, data):
        FAKE.deserialized_on.append(_cuda.state.current_device)
        try:
            return ICudaEngine(json.loads(bytes(data)))
        except ValueError:
            return None


class ICudaEngine:
    def __init__(self, plan):
        self.plan = plan
        self.names = [name for name, _ in plan["inputs"]] + plan["outputs"]
        self.dtypes = {name: DataType(dtype) for name, dtype in plan["inputs"]} | {name: DataType.FLOAT for name in plan["outputs"]}
        FAKE.live["engine"] += 1

    def __del__(self):
        FAKE.live["engine"] -= 1

    @property
    def num_io_tensors(self):
        return len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return TensorIOMode.OUTPUT if name in self.plan["outputs"] else TensorIOMode.INPUT

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def create_execution_context(self):
        return None if FAKE.context_none else IExecutionContext(self)


class IExecutionContext:
    def __init__(self, engine):
        self.engine = engine
        self.shapes = {}
        self.addresses = {}
        FAKE.live["context"] += 1

    def __del__(self):
        FAKE.live["context"] -= 1

    def set_input_shape(self, name, shape):
        low, _, high = self.engine.plan["profile"][name]
        if not all(lo <= d <= hi for lo, d, hi in zip(low, shape, high)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = int(address)

    def get_tensor_shape(self, name):
        first = self.engine.plan["inputs"][0][0]
        return self.shapes[first]

    def execute_async_v3(self, stream_handle):
        if not isinstance(stream_handle, int):
            raise TypeError("execute_async_v3(): incompatible function arguments")
        FAKE.stream_handles.append(stream_handle)
        first, dtype = self.engine.plan["inputs"][0]
        shape = self.shapes[first]
        count = int(np.prod(shape))
        source = np.frombuffer((ctypes.c_char * (count * np.dtype(nptype(dtype)).itemsize)).from_address(self.addresses[first]), dtype=nptype(dtype))
        result = np.ascontiguousarray(2 * source.astype(np.float32) + 1)
        for name in self.engine.plan["outputs"]:
            ctypes.memmove(self.addresses[name], result.ctypes.data, result.nbytes)
        return True
