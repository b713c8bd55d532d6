"""The torch backend: eager PyTorch on the CPU or a CUDA GPU, optionally CUDA-graph replay or torch.compile.

Member options (``Member.options``):

- ``cuda_graph`` (bool, default False): on a GPU, capture the forward pass once
  per batch size and replay it (one launch per batch instead of one per kernel).
- ``compile`` (bool or a ``torch.compile`` mode, default False): run the module through
  ``torch.compile(mode=..., dynamic=False)``; ``True`` means mode ``"default"``. The first
  call at each batch shape compiles (seconds to a minute per model and shape on a CPU);
  compilations are serialised process-wide, and :attr:`TorchRunner.compile_seconds` records
  how long each took. Inductor needs a C++ compiler on the CPU and triton on a GPU; a failed
  compilation is a :class:`~colocate.errors.ModelLoadError` naming the member. Not together
  with ``cuda_graph`` (modes ``"reduce-overhead"`` and ``"max-autotune"`` replay CUDA graphs
  themselves; on a GPU their outputs are copied, since the next compiled call in the thread
  frees them, and a slot runs all its members before it reads their outputs). Such a member
  raises dynamo's per-process recompile limit to :data:`RECOMPILE_LIMIT` (from 8: past it,
  dynamo runs the model eagerly without a word).
- ``channels_last`` (bool, default False): use the channels-last memory format
  for 4-D inputs.
"""

from __future__ import annotations

import copy
import threading
import time
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from colocate._optional import optional_import
from colocate.backends.base import MemberRunner, stream_handle
from colocate.ensemble import Array
from colocate.errors import InvalidInputError, MemberOutOfMemoryError, ModelLoadError

if TYPE_CHECKING:
    import torch

