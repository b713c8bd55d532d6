"""OnnxRuntimeRunner: real ONNX Runtime on the CPU; the CUDA-provider path against a fake."""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from colocate import (
    BackendUnavailableError,
    Device,
    InputSpec,
    InvalidInputError,
    Member,
    ModelLoadError,
)
from colocate.backends import create_runner, get
from colocate.backends.onnxruntime_backend import OnnxRuntimeRunner

from .fakes import (
    FAKE_GPU,
    heavy_modules_after_import,
    make_fake_onnxruntime,
    reference_output,
    write_fake_onnx,
)

SPEC = InputSpec(shape=(-1, 1, 4, 4))


@pytest.fixture(scope="module")
def real_ort() -> types.ModuleType:
    """The installed onnxruntime (the fake-based tests below do not need it)."""
    return pytest.importorskip("onnxruntime")


def tiny_model() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory, real_ort: types.ModuleType) -> Path:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")  # the legacy exporter needs it
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's DeprecationWarning
        torch.onnx.export(
            tiny_model(),
            (torch.zeros(2, 1, 4, 4),),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    return path


def member(source: Path, spec: InputSpec = SPEC, **kwargs: Any) -> Member:
    return Member(name="tiny", backend="onnxruntime", source=source, input=spec, **kwargs)


# --- real ONNX Runtime, CPU ------------------------------------------------------------


def test_importing_the_module_imports_no_framework() -> None:
    assert heavy_modules_after_import("colocate.backends.onnxruntime_backend") == []


def test_registry_resolves_the_runner_class() -> None:
    assert get("onnxruntime") is OnnxRuntimeRunner


@pytest.mark.parametrize("batch_size", [1, 4])
def test_cpu_matches_torch(tiny_onnx: Path, cpu: Device, batch_size: int) -> None:
    import torch

    batch = SPEC.example(batch_size, seed=batch_size)
    with torch.no_grad():
        expected = tiny_model()(torch.from_numpy(batch)).numpy()
    with create_runner(member(tiny_onnx), cpu) as runner:
        out = runner.infer(batch)
        assert runner.load_time_s is not None and runner.load_time_s >= 0
    assert out.shape == (batch_size, 10)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_cpu_split_calls_match_infer(tiny_onnx: Path, cpu: Device) -> None:
    batch = SPEC.example(3)
    with OnnxRuntimeRunner(member(tiny_onnx), cpu) as runner:
        staged = runner.prepare(batch)
        out = runner.run(staged)
        runner.synchronize()
        np.testing.assert_array_equal(runner.to_numpy(out), runner.infer(batch))


def test_cpu_thread_option_reaches_the_session(tiny_onnx: Path, cpu: Device) -> None:
    with OnnxRuntimeRunner(member(tiny_onnx, options={"intra_op_num_threads": 2}), cpu) as runner:
        assert runner._session.get_session_options().intra_op_num_threads == 2
        assert runner._session.get_providers() == ["CPUExecutionProvider"]


def test_intra_op_threads_do_not_spin_unless_asked(tiny_onnx: Path, cpu: Device) -> None:
    entry = "session.intra_op.allow_spinning"
    with OnnxRuntimeRunner(member(tiny_onnx), cpu) as runner:
        assert runner._session.get_session_options().get_session_config_entry(entry) == "0"
    with OnnxRuntimeRunner(member(tiny_onnx, options={"allow_spinning": True}), cpu) as runner:
        options = runner._session.get_session_options()
        with pytest.raises(Exception, match="allow_spinning"):  # the entry is not set
            options.get_session_config_entry(entry)


def test_corrupt_model_names_member_and_path(real_ort: types.ModuleType, tmp_path: Path, cpu: Device) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not onnx")
    runner = OnnxRuntimeRunner(member(bad), cpu)
    with pytest.raises(ModelLoadError) as info:
        runner.activate()
    message = str(info.value)
    assert "member 'tiny'" in message and str(bad) in message
    assert "not a valid ONNX model" in message and "re-export" in message
    assert not runner.is_active


def test_model_file_removed_after_member_was_made(
    real_ort: types.ModuleType, tmp_path: Path, cpu: Device
) -> None:
    path = tmp_path / "gone.onnx"
    path.write_bytes(b"x")
    m = member(path)
    path.unlink()
    with pytest.raises(ModelLoadError, match="does not exist"):
        OnnxRuntimeRunner(m, cpu).activate()


def test_rank_mismatch_is_invalid_input(tiny_onnx: Path, cpu: Device) -> None:
    runner = OnnxRuntimeRunner(member(tiny_onnx, spec=InputSpec(shape=(-1, 16))), cpu)
    with pytest.raises(InvalidInputError) as info:
        runner.activate()
    message = str(info.value)
    assert "member 'tiny'" in message and "(B, 16)" in message and "['batch', 1, 4, 4]" in message


def test_fixed_dimension_mismatch_is_invalid_input(tiny_onnx: Path, cpu: Device) -> None:
    runner = OnnxRuntimeRunner(member(tiny_onnx, spec=InputSpec(shape=(-1, 1, 4, 5))), cpu)
    with pytest.raises(InvalidInputError, match="does not match"):
        runner.activate()


def test_input_dtype_of_another_kind_is_invalid_input(tiny_onnx: Path, cpu: Device) -> None:
    runner = OnnxRuntimeRunner(member(tiny_onnx, spec=InputSpec(shape=(-1, 1, 4, 4), dtype="int64")), cpu)
    with pytest.raises(InvalidInputError, match="tensor\\(float\\)"):
        runner.activate()


@pytest.mark.parametrize("threads", [-1, 1.5, "2", True])
def test_bad_thread_option(tiny_onnx: Path, cpu: Device, threads: object) -> None:
    runner = OnnxRuntimeRunner(member(tiny_onnx, options={"intra_op_num_threads": threads}), cpu)
    with pytest.raises(InvalidInputError, match="intra_op_num_threads"):
        runner.activate()


@pytest.mark.filterwarnings("ignore::UserWarning")  # ORT's "provider not available" warning
def test_real_cpu_build_on_a_gpu_device_reports_the_fallback(
    tiny_onnx: Path, real_ort: types.ModuleType
) -> None:
    """The installed CPU-only onnxruntime silently falls back; the runner must refuse."""
    if "CUDAExecutionProvider" in real_ort.get_available_providers():
        pytest.skip("onnxruntime here has the CUDA EP compiled in; the fake covers the fallback")
    runner = OnnxRuntimeRunner(member(tiny_onnx), FAKE_GPU)
    with pytest.raises(BackendUnavailableError) as info:
        runner.activate()
    message = str(info.value)
    assert "fell back to the CPU" in message and "colocate[gpu]" in message and "CUDA 13" in message


def test_missing_onnxruntime(monkeypatch: pytest.MonkeyPatch, tiny_onnx: Path, cpu: Device) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendUnavailableError, match=r"colocate\[onnx\]"):
        OnnxRuntimeRunner(member(tiny_onnx), cpu).activate()


