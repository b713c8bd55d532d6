"""MPS handling against fakes of the control daemon: find, start privately, stop, refuse clearly."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from colocate import devices, zoo
from colocate.devices import Device
from colocate.ensemble import Ensemble
from colocate.errors import MPSUnavailableError
from colocate.execution import Executor, MpsDaemon
from colocate.execution.mps import (
    MpsSlot,
    cpu_share,
    format_memory_limit,
    format_thread_percentage,
    mps_worker_env,
)
from colocate.planning.types import Slot

from .helpers import make_plan

GIB = 1 << 30
FAKE_BINARY = "/usr/bin/nvidia-cuda-mps-control"


class FakeControl:
    """Stands in for subprocess.run of nvidia-cuda-mps-control: -d writes the pid file, quit removes it."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        env = kwargs["env"]
        self.calls.append({"argv": list(argv), "env": dict(env), "input": kwargs.get("input")})
        pid_file = Path(env["CUDA_MPS_PIPE_DIRECTORY"]) / "nvidia-cuda-mps-control.pid"
        if argv[1:] == ["-d"]:
            pid_file.write_text("4242\n")
        elif kwargs.get("input") == "quit\n":
            pid_file.unlink(missing_ok=True)
        return subprocess.CompletedProcess(argv, 0, "", "")


@pytest.fixture
def no_daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "no-daemon-here"))


def test_without_a_daemon_and_not_allowed_to_start_says_how(no_daemon: None) -> None:
    with pytest.raises(MPSUnavailableError) as info:
        MpsDaemon(allow_start=False).start()
    text = str(info.value)
    assert "allow_mps_start=True" in text and "nvidia-cuda-mps-control -d" in text


