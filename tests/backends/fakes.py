"""Small fakes of onnxruntime (CUDA-provider path), tensorrt and cupy, for CPU-only tests.

Each fake mirrors the real signatures (names, arity, keyword names) of the
calls colocate makes, checks argument types the way the real bindings do
(``execute_async_v3`` wants an int stream handle, ``set_memory_pool_limit`` a
``MemoryPoolType`` member, ``user_compute_stream`` a string holding a nonzero
int, ...), and records the calls so tests can assert on them.

The "model" of every fake is ``y = x.reshape(B, -1)[:, :features] * 2``
(see :func:`reference_output`).

Install a fake with ``monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt())``.
"""

from __future__ import annotations

import enum
import json
import types
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from colocate.backends.base import stream_handle
from colocate.devices import Device

FAKE_GPU = Device(kind="cuda", name="Fake GPU", index=0, memory_total_bytes=80 * 2**30)
FEATURES = 10


def reference_output(x: np.ndarray, features: int = FEATURES) -> np.ndarray:
    """What every fake model computes."""
    return np.asarray(x.reshape(x.shape[0], -1)[:, :features] * 2)


def _require_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what}: incompatible function arguments; expected int, got {type(value).__name__}")
    return int(value)


def _require_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what}: incompatible function arguments; expected str, got {type(value).__name__}")
    return value


def _require_dims(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{what}: expected Dims (tuple of ints), got {type(value).__name__}")
    return tuple(_require_int(d, what) for d in value)


# =====================================================================================
# onnxruntime
# =====================================================================================

FAKE_ONNX_MAGIC = b"FAKEONNX"


def write_fake_onnx(path: Path) -> Path:
    """A file the fake onnxruntime accepts as a model."""
    path.write_bytes(FAKE_ONNX_MAGIC)
    return path


@dataclass
class FakeNodeArg:
    name: str
    shape: list[Any]
    type: str


class FakeOrtState:
    """What the fake onnxruntime module records, and how it behaves."""

    def __init__(self) -> None:
        self.cuda_loads = True  # False: the CUDA EP "fails to load" and the session is CPU-only
        self.input_shape: list[Any] = ["batch", 1, 4, 4]
        self.input_type = "tensor(float)"
        self.sessions: list[FakeInferenceSession] = []


class FakeInvalidProtobuf(Exception):
    """Like onnxruntime.capi.onnxruntime_pybind11_state.InvalidProtobuf."""


FakeInvalidProtobuf.__name__ = "InvalidProtobuf"
FakeInvalidProtobuf.__qualname__ = "InvalidProtobuf"


class FakeSessionOptions:
    """Only the attributes that exist on the real SessionOptions can be set."""

    _ATTRIBUTES = frozenset(
        {
            "intra_op_num_threads",
            "inter_op_num_threads",
            "log_severity_level",
            "execution_mode",
            "graph_optimization_level",
            "enable_profiling",
        }
    )

    def __init__(self) -> None:
        object.__setattr__(self, "config_entries", {})
        object.__setattr__(self, "values", {"intra_op_num_threads": 0, "log_severity_level": 2})

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._ATTRIBUTES:
            raise AttributeError(f"'SessionOptions' object has no attribute '{name}'")
        if name in ("intra_op_num_threads", "inter_op_num_threads", "log_severity_level"):
            _require_int(value, f"SessionOptions.{name}")
        self.values[name] = value

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "values")
        if name in values:
            return values[name]
        raise AttributeError(name)

    def add_session_config_entry(self, key: str, value: str) -> None:
        self.config_entries[_require_str(key, "add_session_config_entry")] = _require_str(
            value, "add_session_config_entry"
        )


class FakeRunOptions:
    def __init__(self) -> None:
        self.entries: dict[str, str] = {}

    def add_run_config_entry(self, key: str, value: str) -> None:
        self.entries[_require_str(key, "add_run_config_entry")] = _require_str(value, "add_run_config_entry")


