"""TensorRTRunner against a fake tensorrt (10- and 11-style) and host-memory buffers.

TensorRT cannot be installed here or on the lent GPU machines (see
gpu-apis.md section 3.1); the GPU test at the end checks only the torch CUDA
buffers the runner uses in production.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
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
    ModelLoadError,
    WorkerFailedError,
)
from colocate.backends import get
from colocate.backends.tensorrt_backend import (
    DEFAULT_WORKSPACE_BYTES,
    TensorRTRunner,
    TorchCudaBuffers,
    engine_cache_dir,
)

from .fakes import (
    FAKE_GPU,
    NumpyBuffers,
    fake_plan,
    heavy_modules_after_import,
    iter_calls,
    make_fake_tensorrt,
    reference_output,
    write_fake_onnx_for_trt,
)

SPEC = InputSpec(shape=(-1, 1, 4, 4))


@pytest.fixture
def trt(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = make_fake_tensorrt("11.4.0")
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


@pytest.fixture
def trt10(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = make_fake_tensorrt("10.16.1")
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    return write_fake_onnx_for_trt(tmp_path / "model.onnx")


def member(source: Path, tmp_path: Path, spec: InputSpec = SPEC, **kwargs: Any) -> Member:
    options = {"engine_cache_dir": str(tmp_path / "engines"), **kwargs.pop("options", {})}
    return Member(name="trt", backend="tensorrt", source=source, input=spec, options=options, **kwargs)


def runner_for(m: Member, trt: types.ModuleType, stream: Any | None = None) -> TensorRTRunner:
    runner = TensorRTRunner(m, FAKE_GPU, stream=stream)
    runner.buffer_factory = lambda device, s: NumpyBuffers(trt.state.memory, device, s)
    return runner


def test_importing_the_module_imports_no_framework() -> None:
    assert heavy_modules_after_import("colocate.backends.tensorrt_backend") == []


def test_registry_resolves_the_runner_class(trt: types.ModuleType) -> None:
    assert get("tensorrt") is TensorRTRunner


def test_builds_from_onnx_and_runs(trt: types.ModuleType, onnx_file: Path, tmp_path: Path) -> None:
    batch = SPEC.example(4)
    with runner_for(member(onnx_file, tmp_path), trt) as runner:
        assert runner.built_engine
        out = runner.infer(batch)
        context = trt.state.contexts[-1]
        assert list(iter_calls(context, "set_input_shape"))[-1] == ("input", (4, 1, 4, 4))
        addresses = dict(iter_calls(context, "set_tensor_address"))
        assert set(addresses) == {"input", "output"}
        assert all(type(a) is int and a != 0 for a in addresses.values())
        assert list(iter_calls(context, "execute_async_v3")) == [NumpyBuffers.DEFAULT_STREAM]
        assert runner.engine_device_memory_bytes == 123_456
    np.testing.assert_allclose(out, reference_output(batch))
    network = trt.state.networks[-1]
    assert network.flags == 0  # TensorRT 11: no creation flags
    config = trt.state.configs[-1]
    assert config.pool_limits == {trt.MemoryPoolType.WORKSPACE: DEFAULT_WORKSPACE_BYTES}
    assert config.flags == set()
    (profile,) = config.profiles
    assert profile.shapes == {"input": ((1, 1, 4, 4), (64, 1, 4, 4), (64, 1, 4, 4))}


def test_workspace_and_max_batch_options(trt: types.ModuleType, onnx_file: Path, tmp_path: Path) -> None:
    m = member(onnx_file, tmp_path, options={"workspace_bytes": 1 << 28, "max_batch_size": 8})
    with runner_for(m, trt) as runner:
        config = trt.state.configs[-1]
        assert config.pool_limits == {trt.MemoryPoolType.WORKSPACE: 1 << 28}
        assert config.profiles[0].shapes["input"] == ((1, 1, 4, 4), (8, 1, 4, 4), (8, 1, 4, 4))
        runner.infer(SPEC.example(8))
        with pytest.raises(InvalidInputError, match="optimisation profile"):
            runner.infer(SPEC.example(9))


def test_pinned_batch_size_gives_a_fixed_profile(
    trt: types.ModuleType, onnx_file: Path, tmp_path: Path
) -> None:
    spec = InputSpec(shape=(2, 1, 4, 4))
    with runner_for(member(onnx_file, tmp_path, spec=spec), trt):
        assert trt.state.configs[-1].profiles[0].shapes["input"] == ((2, 1, 4, 4),) * 3


def test_engine_is_cached_and_reused(trt: types.ModuleType, onnx_file: Path, tmp_path: Path) -> None:
    m = member(onnx_file, tmp_path)
    with runner_for(m, trt) as first:
        cached = first.engine_path
    assert trt.state.builders == 1
    assert cached is not None and cached.parent == tmp_path / "engines"
    assert cached.suffix == ".engine" and len(cached.stem) == 64  # sha256 hex
    with runner_for(m, trt) as second:
        assert not second.built_engine and second.engine_path == cached
        np.testing.assert_allclose(second.infer(SPEC.example(2)), reference_output(SPEC.example(2)))
    assert trt.state.builders == 1  # the builder was not called again


def test_cache_key_changes_with_settings(trt: types.ModuleType, onnx_file: Path, tmp_path: Path) -> None:
    paths = set()
    for options in ({}, {"workspace_bytes": 1 << 20}, {"max_batch_size": 16}):
        with runner_for(member(onnx_file, tmp_path, options=options), trt) as runner:
            paths.add(runner.engine_path)
    with (
        pytest.warns(UserWarning, match="strongly typed"),
        runner_for(member(onnx_file, tmp_path, precision="fp16"), trt) as runner,
    ):
        paths.add(runner.engine_path)
    onnx_file.write_text(onnx_file.read_text() + " ")  # new model bytes
    with runner_for(member(onnx_file, tmp_path), trt) as runner:
        paths.add(runner.engine_path)
    assert len(paths) == 5 and trt.state.builders == 5


def test_damaged_cache_entry_is_rebuilt(trt: types.ModuleType, onnx_file: Path, tmp_path: Path) -> None:
    m = member(onnx_file, tmp_path)
    with runner_for(m, trt) as runner:
        cached = runner.engine_path
    assert cached is not None
    cached.write_bytes(b"truncated")
    with runner_for(m, trt) as runner:
        assert runner.built_engine
    assert trt.state.builders == 2
    assert cached.read_bytes().startswith(b"FAKEPLAN")


def test_default_cache_dir_respects_xdg(
    trt: types.ModuleType, onnx_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert engine_cache_dir({}) == tmp_path / "xdg" / "colocate" / "engines"
    m = Member(name="trt", backend="tensorrt", source=onnx_file, input=SPEC)
    with runner_for(m, trt) as runner:
        assert runner.engine_path is not None
        assert runner.engine_path.parent == tmp_path / "xdg" / "colocate" / "engines"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert engine_cache_dir({}) == Path.home() / ".cache" / "colocate" / "engines"


def test_unwritable_cache_warns_and_still_runs(
    trt: types.ModuleType, onnx_file: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    m = member(onnx_file, tmp_path, options={"engine_cache_dir": str(blocker / "engines")})
    with pytest.warns(RuntimeWarning, match="could not cache"), runner_for(m, trt) as runner:
        np.testing.assert_allclose(runner.infer(SPEC.example(1)), reference_output(SPEC.example(1)))


def test_trt10_sets_fp16_flag_and_explicit_batch(
    trt10: types.ModuleType, onnx_file: Path, tmp_path: Path
) -> None:
    with runner_for(member(onnx_file, tmp_path, precision="fp16"), trt10) as runner:
        assert trt10.state.configs[-1].flags == {trt10.BuilderFlag.FP16}
        assert trt10.state.networks[-1].flags == 1 << int(trt10.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        assert runner.engine_device_memory_bytes == 65_432  # device_memory_size fallback


def test_trt10_fp32_sets_no_flag(trt10: types.ModuleType, onnx_file: Path, tmp_path: Path) -> None:
    with runner_for(member(onnx_file, tmp_path), trt10):
        assert trt10.state.configs[-1].flags == set()


def test_trt11_fp16_sets_no_flag_and_warns(trt: types.ModuleType, onnx_file: Path, tmp_path: Path) -> None:
    assert not hasattr(trt.BuilderFlag, "FP16")
    with (
        pytest.warns(UserWarning, match="strongly typed"),
        runner_for(member(onnx_file, tmp_path, precision="fp16"), trt),
    ):
        assert trt.state.configs[-1].flags == set()


def test_trt11_fp16_onnx_needs_no_warning_and_gets_half_input(
    trt: types.ModuleType, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    onnx = write_fake_onnx_for_trt(tmp_path / "half.onnx", dtype="HALF")
    batch = SPEC.example(2)
    memory = trt.state.memory
    with runner_for(member(onnx, tmp_path, precision="fp16"), trt) as runner:
        staged = runner.prepare(batch)
        assert memory[staged.input_address].dtype == np.float16
        out = runner.to_numpy(runner.run(staged))
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    np.testing.assert_allclose(out, reference_output(batch.astype(np.float16)), rtol=1e-3)


def test_parse_failure_carries_the_parser_error(trt: types.ModuleType, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07 not a model")
    runner = runner_for(member(bad, tmp_path), trt)
    with pytest.raises(ModelLoadError) as info:
        runner.activate()
    message = str(info.value)
    assert "member 'trt'" in message and str(bad) in message
    assert "In node -1 (importModel): INVALID_GRAPH: Failed to parse ONNX model" in message


def test_build_failure(trt: types.ModuleType, onnx_file: Path, tmp_path: Path) -> None:
    trt.state.build_returns_none = True
    with pytest.raises(ModelLoadError, match="failed to build an engine"):
        runner_for(member(onnx_file, tmp_path), trt).activate()
    assert not list(tmp_path.rglob("*.engine"))  # nothing cached


def test_serialized_engine_file_is_loaded_without_building(trt: types.ModuleType, tmp_path: Path) -> None:
    plan = tmp_path / "model.engine"
    plan.write_bytes(fake_plan())
    with runner_for(member(plan, tmp_path), trt) as runner:
        assert not runner.built_engine and runner.engine_path == plan
        np.testing.assert_allclose(runner.infer(SPEC.example(3)), reference_output(SPEC.example(3)))
    assert trt.state.builders == 0


def test_corrupt_engine_file(trt: types.ModuleType, tmp_path: Path) -> None:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="corrupt engine") as info:
        runner_for(member(plan, tmp_path), trt).activate()
    assert str(plan) in str(info.value)


def test_execute_failure_is_worker_failed(trt: types.ModuleType, onnx_file: Path, tmp_path: Path) -> None:
    with runner_for(member(onnx_file, tmp_path), trt) as runner:
        staged = runner.prepare(SPEC.example(2))
        trt.state.execute_result = False
        with pytest.raises(WorkerFailedError, match=r"member 'trt'.*execute_async_v3"):
            runner.run(staged)


def test_given_stream_handle_is_used(trt: types.ModuleType, onnx_file: Path, tmp_path: Path) -> None:
    class TorchLikeStream:
        cuda_stream = 0xC0FFEE

    with runner_for(member(onnx_file, tmp_path), trt, stream=TorchLikeStream()) as runner:
        runner.infer(SPEC.example(1))
        assert list(iter_calls(trt.state.contexts[-1], "execute_async_v3")) == [0xC0FFEE]


def test_default_stream_is_rejected(trt: types.ModuleType, onnx_file: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="default CUDA stream"):
        runner_for(member(onnx_file, tmp_path), trt, stream=0).activate()


def test_buffers_are_reused_per_batch_size(trt: types.ModuleType, onnx_file: Path, tmp_path: Path) -> None:
    runner = runner_for(member(onnx_file, tmp_path), trt)
    with runner:
        for size in (2, 4, 2, 4, 2):
            batch = SPEC.example(size, seed=size)
            np.testing.assert_allclose(runner.infer(batch), reference_output(batch))
        buffers = runner._buffers
        assert isinstance(buffers, NumpyBuffers) and buffers.allocations == 4  # input + output, twice
        # prepare for one size, then another, then run the first: shapes are set at run time
        first = runner.prepare(SPEC.example(2, seed=7))
        runner.prepare(SPEC.example(4, seed=8))
        out = runner.to_numpy(runner.run(first))
        np.testing.assert_allclose(out, reference_output(SPEC.example(2, seed=7)))


def test_out_of_memory_names_member_and_batch(trt: types.ModuleType, onnx_file: Path, tmp_path: Path) -> None:
    with runner_for(member(onnx_file, tmp_path), trt) as runner:
        buffers = runner._buffers
        assert isinstance(buffers, NumpyBuffers)
        buffers.fail_allocations = True
        with pytest.raises(MemberOutOfMemoryError) as info:
            runner.infer(SPEC.example(16))
    assert info.value.member == "trt" and info.value.batch_size == 16


def test_rank_mismatch_is_invalid_input(trt: types.ModuleType, onnx_file: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="rank"):
        runner_for(member(onnx_file, tmp_path, spec=InputSpec(shape=(-1, 16))), trt).activate()


def test_engine_memory_before_activate(trt: types.ModuleType, onnx_file: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="activate"):
        _ = runner_for(member(onnx_file, tmp_path), trt).engine_device_memory_bytes


def test_deactivate_releases_everything(trt: types.ModuleType, onnx_file: Path, tmp_path: Path) -> None:
    runner = runner_for(member(onnx_file, tmp_path), trt)
    runner.activate()
    runner.infer(SPEC.example(2))
    buffers = runner._buffers
    assert isinstance(buffers, NumpyBuffers)
    syncs = buffers.synchronize_calls
    runner.deactivate()
    assert buffers.synchronize_calls == syncs + 1
    assert runner._context is None and runner._engine is None and runner._buffers is None
    assert runner._io == {}


def test_missing_tensorrt(monkeypatch: pytest.MonkeyPatch, onnx_file: Path, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    runner = TensorRTRunner(member(onnx_file, tmp_path), FAKE_GPU)
    with pytest.raises(BackendUnavailableError, match=r"colocate\[tensorrt\]"):
        runner.activate()


def test_cpu_device_is_refused(onnx_file: Path, tmp_path: Path, cpu: Device) -> None:
    with pytest.raises(DeviceError, match="needs a CUDA GPU"):
        TensorRTRunner(member(onnx_file, tmp_path), cpu)


# --- GPU: the production buffers (torch CUDA tensors) ---------------------------------


@pytest.mark.gpu
def test_torch_cuda_buffers_roundtrip(cuda: Device) -> None:
    import torch

    buffers = TorchCudaBuffers(cuda, None)
    assert buffers.stream_handle != 0
    host = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    with buffers.device_scope():
        buf = buffers.empty((2, 3, 4), np.dtype(np.float32))
        assert buf.is_cuda and buf.dtype == torch.float32
        assert buffers.address(buf) == buf.data_ptr() != 0
        buffers.upload(buf, host)
        half = buffers.empty((2, 3, 4), np.dtype(np.float16))
        assert half.dtype == torch.float16
    buffers.synchronize()
    np.testing.assert_array_equal(buffers.download(buf), host)

    stream = torch.cuda.Stream()
    assert TorchCudaBuffers(cuda, stream).stream_handle == stream.cuda_stream
    assert TorchCudaBuffers(cuda, stream.cuda_stream).stream_handle == stream.cuda_stream
