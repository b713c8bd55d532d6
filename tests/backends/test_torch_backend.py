from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from colocate import (
    BackendUnavailableError,
    Device,
    DeviceError,
    InputSpec,
    InvalidInputError,
    Member,
    MemberOutOfMemoryError,
    ModelLoadError,
)
from colocate.backends import available, create_runner, get
from colocate.backends.torch_backend import TorchRunner


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


class OutOfMemoryNet(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x[:, :3]


def raising_factory() -> torch.nn.Module:
    raise RuntimeError("weights missing")


def not_a_module() -> object:
    return 42


def member(source: object = tiny_net, **kwargs: object) -> Member:
    fields: dict[str, object] = {"backend": "torch", "source": source, "input": InputSpec((-1, 4))}
    fields.update(kwargs)
    return Member(name="tiny", **fields)  # type: ignore[arg-type]


def test_registry_resolves_torch() -> None:
    assert get("torch") is TorchRunner
    assert available()["torch"] is True


def test_infer_matches_direct_forward(cpu: Device) -> None:
    batch = InputSpec((-1, 4)).example(5)
    with create_runner(member(), cpu) as runner:
        out = runner.infer(batch)
        assert runner.load_time_s is not None and runner.load_time_s > 0
    expected = tiny_net()(torch.from_numpy(batch)).detach().numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert not runner.is_active


def test_given_module_is_not_mutated(cpu: Device) -> None:
    module = tiny_net()
    with create_runner(member(module, precision="bf16"), cpu) as runner:
        out = runner.infer(InputSpec((-1, 4)).example(2))
    assert next(module.parameters()).dtype == torch.float32
    expected = module(torch.from_numpy(InputSpec((-1, 4)).example(2))).detach().numpy()
    np.testing.assert_allclose(out, expected, rtol=5e-2, atol=5e-2)


def test_torchscript_path(tmp_path: Path, cpu: Device) -> None:
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(tiny_net()), str(path))
    with create_runner(member(str(path)), cpu) as runner:
        out = runner.infer(InputSpec((-1, 4)).example(3))
    assert out.shape == (3, 3)


def test_corrupt_torchscript(tmp_path: Path, cpu: Device) -> None:
    path = tmp_path / "net.pt"
    path.write_bytes(b"not a model")
    runner = create_runner(member(str(path)), cpu)
    with pytest.raises(ModelLoadError, match=r"member 'tiny': .*net.pt.* is not a loadable TorchScript"):
        runner.activate()


@pytest.mark.parametrize(
    ("source", "pattern"),
    [
        (raising_factory, "member 'tiny': its factory .* raised RuntimeError: weights missing"),
        (not_a_module, "member 'tiny': its factory returned int, not a torch.nn.Module"),
    ],
)
def test_bad_factories(source: object, pattern: str, cpu: Device) -> None:
    with pytest.raises(ModelLoadError, match=pattern):
        create_runner(member(source), cpu).activate()


def test_input_checked_before_running(cpu: Device) -> None:
    with (
        create_runner(member(), cpu) as runner,
        pytest.raises(InvalidInputError, match=r"member 'tiny': input shape \(2, 5\)"),
    ):
        runner.infer(np.zeros((2, 5), np.float32))


def test_run_before_activate(cpu: Device) -> None:
    with pytest.raises(InvalidInputError, match="prepare\\(\\) before activate"):
        create_runner(member(), cpu).infer(np.zeros((2, 4), np.float32))


def test_out_of_memory_becomes_member_error(cpu: Device) -> None:
    with create_runner(member(OutOfMemoryNet), cpu) as runner:
        assert runner.infer(np.zeros((2, 4), np.float32)).shape == (2, 3)
        with pytest.raises(MemberOutOfMemoryError, match="out of memory at batch size 4") as info:
            runner.infer(np.zeros((4, 4), np.float32))
    assert info.value.member == "tiny" and info.value.batch_size == 4


def test_unknown_option() -> None:
    with pytest.raises(InvalidInputError, match=r"unknown torch option\(s\) \['graphs'\]"):
        TorchRunner(member(options={"graphs": True}), Device(kind="cpu", name="cpu"))