class FakeIOBinding:
    def __init__(self, session: FakeInferenceSession) -> None:
        self.session = session
        self.inputs: dict[str, np.ndarray] = {}
        self.outputs: dict[str, tuple[str, int]] = {}  # name -> (device_type, device_id)
        self.results: list[np.ndarray] | None = None
        self.synchronize_outputs_calls = 0

    def bind_cpu_input(self, name: str, arr_on_cpu: np.ndarray) -> None:
        _require_str(name, "bind_cpu_input")
        if not isinstance(arr_on_cpu, np.ndarray):
            raise TypeError("bind_cpu_input: arr_on_cpu must be a numpy array")
        if name not in {i.name for i in self.session.get_inputs()}:
            raise RuntimeError(f"Failed to find NodeArg with name: {name} in the def list")
        self.inputs[name] = arr_on_cpu.copy()  # the real binding copies to the device here

    def bind_output(
        self,
        name: str,
        device_type: str = "cpu",
        device_id: int = 0,
        element_type: Any = None,
        shape: Any = None,
        buffer_ptr: Any = None,
    ) -> None:
        _require_str(name, "bind_output")
        if device_type not in ("cpu", "cuda"):
            raise RuntimeError(f"Unsupported device type: {device_type}")
        _require_int(device_id, "bind_output device_id")
        if name not in {o.name for o in self.session.get_outputs()}:
            raise RuntimeError(f"Failed to find NodeArg with name: {name} in the def list")
        self.outputs[name] = (device_type, int(device_id))

    def copy_outputs_to_cpu(self) -> list[np.ndarray]:
        if self.results is None:
            raise RuntimeError("no outputs: run_with_iobinding was not called")
        return [r.copy() for r in self.results]

    def synchronize_outputs(self) -> None:
        self.synchronize_outputs_calls += 1


class FakeInferenceSession:
    def __init__(
        self,
        path_or_bytes: str | bytes,
        sess_options: FakeSessionOptions | None = None,
        providers: list[Any] | None = None,
        provider_options: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        state: FakeOrtState = _ORT_STATE[0]
        if not isinstance(path_or_bytes, (str, bytes)):
            raise TypeError("InferenceSession: path_or_bytes must be str or bytes")
        data = Path(path_or_bytes).read_bytes() if isinstance(path_or_bytes, str) else path_or_bytes
        if not data.startswith(FAKE_ONNX_MAGIC):
            raise FakeInvalidProtobuf(
                f"[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from {path_or_bytes} "
                "failed:Protobuf parsing failed."
            )
        if sess_options is not None and not isinstance(sess_options, FakeSessionOptions):
            raise TypeError("sess_options must be SessionOptions")
        self.path = path_or_bytes
        self.sess_options = sess_options
        self.providers = list(providers or [])
        self.provider_options = provider_options
        self.runs: list[Any] = []  # run_options of each run / run_with_iobinding
        requested = []
        for entry in self.providers:
            if isinstance(entry, str):
                requested.append(entry)
                continue
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], dict)):
                raise ValueError("providers must be names or (name, options dict) tuples")
            name, options = entry
            requested.append(_require_str(name, "provider name"))
            for key, value in options.items():
                _require_str(key, "provider option name")
                if not isinstance(value, (str, int, bool)):
                    raise ValueError(f"provider option {key}: values must be str, int or bool")
            if "user_compute_stream" in options:
                value = options["user_compute_stream"]
                if not isinstance(value, str):
                    raise TypeError("user_compute_stream must be a str holding the stream address")
                if int(value) == 0:
                    raise ValueError("user_compute_stream 0 (default stream) is ignored by ONNX Runtime")
        cuda_ok = state.cuda_loads and "CUDAExecutionProvider" in requested
        self._active = (["CUDAExecutionProvider"] if cuda_ok else []) + ["CPUExecutionProvider"]
        state.sessions.append(self)

    def get_providers(self) -> list[str]:
        return list(self._active)

    def get_inputs(self) -> list[FakeNodeArg]:
        state: FakeOrtState = _ORT_STATE[0]
        return [FakeNodeArg("input", list(state.input_shape), state.input_type)]

    def get_outputs(self) -> list[FakeNodeArg]:
        return [FakeNodeArg("output", ["batch", FEATURES], "tensor(float)")]

    def _compute(self, x: np.ndarray) -> np.ndarray:
        wanted = {"tensor(float)": np.float32, "tensor(float16)": np.float16}[_ORT_STATE[0].input_type]
        if x.dtype != wanted:
            raise RuntimeError(
                f"[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Unexpected input data type. "
                f"Actual: ({x.dtype}) , expected: ({np.dtype(wanted)})"
            )
        return reference_output(x).astype(np.float32)

    def run(
        self, output_names: list[str] | None, input_feed: dict[str, Any], run_options: Any = None
    ) -> list[Any]:
        if set(input_feed) != {"input"}:
            raise RuntimeError(f"Invalid input name(s): {sorted(input_feed)}")
        self.runs.append(run_options)
        return [self._compute(np.asarray(input_feed["input"]))]

    def io_binding(self) -> FakeIOBinding:
        return FakeIOBinding(self)

    def run_with_iobinding(self, iobinding: FakeIOBinding, run_options: FakeRunOptions | None = None) -> None:
        if not isinstance(iobinding, FakeIOBinding) or iobinding.session is not self:
            raise RuntimeError("the IOBinding was created by another session")
        if run_options is not None and not isinstance(run_options, FakeRunOptions):
            raise TypeError("run_options must be RunOptions or None")
        if set(iobinding.inputs) != {"input"} or not iobinding.outputs:
            raise RuntimeError("inputs and outputs must be bound before run_with_iobinding")
        self.runs.append(run_options)
        iobinding.results = [self._compute(iobinding.inputs["input"])]


