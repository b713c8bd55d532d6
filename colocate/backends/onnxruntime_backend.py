"""The ``onnxruntime`` backend: an ``.onnx`` file run by ONNX Runtime on the CPU or a CUDA GPU.

On the CPU a batch goes straight to ``InferenceSession.run``. On a GPU the
session uses the CUDA execution provider: :meth:`prepare` binds the batch with
an ``IOBinding`` (ONNX Runtime copies it to the GPU when it is bound), the
output stays on the GPU until :meth:`to_numpy`.

Given a CUDA stream, the session runs its kernels on it (provider option
``user_compute_stream``) and ``run`` returns without waiting for the GPU (run
option ``disable_synchronize_execution_providers``); :meth:`synchronize` then
waits for that stream. Without a stream, ONNX Runtime uses its own stream and
each ``run`` waits for the GPU before it returns.

Backend options (``Member.options``):

- ``intra_op_num_threads`` (int): threads inside one operator; default 0
  (ONNX Runtime's choice) on the CPU, 1 on a GPU, so that several sessions do
  not oversubscribe the host.
- ``cudnn_conv_algo_search`` (str): ``"HEURISTIC"`` (default), ``"EXHAUSTIVE"``
  or ``"DEFAULT"``.
- ``gpu_mem_limit`` (int, bytes): cap of the CUDA provider's memory arena
  (cuDNN workspaces and the CUDA context come on top).
- ``allow_spinning`` (bool, default False): let idle intra-op threads spin for work.
  Off by default, on the CPU too: spinning threads take the cores that the executor's
  other threads (other slots, the front) need.

The ONNX model runs in the precision it was exported in. When the model's
input is ``tensor(float16)`` (an fp16 export) and the member's input spec is
another float type, batches are cast to float16 before they are fed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from colocate._optional import optional_import
from colocate.backends.base import MemberRunner, stream_handle
from colocate.ensemble import Array
from colocate.errors import BackendUnavailableError, InvalidInputError, ModelLoadError

#: ONNX tensor types -> numpy dtype names (the ones a numpy batch can feed)
_ONNX_TO_NUMPY: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}

#: ONNX Runtime exception class names that mean "this file is not a usable ONNX model"
_INVALID_MODEL_ERRORS = frozenset({"InvalidProtobuf", "InvalidGraph", "NoModel"})

_CUDA_EP = "CUDAExecutionProvider"
_CPU_EP = "CPUExecutionProvider"


@dataclass
class _GpuBatch:
    """A batch bound for one GPU run: its IOBinding (and the host array it was bound from)."""

    binding: Any  # onnxruntime.IOBinding
    host: Array  # kept alive while the binding exists


class OnnxRuntimeRunner(MemberRunner):
    """Runs an ONNX model with ONNX Runtime, on the CPU or on a CUDA GPU (CUDA EP)."""

    backend_name = "onnxruntime"
    supports_cpu = True
    supports_cuda = True

    _session: Any = None  # onnxruntime.InferenceSession while active
    _run_options: Any = None  # onnxruntime.RunOptions (GPU with a user stream), else None
    _input_name: str = ""
    _output_name: str = ""
    _feed_dtype: np.dtype[Any] | None = None  # cast batches to this dtype before feeding
    _user_stream: bool = False  # the session runs on the stream given to the runner
    _last_gpu_batch: _GpuBatch | None = None  # the binding of the last GPU run

    # --- hooks ------------------------------------------------------------------

    def _activate(self) -> None:
        member = self.member
        ort = optional_import("onnxruntime", purpose=f"backend 'onnxruntime' of member '{member.name}'")
        path = self._model_file("check the path (export ONNX files with colocate.zoo.export_onnx)")
        on_gpu = self.device.kind == "cuda"
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._intra_op_threads(default=1 if on_gpu else 0)
        options.log_severity_level = 3  # silences the CPU-fallback warning: checked below instead
        if not bool(member.options.get("allow_spinning", False)):
            # idle intra-op threads spinning for work take the cores the serving process's other
            # threads need: five tiny ORT members in one stream slot on 2 cores ran at 159 samples/s
            # with spinning, 640 without (2026-11-27)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = self._providers()
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # ONNX Runtime raises its own classes, all plain Exceptions
            kind = type(exc).__name__
            if kind in _INVALID_MODEL_ERRORS:
                raise ModelLoadError(
                    f"member '{member.name}': model file '{path}' is not a valid ONNX model "
                    f"({exc}); re-export it"
                ) from exc
            if kind == "NotImplemented":
                raise ModelLoadError(
                    f"member '{member.name}': ONNX Runtime {ort.__version__} cannot run model file "
                    f"'{path}' ({exc}); it uses an operator or opset this version lacks: upgrade "
                    "onnxruntime or re-export with a lower opset"
                ) from exc
            raise ModelLoadError(
                f"member '{member.name}': ONNX Runtime could not load model file '{path}' ({kind}: {exc})"
            ) from exc

        if on_gpu:
            active = list(session.get_providers())
            if not active or active[0] != _CUDA_EP:
                del session
                raise BackendUnavailableError(
                    f"member '{member.name}': ONNX Runtime fell back to the CPU (session providers "
                    f"{active}, built-in providers {list(ort.get_available_providers())}): its CUDA "
                    "execution provider did not load. Install onnxruntime-gpu built for CUDA 13 with "
                    "cuDNN 9 (pip install 'colocate[gpu]'; uninstall the CPU-only 'onnxruntime' "
                    "package first, both install the same module)"
                )
        self._check_io(session)
        self._session = session
        if self._user_stream:
            run_options = ort.RunOptions()
            run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
            self._run_options = run_options
        else:
            self._run_options = None

    def _prepare(self, batch: Array) -> Any:
        if self._feed_dtype is not None:
            batch = batch.astype(self._feed_dtype)
        if self.device.kind != "cuda":
            return batch
        binding = self._session.io_binding()
        binding.bind_cpu_input(self._input_name, batch)  # copied to the GPU here
        binding.bind_output(self._output_name, "cuda", self.device.index)
        return _GpuBatch(binding=binding, host=batch)

    def _run(self, prepared: Any) -> Any:
        if isinstance(prepared, _GpuBatch):
            self._session.run_with_iobinding(prepared.binding, self._run_options)
            self._last_gpu_batch = prepared
            return prepared
        return self._session.run([self._output_name], {self._input_name: prepared})[0]

    def _to_numpy(self, output: Any) -> Array:
        if isinstance(output, _GpuBatch):
            # copy_outputs_to_cpu copies outside the session's stream: wait for it first
            if self._user_stream:
                self._wait_for_stream(output)
            return np.asarray(output.binding.copy_outputs_to_cpu()[0])
        return np.asarray(output)

    def _synchronize(self) -> None:
        if self._user_stream and self._last_gpu_batch is not None:
            self._wait_for_stream(self._last_gpu_batch)

    def _deactivate(self) -> None:
        self._last_gpu_batch = None
        self._run_options = None
        self._session = None

    # --- helpers ------------------------------------------------------------------

    def _intra_op_threads(self, *, default: int) -> int:
        value = self.member.options.get("intra_op_num_threads", default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInputError(
                f"member '{self.member.name}': option intra_op_num_threads must be an int >= 0 "
                f"(0 = ONNX Runtime's default), got {value!r}"
            )
        return value

    def _providers(self) -> list[Any]:
        """The provider list for the session: CPU only, or the CUDA EP with its options."""
        if self.device.kind != "cuda":
            return [_CPU_EP]
        opts = self.member.options
        cuda: dict[str, Any] = {
            "device_id": self.device.index,
            "arena_extend_strategy": "kSameAsRequested",
            "cudnn_conv_algo_search": str(opts.get("cudnn_conv_algo_search", "HEURISTIC")),
        }
        self._user_stream = False
        if self.stream is not None:
            handle = stream_handle(self.stream)
            if handle == 0:
                raise InvalidInputError(
                    f"member '{self.member.name}': the default CUDA stream (handle 0) was given; "
                    "ONNX Runtime ignores it as a user compute stream. Pass a non-default stream "
                    "(e.g. torch.cuda.Stream()) or no stream"
                )
            cuda["user_compute_stream"] = str(handle)
            self._user_stream = True
        if "gpu_mem_limit" in opts:
            limit = opts["gpu_mem_limit"]
            if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
                raise InvalidInputError(
                    f"member '{self.member.name}': option gpu_mem_limit must be a positive number "
                    f"of bytes, got {limit!r}"
                )
            cuda["gpu_mem_limit"] = limit
        return [(_CUDA_EP, cuda), _CPU_EP]

    def _check_io(self, session: Any) -> None:
        """Pick the input and output names; check rank, fixed dims and dtype against the spec."""
        name = self.member.name
        spec = self.member.input
        inputs = list(session.get_inputs())
        outputs = list(session.get_outputs())
        if not outputs:
            raise ModelLoadError(f"member '{name}': the ONNX model has no outputs")
        if len(inputs) != 1:
            raise InvalidInputError(
                f"member '{name}': the ONNX model has {len(inputs)} inputs "
                f"{[i.name for i in inputs]}; colocate feeds exactly one input tensor"
            )
        model_input = inputs[0]  # fed by its own name, whatever InputSpec.name says
        model_shape = list(model_input.shape)
        shown_spec = "(" + ", ".join("B" if d == -1 else str(d) for d in spec.shape) + ")"
        mismatch = len(model_shape) != len(spec.shape) or any(
            isinstance(m, int) and m > 0 and s > 0 and m != s
            for m, s in zip(model_shape[1:], spec.shape[1:], strict=False)
        )
        if mismatch:
            raise InvalidInputError(
                f"member '{name}': InputSpec.shape {shown_spec} does not match the ONNX model's "
                f"input '{model_input.name}' of shape {model_shape}; fix InputSpec.shape"
            )
        self._input_name = str(model_input.name)
        self._output_name = str(outputs[0].name)

        self._feed_dtype = None
        model_dtype_name = _ONNX_TO_NUMPY.get(str(model_input.type))
        if model_dtype_name is None:
            if str(model_input.type) == "tensor(bfloat16)":
                raise InvalidInputError(
                    f"member '{name}': the ONNX model's input is tensor(bfloat16), which a numpy "
                    "batch cannot feed; export the model with a float32 or float16 input"
                )
            return  # an unusual type: let ONNX Runtime judge the batch
        model_dtype = np.dtype(model_dtype_name)
        spec_dtype = np.dtype(spec.dtype)
        if model_dtype == spec_dtype:
            return
        if np.issubdtype(model_dtype, np.floating) and np.issubdtype(spec_dtype, np.floating):
            self._feed_dtype = model_dtype  # e.g. an fp16 export fed from float32 batches
            return
        raise InvalidInputError(
            f"member '{name}': the ONNX model's input '{model_input.name}' is {model_input.type} "
            f"but InputSpec.dtype is {spec.dtype}; set InputSpec.dtype='{model_dtype_name}'"
        )

    def _wait_for_stream(self, batch: _GpuBatch) -> None:
        """Wait for the user stream: its own ``synchronize()`` when it has one.

        ``IOBinding.synchronize_outputs()`` is the fallback for a raw handle: it
        waits for the whole device (``cudaDeviceSynchronize``), other members' work included.
        """
        synchronize = getattr(self.stream, "synchronize", None)
        if callable(synchronize):
            synchronize()
        else:
            batch.binding.synchronize_outputs()


__all__ = ["OnnxRuntimeRunner"]