def test_compiled_member_matches_eager_and_times_each_first_call(cpu: Device) -> None:
    """The compile option on a real torch.compile (inductor with this machine's C++ compiler)."""
    from colocate.variants import device_problem

    problem = device_problem("torch+compile", cpu)
    if problem is not None:
        pytest.skip(problem)
    batch = InputSpec((-1, 4)).example(3)
    with create_runner(member(options={"compile": True}), cpu) as runner:
        assert isinstance(runner, TorchRunner) and runner.compile_mode == "default"
        # dynamo's default of 8 compiled shapes per forward would run the rest eagerly, silently
        assert torch._dynamo.config.recompile_limit >= 64
        first = runner.infer(batch)
        again = runner.infer(batch)
        runner.infer(batch[:2])
        assert set(runner.compile_seconds) == {(3, 4), (2, 4)}
        assert all(seconds > 0 for seconds in runner.compile_seconds.values())
    expected = tiny_net()(torch.from_numpy(batch)).detach().numpy()
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(again, expected, rtol=1e-5, atol=1e-5)
    assert runner.compile_seconds == {}  # deactivated: the next activation compiles (and times) again


class _FailsToCompile(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("InductorError: CppCompileError: C++ compile error")


def test_a_failed_compilation_names_the_member_and_the_way_out(
    monkeypatch: pytest.MonkeyPatch, cpu: Device
) -> None:
    compiled: list[dict[str, object]] = []

    def fake_compile(module: torch.nn.Module, **kwargs: object) -> torch.nn.Module:
        compiled.append(kwargs)
        return _FailsToCompile()

    monkeypatch.setattr(torch, "compile", fake_compile)
    with create_runner(member(options={"compile": "max-autotune"}), cpu) as runner:
        with pytest.raises(
            ModelLoadError,
            match=r"member 'tiny': torch.compile \(mode 'max-autotune'\) failed "
            r"for input shape \(2, 4\): RuntimeError: InductorError.*drop its compile option",
        ):
            runner.infer(np.zeros((2, 4), np.float32))
        assert runner.compile_seconds == {}
    assert compiled == [{"mode": "max-autotune", "dynamic": False}]


def test_out_of_memory_while_compiling_stays_a_memory_error(
    monkeypatch: pytest.MonkeyPatch, cpu: Device
) -> None:
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: OutOfMemoryNet())
    with (
        create_runner(member(options={"compile": True}), cpu) as runner,
        pytest.raises(MemberOutOfMemoryError, match="out of memory at batch size 4"),
    ):
        runner.infer(np.zeros((4, 4), np.float32))


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"compile": "fastest"}, r"compile='fastest'; give true, false or a mode \(default, reduce-overhead"),
        ({"compile": 1}, r"compile=1; give true, false or a mode"),
        ({"compile": True, "cuda_graph": True}, r"compile and cuda_graph exclude each other"),
    ],
)
def test_bad_compile_options(options: dict[str, object], pattern: str) -> None:
    with pytest.raises(InvalidInputError, match=f"member 'tiny': .*{pattern}"):
        TorchRunner(member(options=options), Device(kind="cpu", name="cpu"))


@pytest.mark.parametrize(
    ("mode", "clones"),
    [("reduce-overhead", True), ("max-autotune", True), ("max-autotune-no-cudagraphs", False), (True, False)],
)
def test_compiled_modes_that_replay_cuda_graphs_copy_their_outputs_on_a_gpu(
    mode: object, clones: bool
) -> None:
    # the next compiled call in the thread frees a CUDA-graph output, and a slot runs all its
    # members before it reads their outputs: the first member's would be gone
    gpu = Device(kind="cuda", name="a GPU", index=0)
    assert TorchRunner(member(options={"compile": mode}), gpu).clones_outputs is clones
    assert (
        TorchRunner(member(options={"compile": mode}), Device(kind="cpu", name="cpu")).clones_outputs is False
    )


class _Remembers(torch.nn.Module):
    """Returns the same tensor every call, as a CUDA-graph replay returns its static output."""

    def __init__(self) -> None:
        super().__init__()
        self.static = torch.ones(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.static


def test_a_runner_that_copies_outputs_hands_back_its_own_memory(
    monkeypatch: pytest.MonkeyPatch, cpu: Device
) -> None:
    remembers = _Remembers()
    calls: list[int] = []
    remembers.register_forward_hook(lambda *_: calls.append(1))
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: remembers)
    with create_runner(member(options={"compile": "reduce-overhead"}), cpu) as runner:
        assert isinstance(runner, TorchRunner)
        runner.clones_outputs = True  # as on a GPU
        prepared = runner.prepare(np.zeros((2, 4), np.float32))
        first = runner.run(prepared)
        assert len(calls) == 3  # compiled, then recorded and captured at load, not on a request
        again = runner.run(prepared)
        assert len(calls) == 4
    assert first.data_ptr() != remembers.static.data_ptr() != again.data_ptr()
    remembers.static.fill_(7.0)  # the next replay overwrites the static output
    assert torch.equal(first, torch.ones(2, 3)) and torch.equal(again, torch.ones(2, 3))