_ORT_STATE: list[FakeOrtState] = [FakeOrtState()]


def make_fake_onnxruntime() -> types.ModuleType:
    """A fake ``onnxruntime`` module; its recording lives in ``module.state``."""
    state = FakeOrtState()
    _ORT_STATE[0] = state
    module = types.ModuleType("onnxruntime")
    module.__version__ = "1.31.1"  # type: ignore[attr-defined]
    module.state = state  # type: ignore[attr-defined]
    module.SessionOptions = FakeSessionOptions  # type: ignore[attr-defined]
    module.RunOptions = FakeRunOptions  # type: ignore[attr-defined]
    module.InferenceSession = FakeInferenceSession  # type: ignore[attr-defined]
    module.IOBinding = FakeIOBinding  # type: ignore[attr-defined]
    module.get_available_providers = lambda: [  # type: ignore[attr-defined]
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    return module


# =====================================================================================
# tensorrt
# =====================================================================================


def write_fake_onnx_for_trt(
    path: Path, *, shape: tuple[int, ...] = (-1, 1, 4, 4), dtype: str = "FLOAT", name: str = "input"
) -> Path:
    """An "ONNX" file the fake TensorRT parser understands (JSON describing the input)."""
    path.write_text(json.dumps({"input": name, "shape": list(shape), "dtype": dtype}))
    return path


class FakeTrtState:
    def __init__(self) -> None:
        self.builders = 0
        self.networks: list[FakeNetwork] = []
        self.configs: list[FakeBuilderConfig] = []
        self.contexts: list[FakeExecutionContext] = []
        self.build_returns_none = False
        self.execute_result = True
        self.memory: dict[int, np.ndarray] = {}  # "device memory": address -> array


class FakeParserError:
    def __init__(self, desc: str) -> None:
        self._desc = desc

    def desc(self) -> str:
        return self._desc

    def __str__(self) -> str:
        return f"In node -1 (importModel): INVALID_GRAPH: {self._desc}"


@dataclass
class FakeITensor:
    name: str
    shape: tuple[int, ...]
    dtype: Any


class FakeNetwork:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: list[FakeITensor] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int) -> FakeITensor:
        return self.inputs[_require_int(index, "get_input")]


class FakeOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # the real names
        _require_str(input, "set_shape")
        lo, mid, hi = (_require_dims(d, "set_shape") for d in (min, opt, max))
        if not (len(lo) == len(mid) == len(hi)) or any(
            not (a <= b <= c) for a, b, c in zip(lo, mid, hi, strict=True)
        ):
            raise ValueError("set_shape: need min <= opt <= max of one rank")
        self.shapes[input] = (lo, mid, hi)