# --- the CUDA-provider path, against the fake ----------------------------------------


@pytest.fixture
def fake_ort(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = make_fake_onnxruntime()
    monkeypatch.setitem(sys.modules, "onnxruntime", module)
    return module


@pytest.fixture
def fake_model(tmp_path: Path) -> Path:
    return write_fake_onnx(tmp_path / "fake.onnx")


class TorchLikeStream:
    """Has ``cuda_stream`` and ``synchronize()``, like torch.cuda.Stream."""

    def __init__(self, handle: int) -> None:
        self.cuda_stream = handle
        self.synchronize_calls = 0

    def synchronize(self) -> None:
        self.synchronize_calls += 1


def test_cuda_providers_and_options_with_a_stream(fake_ort: types.ModuleType, fake_model: Path) -> None:
    with OnnxRuntimeRunner(member(fake_model), FAKE_GPU, stream=0x1234) as runner:
        session = fake_ort.state.sessions[-1]
        assert session.providers == [
            (
                "CUDAExecutionProvider",
                {
                    "device_id": 0,
                    "arena_extend_strategy": "kSameAsRequested",
                    "cudnn_conv_algo_search": "HEURISTIC",
                    "user_compute_stream": str(0x1234),
                },
            ),
            "CPUExecutionProvider",
        ]
        options = session.sess_options
        assert options.intra_op_num_threads == 1
        assert options.log_severity_level == 3
        assert options.config_entries == {"session.intra_op.allow_spinning": "0"}
        assert runner.is_active


def test_cuda_options_from_member(fake_ort: types.ModuleType, fake_model: Path) -> None:
    opts = {"cudnn_conv_algo_search": "EXHAUSTIVE", "gpu_mem_limit": 2 << 30, "intra_op_num_threads": 2}
    with OnnxRuntimeRunner(member(fake_model, options=opts), FAKE_GPU):
        session = fake_ort.state.sessions[-1]
        _, cuda = session.providers[0]
        assert cuda == {
            "device_id": 0,
            "arena_extend_strategy": "kSameAsRequested",
            "cudnn_conv_algo_search": "EXHAUSTIVE",
            "gpu_mem_limit": 2 << 30,
        }
        assert "user_compute_stream" not in cuda
        assert session.sess_options.intra_op_num_threads == 2


def test_cuda_device_index_is_the_device_id(fake_ort: types.ModuleType, fake_model: Path) -> None:
    gpu1 = Device(kind="cuda", name="Fake GPU", index=1, memory_total_bytes=80 * 2**30)
    with OnnxRuntimeRunner(member(fake_model), gpu1) as runner:
        assert fake_ort.state.sessions[-1].providers[0][1]["device_id"] == 1
        staged = runner.prepare(SPEC.example(2))
        assert staged.binding.outputs == {"output": ("cuda", 1)}


def test_cuda_run_with_user_stream_is_async_and_syncs_the_stream(
    fake_ort: types.ModuleType, fake_model: Path
) -> None:
    stream = TorchLikeStream(0xABC)
    batch = SPEC.example(4)
    with OnnxRuntimeRunner(member(fake_model), FAKE_GPU, stream=stream) as runner:
        session = fake_ort.state.sessions[-1]
        assert session.providers[0][1]["user_compute_stream"] == str(0xABC)
        staged = runner.prepare(batch)
        assert set(staged.binding.inputs) == {"input"}
        assert staged.binding.outputs == {"output": ("cuda", 0)}
        out = runner.run(staged)
        run_options = session.runs[-1]
        assert run_options.entries == {"disable_synchronize_execution_providers": "1"}
        before = stream.synchronize_calls
        runner.synchronize()
        assert stream.synchronize_calls == before + 1
        result = runner.to_numpy(out)
        assert stream.synchronize_calls == before + 2  # to_numpy waits for the stream first
        assert staged.binding.synchronize_outputs_calls == 0  # not the device-wide sync
    np.testing.assert_allclose(result, reference_output(batch))


def test_cuda_raw_handle_syncs_through_the_binding(fake_ort: types.ModuleType, fake_model: Path) -> None:
    batch = SPEC.example(2)
    with OnnxRuntimeRunner(member(fake_model), FAKE_GPU, stream=0x77) as runner:
        staged = runner.prepare(batch)
        out = runner.run(staged)
        runner.synchronize()
        assert staged.binding.synchronize_outputs_calls == 1
        np.testing.assert_allclose(runner.to_numpy(out), reference_output(batch))


def test_cuda_without_stream_runs_synchronously(fake_ort: types.ModuleType, fake_model: Path) -> None:
    batch = SPEC.example(3)
    with OnnxRuntimeRunner(member(fake_model), FAKE_GPU) as runner:
        out = runner.infer(batch)
        session = fake_ort.state.sessions[-1]
        assert session.runs == [None]  # no run options: ORT synchronises at the end of the run
    np.testing.assert_allclose(out, reference_output(batch))


@pytest.mark.parametrize("stream", [0, TorchLikeStream(0)])
def test_cuda_default_stream_is_rejected(
    fake_ort: types.ModuleType, fake_model: Path, stream: object
) -> None:
    runner = OnnxRuntimeRunner(member(fake_model), FAKE_GPU, stream=stream)
    with pytest.raises(InvalidInputError, match="default CUDA stream"):
        runner.activate()
    assert fake_ort.state.sessions == []


def test_cuda_fallback_to_cpu_is_detected(fake_ort: types.ModuleType, fake_model: Path) -> None:
    fake_ort.state.cuda_loads = False
    runner = OnnxRuntimeRunner(member(fake_model), FAKE_GPU, stream=0x1234)
    with pytest.raises(BackendUnavailableError) as info:
        runner.activate()
    message = str(info.value)
    assert "member 'tiny'" in message and "fell back to the CPU" in message
    assert "onnxruntime-gpu" in message and "colocate[gpu]" in message and "cuDNN 9" in message
    assert not runner.is_active


def test_fp16_model_input_gets_a_float16_batch(fake_ort: types.ModuleType, fake_model: Path) -> None:
    fake_ort.state.input_type = "tensor(float16)"
    batch = SPEC.example(2)
    m = member(fake_model, precision="fp16")
    with OnnxRuntimeRunner(m, FAKE_GPU, stream=0x1234) as runner:
        staged = runner.prepare(batch)
        assert staged.binding.inputs["input"].dtype == np.float16
        out = runner.to_numpy(runner.run(staged))
    np.testing.assert_allclose(out, reference_output(batch.astype(np.float16)), rtol=1e-3)


def test_fake_corrupt_model_on_gpu(fake_ort: types.ModuleType, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="INVALID_PROTOBUF"):
        OnnxRuntimeRunner(member(bad), FAKE_GPU).activate()


def test_bad_gpu_mem_limit(fake_ort: types.ModuleType, fake_model: Path) -> None:
    runner = OnnxRuntimeRunner(member(fake_model, options={"gpu_mem_limit": -5}), FAKE_GPU)
    with pytest.raises(InvalidInputError, match="gpu_mem_limit"):
        runner.activate()


def test_deactivate_releases_the_session(fake_ort: types.ModuleType, fake_model: Path) -> None:
    runner = OnnxRuntimeRunner(member(fake_model), FAKE_GPU, stream=0x1234)
    runner.activate()
    runner.infer(SPEC.example(1))
    runner.deactivate()
    assert runner._session is None and runner._last_gpu_batch is None and runner._run_options is None
    with pytest.raises(InvalidInputError, match="before activate"):
        runner.prepare(SPEC.example(1))