def test_executor_cuda_graphs_leave_compiled_members_as_they_are() -> None:
    from colocate.execution.base import with_cuda_graph

    assert with_cuda_graph(member(options={"compile": True})).options == {"compile": True}
    assert with_cuda_graph(member()).options == {"cuda_graph": True}


def test_simulated_device_cannot_run() -> None:
    sim = Device(kind="simulated", name="H100 (simulated)", memory_total_bytes=80 << 30)
    with pytest.raises(DeviceError, match="member 'tiny': device 'H100 \\(simulated\\)' is simulated"):
        create_runner(member(), sim)


def test_stream_on_cpu_rejected(cpu: Device) -> None:
    with pytest.raises(InvalidInputError, match="a CUDA stream was given but the device is cpu"):
        create_runner(member(), cpu, stream=1234)


def test_missing_torch_names_the_extra(monkeypatch: pytest.MonkeyPatch, cpu: Device) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(BackendUnavailableError, match=r"member 'tiny'.*colocate\[torch\]"):
        create_runner(member(), cpu)


def test_undeactivated_runner_warns(cpu: Device) -> None:
    runner = create_runner(member(), cpu).activate()
    with pytest.warns(ResourceWarning, match="never deactivated"):
        runner.__del__()
    runner.deactivate()


# --- GPU --------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_stream_matches_cpu(cpu: Device, cuda: Device) -> None:
    batch = InputSpec((-1, 4)).example(8)
    with create_runner(member(), cpu) as r:
        expected = r.infer(batch)
    stream = torch.cuda.Stream()
    with create_runner(member(), cuda, stream=stream) as r:
        assert r.torch_stream is stream
        out = r.infer(batch)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_gpu_raw_stream_handle_and_cuda_graph(cuda: Device) -> None:
    batch = InputSpec((-1, 4)).example(8)
    stream = torch.cuda.Stream()
    with create_runner(member(), cuda, stream=stream.cuda_stream) as r:
        eager = r.infer(batch)
    with create_runner(member(options={"cuda_graph": True}), cuda, stream=stream) as r:
        first = r.infer(batch)
        second = r.infer(batch * 2)
    np.testing.assert_allclose(first, eager, rtol=1e-5, atol=1e-5)
    with create_runner(member(), cuda) as r:
        np.testing.assert_allclose(second, r.infer(batch * 2), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_cuda_graph_refuses_the_legacy_default_stream(cuda: Device) -> None:
    runner = create_runner(member(options={"cuda_graph": True}), cuda, stream=torch.cuda.default_stream())
    with pytest.raises(InvalidInputError, match="cannot capture on the legacy default stream"):
        runner.activate()


@pytest.mark.gpu
def test_gpu_compiled_members_in_one_thread_keep_their_outputs(cuda: Device) -> None:
    # reduce-overhead replays CUDA graphs: the second member's call would free the first's
    # output, which a slot reads only after running every member
    from colocate.variants import device_problem

    problem = device_problem("torch+compile", cuda)
    if problem is not None:
        pytest.skip(problem)
    batch = InputSpec((-1, 4)).example(8)
    with (
        create_runner(member(options={"compile": "reduce-overhead"}), cuda) as first,
        create_runner(member(options={"compile": "reduce-overhead"}), cuda) as second,
    ):
        a = first.run(first.prepare(batch))
        b = second.run(second.prepare(batch * 2))
        np.testing.assert_allclose(
            first.to_numpy(a), tiny_net()(torch.from_numpy(batch)).detach().numpy(), rtol=1e-3, atol=1e-3
        )
        assert second.to_numpy(b).shape == (8, 3)


@pytest.mark.gpu
def test_gpu_fp16(cuda: Device) -> None:
    batch = InputSpec((-1, 4)).example(8)
    with create_runner(member(precision="fp16"), cuda) as r:
        out = r.infer(batch)
    expected = tiny_net()(torch.from_numpy(batch)).detach().numpy()
    np.testing.assert_allclose(out, expected, rtol=2e-2, atol=2e-2)