class FakeParser:
    def __init__(self, network: FakeNetwork, logger: Any, trt: types.ModuleType) -> None:
        if not isinstance(network, FakeNetwork):
            raise TypeError("OnnxParser: network must be an INetworkDefinition")
        self.network = network
        self.errors: list[FakeParserError] = []
        self._trt = trt

    def parse_from_file(self, model: str) -> bool:
        _require_str(model, "parse_from_file")
        try:
            spec = json.loads(Path(model).read_text())
            dtype = getattr(self._trt.DataType, spec["dtype"])
            tensor = FakeITensor(spec["input"], tuple(spec["shape"]), dtype)
        except (ValueError, KeyError, AttributeError, UnicodeDecodeError) as exc:
            self.errors.append(FakeParserError(f"Failed to parse ONNX model: {type(exc).__name__}"))
            return False
        self.network.inputs.append(tensor)
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> FakeParserError:
        return self.errors[_require_int(index, "get_error")]


class FakeBuilderConfig:
    def __init__(self, trt: types.ModuleType) -> None:
        self._trt = trt
        self.pool_limits: dict[Any, int] = {}
        self.flags: set[Any] = set()
        self.profiles: list[FakeOptimizationProfile] = []

    def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
        if not isinstance(pool, self._trt.MemoryPoolType):
            raise TypeError("set_memory_pool_limit: pool must be a tensorrt.MemoryPoolType")
        self.pool_limits[pool] = _require_int(pool_size, "set_memory_pool_limit")

    def set_flag(self, flag: Any) -> None:
        if not isinstance(flag, self._trt.BuilderFlag):
            raise TypeError("set_flag: flag must be a tensorrt.BuilderFlag")
        self.flags.add(flag)

    def add_optimization_profile(self, profile: FakeOptimizationProfile) -> int:
        if not isinstance(profile, FakeOptimizationProfile):
            raise TypeError("add_optimization_profile: expected an IOptimizationProfile")
        self.profiles.append(profile)
        return len(self.profiles) - 1


class FakeBuilder:
    def __init__(self, logger: Any, trt: types.ModuleType) -> None:
        if not isinstance(logger, trt.Logger):
            raise TypeError("Builder: logger must be a tensorrt.ILogger")
        self._trt = trt
        trt.state.builders += 1

    def create_network(self, flags: int = 0) -> FakeNetwork:
        network = FakeNetwork(_require_int(flags, "create_network"))
        self._trt.state.networks.append(network)
        return network

    def create_builder_config(self) -> FakeBuilderConfig:
        config = FakeBuilderConfig(self._trt)
        self._trt.state.configs.append(config)
        return config

    def create_optimization_profile(self) -> FakeOptimizationProfile:
        return FakeOptimizationProfile()

    def build_serialized_network(self, network: FakeNetwork, config: FakeBuilderConfig) -> bytes | None:
        if not isinstance(network, FakeNetwork) or not isinstance(config, FakeBuilderConfig):
            raise TypeError("build_serialized_network(network, config)")
        if self._trt.state.build_returns_none:
            return None
        tensor = network.inputs[0]
        profile = config.profiles[0].shapes.get(tensor.name) if config.profiles else None
        return fake_plan(
            input_name=tensor.name,
            shape=tensor.shape,
            dtype=tensor.dtype.name,
            profile=profile,
        )


def fake_plan(
    *,
    input_name: str = "input",
    shape: tuple[int, ...] = (-1, 1, 4, 4),
    dtype: str = "FLOAT",
    profile: Any = None,
) -> bytes:
    """Serialized "engine" bytes that the fake Runtime deserializes."""
    if profile is None and -1 in shape:
        rest = tuple(shape[1:])
        profile = ((1, *rest), (64, *rest), (64, *rest))
    body = {"input": input_name, "shape": list(shape), "dtype": dtype, "profile": profile}
    return b"FAKEPLAN" + json.dumps(body).encode()