def test_missing_binary_is_named(no_daemon: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(MPSUnavailableError, match=r"'nvidia-cuda-mps-control'.*not on PATH"):
        MpsDaemon(allow_start=True).start()


def test_allowed_start_uses_a_private_directory_and_quits_on_stop(
    no_daemon: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # the serving process sees one GPU
    fake = FakeControl()
    monkeypatch.setattr(
        shutil, "which", lambda name: FAKE_BINARY if name == "nvidia-cuda-mps-control" else None
    )
    monkeypatch.setattr(subprocess, "run", fake)
    daemon = MpsDaemon(allow_start=True).start()
    root = daemon.private_directory
    assert root is not None and daemon.started
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert daemon.pipe_directory is not None and daemon.log_directory is not None
    for folder in (daemon.pipe_directory, daemon.log_directory):
        assert folder.parent == root and stat.S_IMODE(folder.stat().st_mode) == 0o700
    start = fake.calls[0]
    assert start["argv"] == [FAKE_BINARY, "-d"]
    assert start["env"]["CUDA_MPS_PIPE_DIRECTORY"] == str(daemon.pipe_directory)
    assert start["env"]["CUDA_MPS_LOG_DIRECTORY"] == str(daemon.log_directory)
    assert "CUDA_VISIBLE_DEVICES" not in start["env"]  # else its clients, which keep it, fail
    assert len(str(daemon.pipe_directory / "control")) < 87
    assert daemon.client_env() == {
        "CUDA_MPS_PIPE_DIRECTORY": str(daemon.pipe_directory),
        "CUDA_MPS_LOG_DIRECTORY": str(daemon.log_directory),
    }
    pipe = daemon.pipe_directory
    daemon.stop()
    quit_call = fake.calls[1]
    assert quit_call["argv"] == [FAKE_BINARY] and quit_call["input"] == "quit\n"
    assert quit_call["env"]["CUDA_MPS_PIPE_DIRECTORY"] == str(pipe)
    assert not root.exists() and not daemon.started
    daemon.stop()  # idempotent
    assert len(fake.calls) == 2


def test_a_running_daemon_is_used_and_left_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(devices, "mps_daemon_running", lambda pipe_dir=None: True)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not run the control program"))
    with MpsDaemon(pipe_dir=tmp_path) as daemon:
        assert daemon.pipe_directory == tmp_path and not daemon.started
        assert daemon.client_env() == {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}


def test_failed_start_reports_the_output_and_cleans_up(
    no_daemon: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[str] = []

    def failing(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        created.append(kwargs["env"]["CUDA_MPS_PIPE_DIRECTORY"])
        kwargs["stdout"].write("permission denied\n")
        return subprocess.CompletedProcess(argv, 1)

    monkeypatch.setattr(shutil, "which", lambda name: FAKE_BINARY)
    monkeypatch.setattr(subprocess, "run", failing)
    with pytest.raises(MPSUnavailableError, match="exit code 1: permission denied"):
        MpsDaemon(allow_start=True).start()
    assert not Path(created[0]).parent.exists()


def test_worker_environment_of_an_mps_slot() -> None:
    gpu = Device(kind="cuda", name="fake GPU", index=1, memory_total_bytes=80 * GIB)
    slot = Slot("m0", "mps", ("a",), thread_percentage=50.0, memory_limit_bytes=2 * GIB)
    env = mps_worker_env(slot, gpu, {"CUDA_MPS_PIPE_DIRECTORY": "/tmp/x"})
    assert env == {
        "CUDA_MPS_PIPE_DIRECTORY": "/tmp/x",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "1=2048M",
    }
    assert format_thread_percentage(33.3) == "33"
    assert format_thread_percentage(0.2) == "1"
    assert format_memory_limit(0, GIB + 1) == "0=1025M"
    bare = mps_worker_env(Slot("m1", "mps", ("b",)), gpu, {})
    assert bare == {}


def test_mps_slot_on_a_gpu_gets_the_env_before_spawn(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(devices, "mps_daemon_running", lambda pipe_dir=None: True)
    gpu = Device(kind="cuda", name="fake GPU", index=0, memory_total_bytes=80 * GIB)
    slot = Slot("m0", "mps", ("mlp",), thread_percentage=25.0, memory_limit_bytes=GIB)
    daemon = MpsDaemon(pipe_dir=tmp_path).start()
    mps_slot = MpsSlot(slot, (zoo.member("mlp", scale="tiny"),), gpu, daemon=daemon)
    assert mps_slot.spec.env == {
        "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path),
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=1024M",
    }
    assert mps_slot.spec.cpu_affinity is None
    with pytest.raises(MPSUnavailableError, match="needs an MPS daemon"):
        MpsSlot(slot, (zoo.member("mlp", scale="tiny"),), gpu, daemon=None)


def test_executor_with_mps_slots_on_a_gpu_without_mps_refuses_before_starting(no_daemon: None) -> None:
    gpu = Device(kind="cuda", name="fake GPU", index=0, memory_total_bytes=80 * GIB)
    ensemble = Ensemble((zoo.member("mlp", scale="tiny"), zoo.member("vit", scale="tiny")))
    plan = make_plan(
        Slot("m0", "mps", ("mlp",), thread_percentage=50.0),
        Slot("m1", "mps", ("vit",), thread_percentage=50.0),
        device=gpu,
    )
    executor = Executor(plan, ensemble)
    with pytest.raises(MPSUnavailableError, match="allow_mps_start=True"):
        executor.start()
    assert not executor.alive and executor.worker_pids() == {}


def test_cpu_share_of_the_cores() -> None:
    cores = (0, 1, 2, 3)
    half = Slot("a", "mps", ("x",), thread_percentage=50.0)
    assert cpu_share(half, cores, 0) == (0, 1)
    assert cpu_share(half, cores, 2) == (2, 3)
    assert cpu_share(half, cores, 3) == (0, 3)  # wraps around
    assert cpu_share(Slot("b", "mps", ("x",), thread_percentage=1.0), cores) == (0,)  # at least one
    assert cpu_share(Slot("c", "mps", ("x",)), cores) == cores  # no share given: all
    assert len(cpu_share(half, tuple(sorted(os.sched_getaffinity(0))))) >= 1


def test_worker_contexts_name_each_slots_worker_as_nvml_lists_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # whether an mps slot's worker really joined the MPS server (the GPU test checks it on a GPU)
    from colocate.profiling import sampler

    ensemble = Ensemble((zoo.member("mlp", scale="tiny"), zoo.member("resnet", scale="tiny")))
    gpu = Device(kind="cuda", name="a GPU", index=2)
    plan = make_plan(
        Slot("m0", "mps", ("mlp",), thread_percentage=50.0), Slot("p0", "process", ("resnet",)), device=gpu
    )
    executor = Executor(plan, ensemble)
    monkeypatch.setattr(executor, "worker_pids", lambda: {"m0": 200, "p0": 300})
    asked: list[tuple[int, list[int]]] = []

    def listed(device_index: int, pids: Any) -> dict[int, str]:
        asked.append((device_index, list(pids)))
        return {200: "mps-client", 300: "own-context"}

    monkeypatch.setattr(sampler, "gpu_contexts", listed)
    assert executor.worker_contexts() == {"m0": "mps-client", "p0": "own-context"}
    assert asked == [(2, [200, 300])]  # the plan's GPU, every worker
    monkeypatch.setattr(sampler, "gpu_contexts", lambda device_index, pids: None)  # no NVML
    assert executor.worker_contexts() == {"m0": "unknown", "p0": "unknown"}
    on_cpu = Executor(make_plan(Slot("p0", "process", ("mlp", "resnet"))), ensemble)
    assert on_cpu.worker_contexts() == {}


def test_a_gpu_run_notes_how_nvml_listed_the_workers_and_warns_of_an_mps_worker_on_its_own() -> None:
    from colocate.execution.measure import worker_context_notes

    plan = make_plan(
        Slot("m0", "mps", ("a",), thread_percentage=50.0),
        Slot("m1", "mps", ("b",), thread_percentage=50.0),
        Slot("p0", "process", ("c",)),
    )
    assert worker_context_notes(plan, {}) == []  # the CPU, or no workers
    joined = worker_context_notes(plan, {"m0": "mps-client", "m1": "mps-client", "p0": "own-context"})
    assert joined == ["workers on the GPU (NVML): m0 mps-client, m1 mps-client, p0 own-context"]
    alone = worker_context_notes(plan, {"m0": "mps-client", "m1": "own-context", "p0": "own-context"})
    assert len(alone) == 2
    assert alone[1].startswith("mps slot 'm1': its worker has a CUDA context of its own")
    # not listed (a PID namespace) is no evidence either way: no warning
    assert len(worker_context_notes(plan, {"m0": "not-listed", "m1": "not-listed"})) == 1
