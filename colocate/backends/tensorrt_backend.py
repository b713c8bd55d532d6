"""The ``tensorrt`` backend: a TensorRT engine on a CUDA GPU (no CPU support).

The member's source is a serialized engine (``.engine`` / ``.plan``, any
suffix but ``.onnx``) or an ``.onnx`` file, from which an engine is built on
first use and cached on disk. Engines are specific to the GPU model and the
TensorRT version: the cache key includes both.

Precision: TensorRT 11 removed ``BuilderFlag.FP16`` / ``BF16``; its networks
are strongly typed and run in the precision of the ONNX graph, so an fp16
member needs an fp16 ONNX export (e.g. ``model.half()`` with fp16 example
inputs). With TensorRT 10 the builder flag is set instead. A float32 batch is
cast to the engine's input type (e.g. float16) before it is copied to the GPU.

I/O buffers are torch CUDA tensors (one set per batch size, reused), and the
engine runs with ``execute_async_v3`` on a non-default stream: the stream
given to the runner, or a new ``torch.cuda.Stream``. An output of :meth:`run`
is valid until the next run with the same batch size.

Backend options (``Member.options``):

- ``workspace_bytes`` (int): builder workspace limit, default 1 GiB.
- ``max_batch_size`` (int): the largest batch of the optimisation profile of a
  dynamic-batch ONNX model, default 64 (the profile is min 1, opt = max).
- ``engine_cache_dir`` (str or Path): where built engines are kept, default
  ``$XDG_CACHE_HOME/colocate/engines`` (``~/.cache/colocate/engines``).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from colocate._optional import optional_import
from colocate.backends.base import MemberRunner, stream_handle
from colocate.devices import Device
from colocate.ensemble import Array, Member
from colocate.errors import (
    InvalidInputError,
    MemberOutOfMemoryError,
    ModelLoadError,
    WorkerFailedError,
)

DEFAULT_WORKSPACE_BYTES = 1 << 30
DEFAULT_MAX_BATCH_SIZE = 64

#: TensorRT ``DataType`` member names -> numpy dtype names
_TRT_TO_NUMPY: dict[str, str] = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "UINT8": "uint8",
    "BOOL": "bool",
}

#: builder flags of TensorRT 10 for a member precision (absent in TensorRT 11)
_PRECISION_FLAGS: dict[str, str] = {"fp16": "FP16", "bf16": "BF16"}
#: network input types that already carry a member precision (no warning needed)
_PRECISION_TYPES: dict[str, str] = {"fp16": "HALF", "bf16": "BF16"}


# --- device buffers ---------------------------------------------------------------


class DeviceBuffers(Protocol):
    """What the TensorRT runner needs from device memory: buffers, a stream, copies.

    The production implementation is :class:`TorchCudaBuffers`; tests put a
    host-memory implementation in ``TensorRTRunner.buffer_factory``.
    """

    stream_handle: int  # the non-default cudaStream_t the engine runs on

    def device_scope(self) -> AbstractContextManager[Any]:
        """A context in which the runner's GPU is the current device."""
        ...

    def empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        """A new device buffer; raises :class:`MemoryError` when the device is full."""
        ...

    def address(self, buffer: Any) -> int:
        """The device address of ``buffer``."""
        ...

    def upload(self, buffer: Any, host: Array) -> None:
        """Enqueue a copy of ``host`` into ``buffer`` on the stream."""
        ...

    def download(self, buffer: Any) -> Array:
        """A host copy of ``buffer``, after the stream's earlier work."""
        ...

    def synchronize(self) -> None:
        """Wait for the stream."""
        ...


BufferFactory = Callable[[Device, Any], DeviceBuffers]