class FakeEngine:
    def __init__(self, spec: dict[str, Any], trt: types.ModuleType, with_v2: bool) -> None:
        self._trt = trt
        self.spec = spec
        if with_v2:
            self.device_memory_size_v2 = 123_456
        else:
            self.device_memory_size = 65_432
        self._names = [spec["input"], "output"]

    @property
    def num_io_tensors(self) -> int:
        return 2

    def get_tensor_name(self, index: int) -> str:
        return self._names[_require_int(index, "get_tensor_name")]

    def _check(self, name: str) -> str:
        _require_str(name, "tensor name")
        if name not in self._names:
            raise ValueError(f"no tensor named {name}")
        return name

    def get_tensor_mode(self, name: str) -> Any:
        mode = self._trt.TensorIOMode
        return mode.INPUT if self._check(name) == self._names[0] else mode.OUTPUT

    def get_tensor_dtype(self, name: str) -> Any:
        if self._check(name) == self._names[0]:
            return getattr(self._trt.DataType, self.spec["dtype"])
        return self._trt.DataType.FLOAT

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if self._check(name) == self._names[0]:
            return tuple(self.spec["shape"])
        return (-1, FEATURES)

    def create_execution_context(self, strategy: Any = None) -> FakeExecutionContext:
        context = FakeExecutionContext(self)
        self._trt.state.contexts.append(context)
        return context


class FakeExecutionContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.input_shape: tuple[int, ...] | None = None
        self.addresses: dict[str, int] = {}
        self.calls: list[tuple[str, Any]] = []

    def set_input_shape(self, name: str, shape: Any) -> bool:
        dims = _require_dims(shape, "set_input_shape")
        if self.engine.get_tensor_mode(name) != self.engine._trt.TensorIOMode.INPUT:
            raise ValueError(f"{name} is not an input")
        self.calls.append(("set_input_shape", (name, dims)))
        profile = self.engine.spec["profile"]
        if profile is not None:
            lo, _, hi = profile
            if len(dims) != len(lo) or any(not (a <= d <= b) for a, d, b in zip(lo, dims, hi, strict=True)):
                return False
        elif dims != tuple(self.engine.spec["shape"]):
            return False
        self.input_shape = dims
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        self.engine._check(name)
        if self.input_shape is None:
            return self.engine.get_tensor_shape(name)
        if name == self.engine._names[0]:
            return self.input_shape
        return (self.input_shape[0], FEATURES)

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self.engine._check(name)
        self.addresses[name] = _require_int(memory, "set_tensor_address")
        self.calls.append(("set_tensor_address", (name, memory)))
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        handle = _require_int(stream_handle, "execute_async_v3")
        self.calls.append(("execute_async_v3", handle))
        state: FakeTrtState = self.engine._trt.state
        if not state.execute_result:
            return False
        if self.input_shape is None or set(self.addresses) != set(self.engine._names):
            raise RuntimeError("execute_async_v3 before every shape and address was set")
        x = state.memory[self.addresses[self.engine._names[0]]]
        out = state.memory[self.addresses["output"]]
        if x.shape != self.input_shape or out.shape != (self.input_shape[0], FEATURES):
            raise RuntimeError("buffer shapes do not match the context's shapes")
        out[...] = reference_output(x.astype(np.float32))
        return True


class FakeRuntime:
    def __init__(self, logger: Any, trt: types.ModuleType) -> None:
        if not isinstance(logger, trt.Logger):
            raise TypeError("Runtime: logger must be a tensorrt.ILogger")
        self._trt = trt

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> FakeEngine | None:
        if not isinstance(serialized_engine, (bytes, bytearray, memoryview)):
            raise TypeError("deserialize_cuda_engine: expected a buffer")
        data = bytes(serialized_engine)
        if not data.startswith(b"FAKEPLAN"):
            return None  # the real runtime logs an error and returns None
        spec = json.loads(data[len(b"FAKEPLAN") :])
        return FakeEngine(spec, self._trt, with_v2=self._trt.state_with_v2)


