"""``mps`` slots: worker processes under NVIDIA MPS with a share of the SMs and a memory cap.

On a GPU an :class:`MpsSlot` is a :class:`~colocate.execution.processes.ProcessSlot`
whose worker starts with the MPS client variables in its environment, set before
it initialises CUDA (gpu-apis.md section 6.2):

- ``CUDA_MPS_PIPE_DIRECTORY`` (and ``CUDA_MPS_LOG_DIRECTORY``): the daemon to join;
- ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``: the slot's ``thread_percentage``, as a whole
  number (1..100); a limit on the SMs the client may use, not a reservation;
- ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT``: the slot's ``memory_limit_bytes`` as
  ``"<ordinal>=<MiB>M"`` (rounded up to whole MiB), e.g. ``"0=2048M"``: allocations
  beyond it fail with out-of-memory, in every library of the worker.

An :class:`MpsDaemon` finds a running control daemon (``devices.mps_daemon_running``),
or, only when allowed (``allow_start=True``), starts one of its own in a private
directory (mode 0700, a ``pipe`` and a ``log`` folder inside) with
``nvidia-cuda-mps-control -d`` and stops it (``quit``) on close. Only processes
given that pipe directory become its clients: the serving process and the plain
``process`` slots are not, unless the user's own environment points at it.

On the CPU there is no MPS: an ``mps`` slot is a worker process pinned
(``os.sched_setaffinity``) to ``round(thread_percentage % x usable cores)`` cores,
at least one, with torch's thread count set to that many, the CPU analogue of
an SM share. Consecutive mps slots get consecutive, disjoint cores where there
are enough.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from colocate import devices
from colocate.errors import InvalidInputError, MPSUnavailableError
from colocate.execution.processes import OnWorkerDeath, ProcessSlot

if TYPE_CHECKING:
    from colocate.devices import Device
    from colocate.ensemble import Member
    from colocate.planning.types import Slot

MPS_CONTROL = "nvidia-cuda-mps-control"
_MIB = 1 << 20
_MAX_PIPE_PATH = 80  # the daemon fails to start with pipe/log paths longer than about 87 characters

HOW_TO_ENABLE = (
    "start a daemon yourself (`nvidia-cuda-mps-control -d`, as the user who runs colocate), "
    "or pass allow_mps_start=True (command line: --allow-mps-start) to let colocate start a private "
    "one and stop it afterwards; or choose a plan without 'mps' slots"
)


def format_thread_percentage(percentage: float) -> str:
    """``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` for ``percentage``: a whole number in 1..100."""
    if not 0 < percentage <= 100:
        raise InvalidInputError(f"thread percentage {percentage} is not in (0, 100]")
    return str(min(100, max(1, round(percentage))))


def format_memory_limit(device_index: int, limit_bytes: int) -> str:
    """``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` for one device: ``"<ordinal>=<MiB>M"``, MiB rounded up."""
    if limit_bytes <= 0:
        raise InvalidInputError(f"memory limit must be positive, got {limit_bytes} bytes")
    return f"{device_index}={math.ceil(limit_bytes / _MIB)}M"


def mps_worker_env(slot: Slot, device: Device, daemon_env: Mapping[str, str]) -> dict[str, str]:
    """The environment of an mps slot's worker on a GPU: the daemon's pipe plus the slot's limits."""
    env = dict(daemon_env)
    if slot.thread_percentage is not None:
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = format_thread_percentage(slot.thread_percentage)
    if slot.memory_limit_bytes is not None:
        env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = format_memory_limit(device.index, slot.memory_limit_bytes)
    return env


def cpu_share(slot: Slot, cores: tuple[int, ...], offset: int = 0) -> tuple[int, ...]:
    """The cores an mps slot gets on the CPU: ``round(thread_percentage % x len(cores))``, at least 1.

    Taken from ``cores`` starting at ``offset`` (wrapping around), so consecutive
    slots given running offsets get disjoint cores while there are enough.
    """
    if not cores:
        raise InvalidInputError("no usable CPU cores to pin an mps slot to")
    share = 100.0 if slot.thread_percentage is None else slot.thread_percentage
    count = min(len(cores), max(1, round(share / 100.0 * len(cores))))
    return tuple(sorted(cores[(offset + i) % len(cores)] for i in range(count)))