_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""The ``torch.compile`` modes the ``compile`` option accepts (``True`` is ``"default"``)."""
# modes whose compiled code replays CUDA graphs on a GPU: the next compiled call in the thread
# frees the outputs of the last (torch.compiler.cudagraph_mark_step_begin's documentation)
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# dynamo and inductor keep process-wide state; stream slots load and first run their members
# from several threads, so one compilation runs at a time
_COMPILE_LOCK = threading.Lock()
_KNOWN_OPTIONS = ("cuda_graph", "channels_last", "compile")


#: dynamo compiles one ``forward`` (shared by every instance of a model class) for at most 8
#: guard sets per process by default, then runs it eagerly without an error: the framework
#: study's six batch sizes at two thread counts, or a few members of one class in a slot, pass
#: that. Members with the ``compile`` option raise the process's limit to this.
RECOMPILE_LIMIT = 64


def _raise_recompile_limit(torch: Any) -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, name, RECOMPILE_LIMIT) < RECOMPILE_LIMIT:
        setattr(config, name, RECOMPILE_LIMIT)


def compile_mode(member: Any) -> str | None:
    """The ``torch.compile`` mode ``member``'s ``compile`` option asks for, or None when off.

    Raises:
        InvalidInputError: a value that is neither a bool nor one of :data:`COMPILE_MODES`, or
            ``compile`` together with ``cuda_graph``.
    """
    value = member.options.get("compile", False)
    if value is False or value is None:
        return None
    mode = "default" if value is True else value
    if not isinstance(mode, str) or mode not in COMPILE_MODES:
        raise InvalidInputError(
            f"member '{member.name}': torch option compile={value!r}; give true, false or a mode "
            f"({', '.join(COMPILE_MODES)})"
        )
    if member.options.get("cuda_graph", False):
        raise InvalidInputError(
            f"member '{member.name}': the torch options compile and cuda_graph exclude each other; "
            "keep one (compile mode 'reduce-overhead' replays CUDA graphs itself)"
        )
    return mode


def import_torch(purpose: str) -> Any:
    """torch, or a BackendUnavailableError naming ``purpose`` and the extra."""
    return optional_import("torch", purpose=purpose)


class TorchRunner(MemberRunner):
    """Runs a ``torch.nn.Module`` member on the CPU or a GPU stream."""

    backend_name = "torch"

    def __init__(self, member: Any, device: Any, *, stream: Any | None = None) -> None:
        super().__init__(member, device, stream=stream)
        self._torch: Any = None
        self._model: torch.nn.Module | None = None
        self._stream: Any = None  # torch.cuda.Stream the work goes on (GPU only)
        self._dtype: Any = None
        self._graphs: dict[tuple[int, ...], tuple[Any, Any, Any]] = {}  # shape -> (graph, in, out)
        unknown = set(member.options) - set(_KNOWN_OPTIONS)
        if unknown:
            raise InvalidInputError(
                f"member '{member.name}': unknown torch option(s) {sorted(unknown)}; "
                f"known: {', '.join(_KNOWN_OPTIONS)}"
            )
        self.compile_mode = compile_mode(member)
        self.use_cuda_graph = bool(member.options.get("cuda_graph", False)) and device.kind == "cuda"
        self.channels_last = bool(member.options.get("channels_last", False))
        # a slot runs all its members, then fetches their outputs: another compiled member's
        # call would free this one's output first, so such outputs are copied (GPU only)
        self.clones_outputs = self.compile_mode in _CUDA_GRAPH_MODES and device.kind == "cuda"
        self.compile_seconds: dict[tuple[int, ...], float] = {}
        """Input shape -> seconds its first call took, compiling included (``compile`` only)."""

    @property
    def model(self) -> torch.nn.Module:
        """The loaded module (after activate)."""
        if self._model is None:
            self._require_active("model")
        assert self._model is not None
        return self._model

    @property
    def torch_stream(self) -> Any:
        """The torch CUDA stream this runner enqueues on (None on the CPU)."""
        return self._stream

    def _load_module(self) -> torch.nn.Module:
        tm = self._torch
        source = self.member.source
        name = self.member.name
        if isinstance(source, (str, Path)):
            try:
                module = tm.jit.load(str(source), map_location="cpu")
            except Exception as exc:  # torch raises RuntimeError/ValueError for bad files
                raise ModelLoadError(
                    f"member '{name}': {str(source)!r} is not a loadable TorchScript file ({exc}); "
                    "re-save it with torch.jit.save, or give a factory that builds the module"
                ) from exc
        elif isinstance(source, tm.nn.Module):
            module = copy.deepcopy(source)
        elif callable(source):
            try:
                module = source()
            except Exception as exc:
                raise ModelLoadError(
                    f"member '{name}': its factory {source!r} raised {type(exc).__name__}: {exc}"
                ) from exc
            if not isinstance(module, tm.nn.Module):
                raise ModelLoadError(
                    f"member '{name}': its factory returned {type(module).__name__}, not a torch.nn.Module"
                )
        else:
            raise ModelLoadError(
                f"member '{name}': backend 'torch' needs an nn.Module, a factory or a TorchScript "
                f"path as source, got {type(source).__name__}"
            )
        return typing.cast("torch.nn.Module", module)

    def _activate(self) -> None:
        torch = import_torch(f"backend 'torch' of member '{self.member.name}'")
        self._torch = torch
        self._dtype = getattr(torch, _TORCH_DTYPES[self.member.precision])
        device = torch.device(self.device.torch_device)
        if self.device.kind == "cuda":
            if self.stream is None:
                self._stream = torch.cuda.Stream(device=device)
            elif isinstance(self.stream, torch.cuda.Stream):
                self._stream = self.stream
            else:
                self._stream = torch.cuda.ExternalStream(stream_handle(self.stream), device=device)
            if self.use_cuda_graph and self._stream.cuda_stream == 0:
                raise InvalidInputError(
                    f"member '{self.member.name}': the cuda_graph option cannot capture on the legacy "
                    "default stream (handle 0); give it another stream, or none (it makes its own)"
                )
        module = self._load_module().eval()
        try:
            with self._stream_context():
                module = module.to(device=device, dtype=self._dtype)
                if self.channels_last:
                    module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        except torch.OutOfMemoryError as exc:
            raise MemberOutOfMemoryError(
                f"member '{self.member.name}': out of memory loading the weights on "
                f"{self.device.name}; free memory or use a smaller precision",
                member=self.member.name,
            ) from exc
        if self.compile_mode is not None:
            _raise_recompile_limit(torch)
            module = torch.compile(module, mode=self.compile_mode, dynamic=False)
        self._model = module

    def _stream_context(self) -> Any:
        return self._torch.cuda.stream(self._stream) if self._stream is not None else _NullContext()

    def _prepare(self, batch: Array) -> Any:
        torch = self._torch
        tensor = torch.from_numpy(batch)
        with self._stream_context():
            if self.device.kind == "cuda":
                tensor = tensor.pin_memory().to(self.device.torch_device, non_blocking=True)
            if tensor.is_floating_point():
                tensor = tensor.to(self._dtype)
            if self.channels_last and tensor.dim() == 4:
                tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def _run(self, prepared: Any) -> Any:
        torch = self._torch
        try:
            with torch.inference_mode(), self._stream_context():
                if self.use_cuda_graph:
                    return self._replay(prepared)
                if self.compile_mode is not None and tuple(prepared.shape) not in self.compile_seconds:
                    output = self._compile_for(prepared)
                else:
                    output = self.model(prepared)
                return _cloned(output) if self.clones_outputs else output
        except torch.OutOfMemoryError as exc:
            raise MemberOutOfMemoryError(
                f"member '{self.member.name}': out of memory at batch size {prepared.shape[0]} on "
                f"{self.device.name}; use a smaller batch size or give it more memory",
                member=self.member.name,
                batch_size=int(prepared.shape[0]),
            ) from exc

    def _compile_for(self, prepared: Any) -> Any:
        """The first call at ``prepared``'s shape: torch.compile compiles it, one at a time."""
        torch = self._torch
        key = tuple(prepared.shape)
        with _COMPILE_LOCK:
            start = time.perf_counter()
            try:
                output = self.model(prepared)
                # modes with CUDA graphs record on the first calls and capture on a later one:
                # done now, at load, rather than on a live request beside the other slots
                for _ in range(2 if self.clones_outputs else 0):
                    output = self.model(prepared)
                self._synchronize()
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:
                raise ModelLoadError(
                    f"member '{self.member.name}': torch.compile (mode {self.compile_mode!r}) failed "
                    f"for input shape {key}: {type(exc).__name__}: {str(exc)[:300]}; drop its compile "
                    "option (or the 'torch+compile' variant), or install what inductor needs (a C++ "
                    "compiler on the CPU, triton on a GPU)"
                ) from exc
            self.compile_seconds[key] = time.perf_counter() - start
        return output

    def _replay(self, prepared: Any) -> Any:
        torch = self._torch
        key = tuple(prepared.shape)
        if key not in self._graphs:
            static_in = prepared.clone()
            for _ in range(3):  # warm up outside capture: cuBLAS/cuDNN handles, autotuning
                self.model(static_in)
            self._stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                static_out = self.model(static_in)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(prepared)
        graph.replay()
        return static_out

    def _synchronize(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    def _to_numpy(self, output: Any) -> Array:
        if isinstance(output, (tuple, list)):
            output = output[0]
        self._synchronize()
        with self._stream_context():  # the copy goes on the member's stream, not the default one
            result: Array = output.detach().float().cpu().numpy()
        return np.asarray(result)

    def _deactivate(self) -> None:
        self._graphs.clear()
        self.compile_seconds.clear()
        self._model = None
        if self.device.kind == "cuda" and self._torch is not None:
            self._synchronize()
            self._torch.cuda.empty_cache()
        self._stream = None


def _cloned(output: Any) -> Any:
    """``output`` (a tensor, or a tuple/list of them) copied into memory of its own."""
    if isinstance(output, (tuple, list)):
        return type(output)(_cloned(item) for item in output)
    return output.clone() if hasattr(output, "clone") else output


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