def make_fake_tensorrt(version: str = "11.4.0") -> types.ModuleType:
    """A fake ``tensorrt``: 11-style (no BuilderFlag.FP16) or, for "10.x", 10-style."""
    major = int(version.split(".")[0])
    module = types.ModuleType("tensorrt")
    module.__version__ = version  # type: ignore[attr-defined]
    state = FakeTrtState()
    module.state = state  # type: ignore[attr-defined]
    module.state_with_v2 = major >= 11  # type: ignore[attr-defined]  # 10-style: device_memory_size only

    class Severity(enum.Enum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class Logger:
        INTERNAL_ERROR = Severity.INTERNAL_ERROR
        ERROR = Severity.ERROR
        WARNING = Severity.WARNING
        INFO = Severity.INFO
        VERBOSE = Severity.VERBOSE

        def __init__(self, min_severity: Severity = Severity.WARNING) -> None:
            if not isinstance(min_severity, Severity):
                raise TypeError("Logger: min_severity must be a Logger.Severity")
            self.min_severity = min_severity

    Logger.Severity = Severity  # type: ignore[attr-defined]

    flags = ["DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "STRIP_PLAN"]
    if major < 11:
        flags = ["FP16", "BF16", "INT8", "OBEY_PRECISION_CONSTRAINTS", *flags]
    module.BuilderFlag = enum.Enum("BuilderFlag", flags)  # type: ignore[attr-defined]
    creation = {"STRONGLY_TYPED": 1} if major >= 11 else {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
    module.NetworkDefinitionCreationFlag = enum.IntEnum(  # type: ignore[attr-defined]
        "NetworkDefinitionCreationFlag", creation
    )
    module.MemoryPoolType = enum.Enum(  # type: ignore[attr-defined]
        "MemoryPoolType", ["WORKSPACE", "DLA_MANAGED_SRAM", "TACTIC_DRAM", "TACTIC_SHARED_MEMORY"]
    )
    module.DataType = enum.Enum(  # type: ignore[attr-defined]
        "DataType", ["FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL", "UINT8"]
    )
    module.TensorIOMode = enum.Enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])  # type: ignore[attr-defined]
    module.Logger = Logger  # type: ignore[attr-defined]
    module.Builder = lambda logger: FakeBuilder(logger, module)  # type: ignore[attr-defined]
    module.OnnxParser = lambda network, logger: FakeParser(network, logger, module)  # type: ignore[attr-defined]
    module.Runtime = lambda logger: FakeRuntime(logger, module)  # type: ignore[attr-defined]
    return module


class NumpyBuffers:
    """Host-memory stand-in for TorchCudaBuffers; arrays are registered by address.

    The fake TensorRT context reads and writes ``memory[address]``, as a real
    engine reads and writes device memory.
    """

    DEFAULT_STREAM = 0x5EED

    def __init__(self, memory: dict[int, np.ndarray], device: Device, stream: Any | None) -> None:
        self.memory = memory
        self.device = device
        self.stream_handle = self.DEFAULT_STREAM if stream is None else stream_handle(stream)
        self.uploads: list[tuple[int, ...]] = []
        self.synchronize_calls = 0
        self.allocations = 0
        self.fail_allocations = False

    def device_scope(self) -> AbstractContextManager[Any]:
        return nullcontext()

    def empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        _require_dims(shape, "empty")
        if not isinstance(dtype, np.dtype):
            raise TypeError("empty: dtype must be a numpy dtype")
        if self.fail_allocations:
            raise MemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.allocations += 1
        return np.zeros(shape, dtype=dtype)

    def address(self, buffer: np.ndarray) -> int:
        address = int(buffer.ctypes.data)
        self.memory[address] = buffer
        return address

    def upload(self, buffer: np.ndarray, host: np.ndarray) -> None:
        if buffer.shape != host.shape or buffer.dtype != host.dtype:
            raise ValueError(f"upload: {host.shape}/{host.dtype} into {buffer.shape}/{buffer.dtype}")
        self.uploads.append(tuple(host.shape))
        np.copyto(buffer, host)

    def download(self, buffer: np.ndarray) -> np.ndarray:
        return buffer.copy()

    def synchronize(self) -> None:
        self.synchronize_calls += 1


# =====================================================================================
# cupy
# =====================================================================================


class FakeCupyArray(np.ndarray):
    """A "device" array: a numpy array of another class, so a leak to numpy code shows."""


@dataclass
class FakeCupyState:
    streams: list[Any] = field(default_factory=list)  # every Stream / ExternalStream made
    current: list[Any] = field(default_factory=list)  # the stream stack ("with stream:")
    devices_used: list[int] = field(default_factory=list)
    asarray_streams: list[Any] = field(default_factory=list)
    asnumpy_streams: list[Any] = field(default_factory=list)
    pool_used: int = 0


def make_fake_cupy() -> types.ModuleType:
    """A fake ``cupy`` with ``cuda.Stream``, ``cuda.ExternalStream``, ``cuda.Device``."""
    state = FakeCupyState()
    module = types.ModuleType("cupy")
    cuda = types.ModuleType("cupy.cuda")
    memory = types.ModuleType("cupy.cuda.memory")

    class OutOfMemoryError(MemoryError):
        pass

    class BaseStream:
        _next_ptr = 0x1000

        def __init__(self) -> None:
            self.synchronize_calls = 0
            state.streams.append(self)

        def __enter__(self) -> BaseStream:
            state.current.append(self)
            return self

        def __exit__(self, *exc: object) -> None:
            state.current.pop()

        def use(self) -> BaseStream:
            return self

        def synchronize(self) -> None:
            self.synchronize_calls += 1

    class Stream(BaseStream):
        def __init__(
            self,
            null: bool = False,
            non_blocking: bool = False,
            ptds: bool = False,
            priority: int | None = None,
        ) -> None:
            super().__init__()
            BaseStream._next_ptr += 0x10
            self.ptr = BaseStream._next_ptr
            self.non_blocking = non_blocking
            self.null = null

    class ExternalStream(BaseStream):
        def __init__(self, ptr: int, device_id: int = -1) -> None:
            super().__init__()
            self.ptr = _require_int(ptr, "ExternalStream ptr")
            self.device_id = _require_int(device_id, "ExternalStream device_id")

    class Device:
        def __init__(self, device: int | None = None) -> None:
            self.id = 0 if device is None else _require_int(device, "Device")

        def use(self) -> None:
            state.devices_used.append(self.id)

        def __enter__(self) -> Device:
            state.devices_used.append(self.id)
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    class MemoryPool:
        def used_bytes(self) -> int:
            return state.pool_used

    def current_stream() -> Any:
        return state.current[-1] if state.current else None

    def asarray(a: Any, dtype: Any = None, order: Any = None) -> FakeCupyArray:
        state.asarray_streams.append(current_stream())
        return np.array(a, dtype=dtype, copy=True).view(FakeCupyArray)

    def asnumpy(
        a: Any, stream: Any = None, order: str = "C", out: Any = None, *, blocking: bool = True
    ) -> np.ndarray:
        state.asnumpy_streams.append(stream)
        return np.array(a, copy=True).view(np.ndarray)

    memory.OutOfMemoryError = OutOfMemoryError  # type: ignore[attr-defined]
    cuda.memory = memory  # type: ignore[attr-defined]
    cuda.Stream = Stream  # type: ignore[attr-defined]
    cuda.ExternalStream = ExternalStream  # type: ignore[attr-defined]
    cuda.Device = Device  # type: ignore[attr-defined]
    cuda.get_current_stream = current_stream  # type: ignore[attr-defined]
    module.cuda = cuda  # type: ignore[attr-defined]
    module.ndarray = FakeCupyArray  # type: ignore[attr-defined]
    module.float16 = np.float16  # type: ignore[attr-defined]
    module.float32 = np.float32  # type: ignore[attr-defined]
    module.asarray = asarray  # type: ignore[attr-defined]
    module.asnumpy = asnumpy  # type: ignore[attr-defined]
    module.get_default_memory_pool = MemoryPool  # type: ignore[attr-defined]
    module.state = state  # type: ignore[attr-defined]
    module.current_stream = current_stream  # type: ignore[attr-defined]
    return module


def iter_calls(context: FakeExecutionContext, kind: str) -> Iterator[Any]:
    """The recorded arguments of one kind of context call."""
    return (args for name, args in context.calls if name == kind)


def heavy_modules_after_import(module: str) -> list[str]:
    """Which frameworks a fresh interpreter has loaded after ``import module``."""
    import subprocess
    import sys

    code = (
        f"import sys, {module}; "
        "print(','.join(m for m in ('torch', 'onnxruntime', 'onnx', 'tensorrt', 'cupy') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in result.stdout.strip().split(",") if m]