def usable_cores() -> tuple[int, ...]:
    """The cores this process may run on, in order."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


class MpsDaemon:
    """Finds, or starts and later stops, the NVIDIA MPS control daemon that mps slots join.

    Args:
        allow_start: start a private daemon when none runs (and stop it in :meth:`stop`).
        pipe_dir: the pipe directory of an existing daemon to look for; default
            ``$CUDA_MPS_PIPE_DIRECTORY`` or ``/tmp/nvidia-mps``.
        binary: the control program's name or path.
        timeout_s: how long to wait for the daemon to come up or go away.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        *,
        allow_start: bool = False,
        pipe_dir: str | Path | None = None,
        binary: str = MPS_CONTROL,
        timeout_s: float = 10.0,
    ) -> None:
        self.allow_start = allow_start
        self.binary = binary
        self.timeout_s = timeout_s
        self._requested_pipe_dir = str(pipe_dir) if pipe_dir is not None else None
        #: the pipe directory of the daemon in use (after :meth:`start`)
        self.pipe_directory: Path | None = None
        #: the log directory of a daemon this object started, else None
        self.log_directory: Path | None = None
        #: whether this object started the daemon (and so stops it)
        self.started = False
        self._private_root: Path | None = None
        self._binary_path: str | None = None

    def __enter__(self) -> MpsDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> MpsDaemon:
        """Use the running daemon, or start a private one when allowed.

        Raises:
            MPSUnavailableError: no daemon runs and starting one is not allowed; the
                control program is not installed; or it failed to start (the message
                says how to enable MPS).
        """
        if self.pipe_directory is not None:
            return self
        existing = devices.mps_pipe_directory(self._requested_pipe_dir)
        if devices.mps_daemon_running(str(existing)):
            self.pipe_directory = existing
            return self
        if not self.allow_start:
            raise MPSUnavailableError(
                f"the plan has 'mps' slots but no NVIDIA MPS control daemon is running "
                f"(looked in {existing}); {HOW_TO_ENABLE}"
            )
        binary = shutil.which(self.binary)
        if binary is None:
            raise MPSUnavailableError(
                f"the plan has 'mps' slots but '{self.binary}' (the MPS control daemon, part of the NVIDIA "
                "driver's utilities) is not on PATH, so colocate cannot start MPS; install the driver's "
                "utilities (e.g. the nvidia-utils package) or choose a plan without 'mps' slots"
            )
        self._binary_path = binary
        root = Path(tempfile.mkdtemp(prefix="colocate-mps-", dir=_short_temp_dir()))  # mode 0700
        pipe, log = root / "pipe", root / "log"
        pipe.mkdir(mode=0o700)
        log.mkdir(mode=0o700)
        self._private_root = root
        env = {**os.environ, **self._daemon_env(pipe, log)}
        # the daemon sees every GPU: started under CUDA_VISIBLE_DEVICES, its server remaps the
        # devices, and clients keeping that variable (the workers) then fail (NVIDIA's MPS docs,
        # "Environment variables")
        env.pop("CUDA_VISIBLE_DEVICES", None)
        start_log = log / "start.out"
        try:
            # output to a file, not a pipe: a daemon that keeps inherited pipes open would block run()
            with open(start_log, "w", encoding="utf-8") as out:
                result = subprocess.run(
                    [binary, "-d"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=self.timeout_s,
                    check=False,
                )
        except (OSError, subprocess.TimeoutExpired) as exc:
            self._remove_private_dir()
            raise MPSUnavailableError(
                f"starting the MPS control daemon ({binary} -d) failed: {exc}; {HOW_TO_ENABLE}"
            ) from exc
        if result.returncode != 0:
            output = _read_text(start_log)
            self._remove_private_dir()
            raise MPSUnavailableError(
                f"starting the MPS control daemon ({binary} -d) failed with exit code {result.returncode}: "
                f"{output or 'no output'}; {HOW_TO_ENABLE}"
            )
        self.pipe_directory, self.log_directory = pipe, log
        self.started = True
        deadline = time.monotonic() + self.timeout_s
        while not devices.mps_daemon_running(str(pipe)):
            if time.monotonic() > deadline:
                self.stop()
                raise MPSUnavailableError(
                    f"the MPS control daemon started with {binary} -d did not come up in {pipe} within "
                    f"{self.timeout_s:g} s; see {log / 'control.log'}; {HOW_TO_ENABLE}"
                )
            time.sleep(0.05)
        return self

    def client_env(self) -> dict[str, str]:
        """The variables a worker needs to become a client of this daemon."""
        if self.pipe_directory is None:
            raise MPSUnavailableError("MpsDaemon.client_env() before start(); call start() first")
        if self.log_directory is None:
            return {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_directory)}
        return self._daemon_env(self.pipe_directory, self.log_directory)

    def stop(self) -> None:
        """Stop the daemon if this object started it (``quit``), and remove its directory. Idempotent.

        A daemon found running is left alone.
        """
        if not self.started:
            self.pipe_directory = None
            return
        pipe, log = self.pipe_directory, self.log_directory
        self.started = False
        if pipe is not None and log is not None and self._binary_path is not None:
            env = {**os.environ, **self._daemon_env(pipe, log)}
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(
                    [self._binary_path],
                    input="quit\n",
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=self.timeout_s,
                    check=False,
                )
            deadline = time.monotonic() + self.timeout_s
            while devices.mps_daemon_running(str(pipe)) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.pipe_directory = self.log_directory = None
        self._remove_private_dir()

    @property
    def private_directory(self) -> Path | None:
        """The private directory of a daemon this object started (None otherwise)."""
        return self._private_root

    @staticmethod
    def _daemon_env(pipe: Path, log: Path) -> dict[str, str]:
        return {"CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(log)}

    def _remove_private_dir(self) -> None:
        root, self._private_root = self._private_root, None
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)  # the daemon's `control` socket stays after quit


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def _short_temp_dir() -> str:
    """The temporary directory, or /tmp when its path would make the MPS pipe path too long."""
    base = tempfile.gettempdir()
    if len(base) + len("/colocate-mps-XXXXXXXX/pipe/control") > _MAX_PIPE_PATH and os.path.isdir("/tmp"):
        return "/tmp"
    return base