class TorchCudaBuffers:
    """Device buffers as torch CUDA tensors, on one stream of one GPU.

    ``stream`` is the runner's stream (torch, CuPy, raw handle) or None for a
    new ``torch.cuda.Stream`` on the device.
    """

    def __init__(self, device: Device, stream: Any | None) -> None:
        torch = optional_import("torch", purpose="backend 'tensorrt' (its I/O buffers are torch tensors)")
        self._torch: Any = torch
        self._device: Any = torch.device("cuda", device.index)
        if stream is None:
            self._stream: Any = torch.cuda.Stream(device=self._device)
        elif isinstance(stream, torch.cuda.Stream):
            self._stream = stream
        else:
            self._stream = torch.cuda.ExternalStream(stream_handle(stream), device=self._device)
        self.stream_handle: int = int(self._stream.cuda_stream)

    def device_scope(self) -> AbstractContextManager[Any]:
        scope: AbstractContextManager[Any] = self._torch.cuda.device(self._device)
        return scope

    def empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        torch = self._torch
        torch_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        try:
            # allocated on the runner's stream, so the caching allocator ties it to that stream
            with torch.cuda.stream(self._stream):
                return torch.empty(shape, dtype=torch_dtype, device=self._device)
        except torch.OutOfMemoryError as exc:
            raise MemoryError(str(exc)) from exc

    def address(self, buffer: Any) -> int:
        return int(buffer.data_ptr())

    def upload(self, buffer: Any, host: Array) -> None:
        if not host.flags.writeable:
            host = host.copy()  # torch.from_numpy warns on read-only arrays
        with self._torch.cuda.stream(self._stream):
            # from pageable memory the host side is staged before this returns
            buffer.copy_(self._torch.from_numpy(host), non_blocking=True)

    def download(self, buffer: Any) -> Array:
        with self._torch.cuda.stream(self._stream):
            host = buffer.to("cpu")  # blocking copy, ordered after the stream's work
        return np.asarray(host.numpy())

    def synchronize(self) -> None:
        self._stream.synchronize()


# --- engine cache -----------------------------------------------------------------


def engine_cache_dir(options: Mapping[str, Any]) -> Path:
    """The engine cache directory: ``options["engine_cache_dir"]`` or the XDG cache."""
    configured = options.get("engine_cache_dir")
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "colocate" / "engines"


