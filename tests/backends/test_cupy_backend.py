"""CupyRunner against a fake cupy; the real thing on a GPU (skips without one)."""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any

import numpy as np
import pytest

from colocate import (
    BackendUnavailableError,
    Device,
    DeviceError,
    InputSpec,
    InvalidInputError,
    Member,
    MemberOutOfMemoryError,
)
from colocate.backends import get
from colocate.backends.cupy_backend import CupyRunner

from .fakes import FAKE_GPU, FakeCupyArray, heavy_modules_after_import, make_fake_cupy, reference_output

SPEC = InputSpec(shape=(-1, 1, 4, 4))


def first_ten_doubled(x: Any) -> Any:
    return x.reshape(x.shape[0], -1)[:, :10] * 2


def member(source: Any = first_ten_doubled, **kwargs: Any) -> Member:
    return Member(name="cp", backend="cupy", source=source, input=SPEC, **kwargs)


@pytest.fixture
def cupy(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = make_fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", module)
    return module


def test_importing_the_module_imports_no_framework() -> None:
    assert heavy_modules_after_import("colocate.backends.cupy_backend") == []


def test_registry_resolves_the_runner_class(cupy: types.ModuleType) -> None:
    assert get("cupy") is CupyRunner


def test_own_stream_is_non_blocking_and_carries_all_work(cupy: types.ModuleType) -> None:
    seen: list[Any] = []

    def model(x: Any) -> Any:
        seen.append((type(x), cupy.current_stream()))
        return first_ten_doubled(x)

    batch = SPEC.example(4)
    with CupyRunner(member(model), FAKE_GPU) as runner:
        (stream,) = cupy.state.streams
        assert isinstance(stream, cupy.cuda.Stream) and stream.non_blocking is True
        out = runner.infer(batch)
        assert seen == [(FakeCupyArray, stream)]  # the callable ran on a device array, in the stream
        assert cupy.state.asarray_streams == [stream]
        assert cupy.state.asnumpy_streams == [stream]
        assert stream.synchronize_calls >= 1
        assert cupy.state.devices_used and set(cupy.state.devices_used) == {0}
    assert type(out) is np.ndarray
    np.testing.assert_allclose(out, reference_output(batch))


@pytest.mark.parametrize("given", [0x4242, types.SimpleNamespace(cuda_stream=0x4242)])
def test_int_or_torch_stream_becomes_an_external_stream(cupy: types.ModuleType, given: Any) -> None:
    with CupyRunner(member(), FAKE_GPU, stream=given) as runner:
        (stream,) = cupy.state.streams
        assert isinstance(stream, cupy.cuda.ExternalStream)
        assert stream.ptr == 0x4242 and stream.device_id == 0
        runner.infer(SPEC.example(2))
        assert cupy.state.asarray_streams == [stream]


def test_cupy_stream_is_used_as_is(cupy: types.ModuleType) -> None:
    mine = cupy.cuda.Stream(non_blocking=True)
    with CupyRunner(member(), FAKE_GPU, stream=mine) as runner:
        runner.infer(SPEC.example(1))
        assert cupy.state.streams == [mine]  # no new stream
        assert cupy.state.asarray_streams == [mine]


def test_split_calls_and_synchronize(cupy: types.ModuleType) -> None:
    batch = SPEC.example(3)
    with CupyRunner(member(), FAKE_GPU) as runner:
        (stream,) = cupy.state.streams
        staged = runner.prepare(batch)
        assert isinstance(staged, FakeCupyArray)
        out = runner.run(staged)
        before = stream.synchronize_calls
        runner.synchronize()
        assert stream.synchronize_calls == before + 1
        np.testing.assert_allclose(runner.to_numpy(out), reference_output(batch))


def test_fp16_casts_the_batch(cupy: types.ModuleType) -> None:
    dtypes: list[Any] = []

    def model(x: Any) -> Any:
        dtypes.append(x.dtype)
        return first_ten_doubled(x)

    with CupyRunner(member(model, precision="fp16"), FAKE_GPU) as runner:
        out = runner.infer(SPEC.example(2))
    assert dtypes == [np.float16] and out.dtype == np.float16


def test_bf16_is_refused(cupy: types.ModuleType) -> None:
    with pytest.raises(InvalidInputError, match="bfloat16"):
        CupyRunner(member(precision="bf16"), FAKE_GPU).activate()


def test_device_index_is_selected(cupy: types.ModuleType) -> None:
    gpu2 = Device(kind="cuda", name="Fake GPU", index=2, memory_total_bytes=80 * 2**30)
    with CupyRunner(member(), gpu2) as runner:
        runner.infer(SPEC.example(1))
    assert set(cupy.state.devices_used) == {2}


def test_out_of_memory_names_member_and_batch(cupy: types.ModuleType) -> None:
    def greedy(x: Any) -> Any:
        raise cupy.cuda.memory.OutOfMemoryError("Out of memory allocating 4,294,967,296 bytes")

    with CupyRunner(member(greedy), FAKE_GPU) as runner, pytest.raises(MemberOutOfMemoryError) as info:
        runner.infer(SPEC.example(8))
    assert info.value.member == "cp" and info.value.batch_size == 8


def test_pool_used_bytes(cupy: types.ModuleType) -> None:
    cupy.state.pool_used = 4096
    runner = CupyRunner(member(), FAKE_GPU)
    assert runner.pool_used_bytes() == 4096
    with runner:
        assert runner.pool_used_bytes() == 4096


def test_deactivate_syncs_and_drops_the_stream(cupy: types.ModuleType) -> None:
    runner = CupyRunner(member(), FAKE_GPU)
    runner.activate()
    (stream,) = cupy.state.streams
    before = stream.synchronize_calls
    runner.deactivate()
    assert stream.synchronize_calls == before + 1 and runner._cuda_stream is None


def test_missing_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(BackendUnavailableError, match=r"colocate\[gpu\]"):
        CupyRunner(member(), FAKE_GPU).activate()


def test_cpu_device_is_refused(cpu: Device) -> None:
    with pytest.raises(DeviceError, match="needs a CUDA GPU"):
        CupyRunner(member(), cpu)


# --- real GPU -------------------------------------------------------------------------


def _real_cupy_usable() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:
        return False


class MatMul:
    """f(x) = x.reshape(B, -1) @ W, with W uploaded on first use (picklable, no GPU at import)."""

    def __init__(self, weights: np.ndarray) -> None:
        self.weights = weights
        self._device_weights: Any = None

    def __call__(self, x: Any) -> Any:
        import cupy

        if self._device_weights is None:
            self._device_weights = cupy.asarray(self.weights)
        return x.reshape(x.shape[0], -1) @ self._device_weights


@pytest.mark.gpu
@pytest.mark.skipif(not _real_cupy_usable(), reason="needs CuPy with a usable CUDA device (cupy-cuda13x)")
def test_real_gpu_matmul_on_a_torch_stream(cuda: Device) -> None:
    import torch

    rng = np.random.default_rng(0)
    weights = rng.standard_normal((16, 10)).astype(np.float32)
    batch = SPEC.example(32, seed=1)
    expected = batch.reshape(32, -1) @ weights
    stream = torch.cuda.Stream(device=cuda.index)
    with CupyRunner(member(MatMul(weights)), cuda, stream=stream.cuda_stream) as runner:
        assert runner._cuda_stream.ptr == stream.cuda_stream
        out = runner.infer(batch)
        staged = runner.prepare(batch)
        result = runner.run(staged)
        runner.synchronize()
        again = runner.to_numpy(result)
        assert runner.pool_used_bytes() > 0
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(again, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not _real_cupy_usable(), reason="needs CuPy with a usable CUDA device (cupy-cuda13x)")
def test_real_gpu_own_stream(cuda: Device) -> None:
    weights = np.eye(16, 10, dtype=np.float32)
    batch = SPEC.example(4)
    with CupyRunner(member(MatMul(weights)), cuda) as runner:
        assert runner._cuda_stream.is_non_blocking
        out = runner.infer(batch)
    np.testing.assert_allclose(out, batch.reshape(4, -1)[:, :10], rtol=1e-6)