class MpsSlot(ProcessSlot):
    """An ``mps`` slot: a worker process under MPS (GPU) or pinned to a share of the cores (CPU).

    Args:
        slot: the plan's slot (``thread_percentage`` and ``memory_limit_bytes`` apply).
        members: its members, in run order.
        device: where they run.
        daemon: the started :class:`MpsDaemon` (GPU only; ignored on the CPU).
        cpu_offset: on the CPU, the first core (index into the usable cores) of this slot's share.
        **options: as for :class:`~colocate.execution.processes.ProcessSlot`.
    """

    kind = "mps"

    def __init__(
        self,
        slot: Slot,
        members: tuple[Member, ...],
        device: Device,
        *,
        daemon: MpsDaemon | None = None,
        cpu_offset: int | None = 0,
        on_worker_death: OnWorkerDeath = "fail",
        max_restarts: int = 3,
        start_timeout_s: float = 300.0,
        stop_grace_s: float = 5.0,
        warmup_batch_size: int | None = None,
        idle_poll_s: float = 0.0,
    ) -> None:
        options: dict[str, Any] = {"warmup_batch_size": warmup_batch_size, "idle_poll_s": idle_poll_s}
        if device.kind == "cuda":
            if daemon is None:
                raise MPSUnavailableError(
                    f"mps slot '{slot.name}' on {device.name} needs an MPS daemon; {HOW_TO_ENABLE}"
                )
            options["env"] = mps_worker_env(slot, device, daemon.client_env())
            options["cpu_threads"] = slot.cpu_threads
        elif cpu_offset is None:
            # the plan's partitions need more cores than there are: pinned, some would share a
            # core while another idles, so the OS balances them; each keeps its thread count
            options["cpu_threads"] = len(cpu_share(slot, usable_cores()))
        else:
            cores = cpu_share(slot, usable_cores(), cpu_offset)
            options["cpu_affinity"] = cores
            options["cpu_threads"] = len(cores)
        #: cores of this slot's worker on the CPU (None on a GPU)
        self.cpu_cores: tuple[int, ...] | None = options.get("cpu_affinity")
        super().__init__(
            slot,
            members,
            device,
            on_worker_death=on_worker_death,
            max_restarts=max_restarts,
            start_timeout_s=start_timeout_s,
            stop_grace_s=stop_grace_s,
            **options,
        )


__all__ = [
    "HOW_TO_ENABLE",
    "MPS_CONTROL",
    "MpsDaemon",
    "MpsSlot",
    "cpu_share",
    "format_memory_limit",
    "format_thread_percentage",
    "mps_worker_env",
    "usable_cores",
]
