"""Shared fixtures and the GPU skip rule.

Tests that need a CUDA GPU carry ``@pytest.mark.gpu``; without a GPU they are
skipped here with the reason, so no ``-m`` filter is needed. ``mps`` likewise
needs the MPS control binary.
"""

from __future__ import annotations

import functools
import shutil

import pytest

from colocate.devices import Device, usable_cpu_cores


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none found by torch.cuda.is_available())")
    skip_mps = pytest.mark.skip(reason="needs NVIDIA MPS (nvidia-cuda-mps-control not on PATH)")
    for item in items:
        if "gpu" in item.keywords and not cuda_available():
            item.add_marker(skip_gpu)
        if "mps" in item.keywords and shutil.which("nvidia-cuda-mps-control") is None:
            item.add_marker(skip_mps)


@pytest.fixture
def cpu() -> Device:
    """The CPU as a device."""
    return Device(kind="cpu", name="cpu", memory_total_bytes=8 << 30, cpu_cores=usable_cpu_cores())


@pytest.fixture
def cuda() -> Device:
    """The first CUDA GPU (only in tests marked gpu)."""
    import torch

    props = torch.cuda.get_device_properties(0)
    return Device(
        kind="cuda",
        name=props.name,
        index=0,
        memory_total_bytes=int(props.total_memory),
        sm_count=int(props.multi_processor_count),
        compute_capability=(int(props.major), int(props.minor)),
    )