def engine_cache_key(
    onnx_path: Path,
    member: Member,
    device: Device,
    *,
    workspace_bytes: int,
    max_batch_size: int,
    trt_version: str,
) -> str:
    """sha256 of the ONNX bytes (and its ``.data`` side file) and every build setting."""
    digest = hashlib.sha256()
    files = [onnx_path, onnx_path.with_name(onnx_path.name + ".data")]
    for file in files:
        if not file.is_file():
            continue
        digest.update(f"|file {file.name}|".encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    settings = {
        "precision": member.precision,
        "workspace_bytes": workspace_bytes,
        "max_batch_size": max_batch_size,
        "tensorrt": trt_version,
        "input": [member.input.name, list(member.input.shape)],
        "gpu": [device.name, list(device.compute_capability or ())],
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


# --- runner ------------------------------------------------------------------------


@dataclass
class _IoSet:
    """The device buffers for one batch size."""

    input_shape: tuple[int, ...]
    input: Any
    input_address: int
    outputs: dict[str, Any] = field(default_factory=dict)  # output name -> buffer
    output_addresses: dict[str, int] = field(default_factory=dict)


@dataclass
class _Output:
    """What :meth:`TensorRTRunner.run` returns: the first output's buffer."""

    buffer: Any
    batch_size: int


def _numpy_dtype(trt_dtype: Any) -> np.dtype[Any] | None:
    name = getattr(trt_dtype, "name", None) or str(trt_dtype).rsplit(".", 1)[-1]
    numpy_name = _TRT_TO_NUMPY.get(str(name))
    return np.dtype(numpy_name) if numpy_name else None


def _dims(shape: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


class TensorRTRunner(MemberRunner):
    """Runs a TensorRT engine (built from ONNX and cached, or loaded) on a CUDA GPU."""

    backend_name = "tensorrt"
    supports_cpu = False
    supports_cuda = True

    def __init__(self, member: Member, device: Device, *, stream: Any | None = None) -> None:
        super().__init__(member, device, stream=stream)
        #: makes the I/O buffers and the stream; replace it to run without torch (tests)
        self.buffer_factory: BufferFactory = TorchCudaBuffers
        #: the engine file the last activate() loaded (the cache entry for ONNX sources)
        self.engine_path: Path | None = None
        #: whether the last activate() built the engine (False: loaded it)
        self.built_engine = False
        self._trt: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._buffers: DeviceBuffers | None = None
        self._input_name = ""
        self._output_names: list[str] = []
        self._dtypes: dict[str, np.dtype[Any]] = {}
        self._feed_dtype: np.dtype[Any] | None = None
        self._io: dict[int, _IoSet] = {}

    @property
    def engine_device_memory_bytes(self) -> int:
        """Scratch (activation) memory one execution context of the engine takes, in bytes."""
        if self._engine is None:
            raise InvalidInputError(
                f"member '{self.member.name}': engine_device_memory_bytes before activate(); "
                "call runner.activate() first"
            )
        if hasattr(self._engine, "device_memory_size_v2"):
            return int(self._engine.device_memory_size_v2)
        return int(self._engine.device_memory_size)  # TensorRT 10 before 10.1

    # --- hooks ------------------------------------------------------------------

    def _activate(self) -> None:
        member = self.member
        trt = optional_import("tensorrt", purpose=f"backend 'tensorrt' of member '{member.name}'")
        path = self._model_file("give a serialized engine (.engine/.plan) or an .onnx file")
        workspace = self._positive_int_option("workspace_bytes", DEFAULT_WORKSPACE_BYTES)
        max_batch = self._positive_int_option("max_batch_size", DEFAULT_MAX_BATCH_SIZE)
        if self.stream is not None and stream_handle(self.stream) == 0:
            raise InvalidInputError(
                f"member '{member.name}': the default CUDA stream (handle 0) was given; TensorRT "
                "adds device-wide synchronisation on it. Pass a non-default stream or no stream"
            )
        buffers = self.buffer_factory(self.device, self.stream)
        logger = trt.Logger(trt.Logger.WARNING)
        with buffers.device_scope():
            runtime = trt.Runtime(logger)
            if path.suffix.lower() == ".onnx":
                plan, cache_file, cached = self._onnx_engine(trt, logger, path, workspace, max_batch)
                engine = runtime.deserialize_cuda_engine(plan)
                if engine is None and cached:
                    # a stale or damaged cache entry: drop it and build once more
                    cache_file.unlink(missing_ok=True)
                    plan, cache_file, cached = self._onnx_engine(trt, logger, path, workspace, max_batch)
                    engine = runtime.deserialize_cuda_engine(plan)
                engine_file = cache_file
            else:
                engine = runtime.deserialize_cuda_engine(path.read_bytes())
                engine_file = path
                self.built_engine = False
            if engine is None:
                raise ModelLoadError(
                    f"member '{member.name}': TensorRT could not deserialize engine '{engine_file}' "
                    f"(corrupt engine, or built by another TensorRT version than {trt.__version__} or "
                    "for another GPU); rebuild it, e.g. from the .onnx file"
                )
            context = engine.create_execution_context()
            if context is None:
                raise ModelLoadError(
                    f"member '{member.name}': TensorRT could not create an execution context for "
                    f"'{engine_file}' (out of device memory?)"
                )
        self._trt = trt
        self._runtime = runtime
        self._engine = engine
        self._context = context
        self._buffers = buffers
        self.engine_path = engine_file
        self._io = {}
        self._inspect_io(trt, engine)

    def _prepare(self, batch: Array) -> Any:
        if self._feed_dtype is not None:
            batch = batch.astype(self._feed_dtype)
        io = self._io_set(tuple(batch.shape))
        self._live_buffers().upload(io.input, batch)
        return io

    def _run(self, prepared: Any) -> Any:
        io: _IoSet = prepared
        buffers = self._live_buffers()
        context = self._context
        with buffers.device_scope():
            # set per run, so prepare() of another batch size in between cannot confuse the context
            context.set_input_shape(self._input_name, io.input_shape)
            context.set_tensor_address(self._input_name, io.input_address)
            for name, address in io.output_addresses.items():
                context.set_tensor_address(name, address)
            ok = context.execute_async_v3(buffers.stream_handle)
        if not ok:
            raise WorkerFailedError(
                f"member '{self.member.name}': TensorRT execute_async_v3 failed at batch size "
                f"{io.input_shape[0]}; see the TensorRT log above"
            )
        return _Output(buffer=io.outputs[self._output_names[0]], batch_size=io.input_shape[0])

    def _to_numpy(self, output: Any) -> Array:
        result: _Output = output
        buffers = self._live_buffers()
        buffers.synchronize()
        return buffers.download(result.buffer)

    def _synchronize(self) -> None:
        if self._buffers is not None:
            self._buffers.synchronize()

    def _deactivate(self) -> None:
        try:
            if self._buffers is not None:
                self._buffers.synchronize()  # buffers may still be in use by the stream
        finally:
            self._io = {}
            self._context = None  # a context goes before its engine, the engine before its runtime
            self._engine = None
            self._runtime = None
            self._buffers = None
            self._trt = None

    # --- building ---------------------------------------------------------------

    def _onnx_engine(
        self, trt: Any, logger: Any, onnx_path: Path, workspace: int, max_batch: int
    ) -> tuple[bytes, Path, bool]:
        """(plan, cache file, whether it came from the cache) for an ONNX source."""
        key = engine_cache_key(
            onnx_path,
            self.member,
            self.device,
            workspace_bytes=workspace,
            max_batch_size=max_batch,
            trt_version=str(trt.__version__),
        )
        cache_dir = engine_cache_dir(self.member.options)
        cache_file = cache_dir / f"{key}.engine"
        if cache_file.is_file():
            self.built_engine = False
            return cache_file.read_bytes(), cache_file, True
        plan = self._build(trt, logger, onnx_path, workspace, max_batch)
        self.built_engine = True
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            partial = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            partial.write_bytes(plan)
            os.replace(partial, cache_file)
        except OSError as exc:
            warnings.warn(
                f"member '{self.member.name}': could not cache the TensorRT engine in "
                f"'{cache_dir}' ({exc}); it will be built again next time. Set the option "
                "engine_cache_dir to a writable directory",
                RuntimeWarning,
                stacklevel=2,
            )
        return plan, cache_file, False

    def _build(self, trt: Any, logger: Any, onnx_path: Path, workspace: int, max_batch: int) -> bytes:
        """Parse ``onnx_path`` and build a serialized engine."""
        member = self.member
        builder = trt.Builder(logger)
        network = builder.create_network(self._network_flags(trt))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelLoadError(
                f"member '{member.name}': TensorRT could not parse ONNX file '{onnx_path}': "
                f"{errors or 'no error reported'}; check the export (opset, unsupported operators)"
            )
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)

        if network.num_inputs != 1:
            names = [network.get_input(i).name for i in range(network.num_inputs)]
            raise InvalidInputError(
                f"member '{member.name}': the ONNX model has {network.num_inputs} inputs {names}; "
                "colocate feeds exactly one input tensor"
            )
        network_input = network.get_input(0)
        self._set_precision(trt, config, network_input)
        shape = _dims(network_input.shape)
        spec = member.input.shape
        if len(shape) != len(spec):
            raise InvalidInputError(
                f"member '{member.name}': InputSpec.shape {spec} has rank {len(spec)} but the "
                f"ONNX model's input '{network_input.name}' has shape {shape}; fix InputSpec.shape"
            )
        if any(d == -1 for d in shape):
            rest = tuple(s if n == -1 else n for n, s in zip(shape[1:], spec[1:], strict=True))
            low, high = (spec[0], spec[0]) if spec[0] > 0 else (1, max_batch)
            profile = builder.create_optimization_profile()
            profile.set_shape(network_input.name, (low, *rest), (high, *rest), (high, *rest))
            config.add_optimization_profile(profile)

        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ModelLoadError(
                f"member '{member.name}': TensorRT failed to build an engine from '{onnx_path}'; "
                "see the TensorRT log above (a larger workspace_bytes option may help)"
            )
        return bytes(serialized)

    @staticmethod
    def _network_flags(trt: Any) -> int:
        """0 in TensorRT 11 (always explicit batch); the EXPLICIT_BATCH bit in TensorRT 10."""
        major = int(str(trt.__version__).split(".", 1)[0])
        flags = getattr(trt, "NetworkDefinitionCreationFlag", None)
        if major < 11 and flags is not None and hasattr(flags, "EXPLICIT_BATCH"):
            return 1 << int(flags.EXPLICIT_BATCH)
        return 0

    def _set_precision(self, trt: Any, config: Any, network_input: Any) -> None:
        precision = self.member.precision
        flag_name = _PRECISION_FLAGS.get(precision)
        if flag_name is None:
            return
        flag = getattr(trt.BuilderFlag, flag_name, None)
        if flag is not None:  # TensorRT 10: weakly typed, the flag allows the precision
            config.set_flag(flag)
            return
        input_type = getattr(getattr(network_input, "dtype", None), "name", None)
        if input_type != _PRECISION_TYPES[precision]:
            warnings.warn(
                f"member '{self.member.name}': precision '{precision}' but TensorRT "
                f"{trt.__version__} has no BuilderFlag.{flag_name}: its networks are strongly "
                "typed and run the precision of the ONNX graph, whose input is "
                f"{input_type or 'of unknown type'}. Export the model in {precision} "
                "(e.g. model.half() with half inputs) for a reduced-precision engine",
                UserWarning,
                stacklevel=2,
            )

    # --- I/O --------------------------------------------------------------------

    def _inspect_io(self, trt: Any, engine: Any) -> None:
        """Find the engine's input and outputs; check them against the input spec."""
        member = self.member
        names = [str(engine.get_tensor_name(i)) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1:
            raise InvalidInputError(
                f"member '{member.name}': the engine has {len(inputs)} inputs {inputs}; colocate "
                "feeds exactly one input tensor"
            )
        if not outputs:
            raise ModelLoadError(f"member '{member.name}': the engine has no output tensors")
        dtypes: dict[str, np.dtype[Any]] = {}
        for name in names:
            dtype = _numpy_dtype(engine.get_tensor_dtype(name))
            if dtype is None:
                raise ModelLoadError(
                    f"member '{member.name}': engine tensor '{name}' has type "
                    f"{engine.get_tensor_dtype(name)}, which colocate cannot exchange as numpy; "
                    "use float32/float16/int I/O"
                )
            dtypes[name] = dtype
        input_name = inputs[0]
        shape = _dims(engine.get_tensor_shape(input_name))
        spec = member.input.shape
        if len(shape) != len(spec) or any(
            n > 0 and n != s for n, s in zip(shape[1:], spec[1:], strict=False)
        ):
            raise InvalidInputError(
                f"member '{member.name}': InputSpec.shape {spec} does not match the engine's input "
                f"'{input_name}' of shape {shape}; fix InputSpec.shape"
            )
        spec_dtype = np.dtype(member.input.dtype)
        engine_dtype = dtypes[input_name]
        self._feed_dtype = None
        if engine_dtype != spec_dtype:
            if not (np.issubdtype(engine_dtype, np.floating) and np.issubdtype(spec_dtype, np.floating)):
                raise InvalidInputError(
                    f"member '{member.name}': the engine's input '{input_name}' is {engine_dtype} "
                    f"but InputSpec.dtype is {spec_dtype}; set InputSpec.dtype='{engine_dtype}'"
                )
            self._feed_dtype = engine_dtype
        self._input_name = input_name
        self._output_names = outputs
        self._dtypes = dtypes

    def _io_set(self, input_shape: tuple[int, ...]) -> _IoSet:
        """The buffers for this input shape: allocated on first use, then reused."""
        batch_size = input_shape[0]
        cached = self._io.get(batch_size)
        if cached is not None:
            return cached
        buffers = self._live_buffers()
        context = self._context
        name = self.member.name
        with buffers.device_scope():
            if context.set_input_shape(self._input_name, input_shape) is False:
                raise InvalidInputError(
                    f"member '{name}': the engine does not accept input shape {input_shape} "
                    "(outside its optimisation profile); rebuild it with a larger max_batch_size "
                    "option or use a smaller batch"
                )
            try:
                buffer = buffers.empty(input_shape, self._dtypes[self._input_name])
                io = _IoSet(input_shape=input_shape, input=buffer, input_address=buffers.address(buffer))
                for output in self._output_names:
                    shape = _dims(context.get_tensor_shape(output))
                    if any(d < 0 for d in shape):
                        raise ModelLoadError(
                            f"member '{name}': the engine cannot tell the shape of output "
                            f"'{output}' for input shape {input_shape} (got {shape}); data-dependent "
                            "output shapes are not supported"
                        )
                    out = buffers.empty(shape, self._dtypes[output])
                    io.outputs[output] = out
                    io.output_addresses[output] = buffers.address(out)
            except MemoryError as exc:
                raise MemberOutOfMemoryError(
                    f"member '{name}': out of device memory allocating TensorRT I/O buffers for "
                    f"batch size {batch_size} ({exc}); use a smaller batch or free memory",
                    member=name,
                    batch_size=batch_size,
                ) from exc
        self._io[batch_size] = io
        return io

    def _live_buffers(self) -> DeviceBuffers:
        if self._buffers is None:
            raise InvalidInputError(
                f"member '{self.member.name}': the runner is not active; call runner.activate()"
            )
        return self._buffers

    def _positive_int_option(self, key: str, default: int) -> int:
        value = self.member.options.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(
                f"member '{self.member.name}': option {key} must be a positive int, got {value!r}"
            )
        return value


__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_WORKSPACE_BYTES",
    "DeviceBuffers",
    "TensorRTRunner",
    "TorchCudaBuffers",
    "engine_cache_dir",
    "engine_cache_key",
]
