"""Backend registry: a name maps to a runner class, imported on first use.

``get("tensorrt")`` imports ``colocate.backends.tensorrt_backend`` only then;
:func:`available` never imports a framework. Asking for a backend whose package
is missing raises :class:`~colocate.errors.BackendUnavailableError` naming the
extra to install.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from colocate._optional import install_hint, is_available
from colocate.errors import BackendUnavailableError, InvalidInputError

if TYPE_CHECKING:
    from colocate.backends.base import MemberRunner
    from colocate.devices import Device
    from colocate.ensemble import Member


@dataclass(frozen=True)
class BackendInfo:
    """Where a backend lives and what it needs."""

    name: str
    runner: str  # "module:Class"
    requires: tuple[str, ...]  # importable modules it needs
    gpu_only: bool  # True when it cannot run on the CPU


_REGISTRY: dict[str, BackendInfo] = {
    info.name: info
    for info in (
        BackendInfo("torch", "colocate.backends.torch_backend:TorchRunner", ("torch",), False),
        BackendInfo(
            "onnxruntime",
            "colocate.backends.onnxruntime_backend:OnnxRuntimeRunner",
            ("onnxruntime",),
            False,
        ),
        BackendInfo("tensorrt", "colocate.backends.tensorrt_backend:TensorRTRunner", ("tensorrt",), True),
        BackendInfo("cupy", "colocate.backends.cupy_backend:CupyRunner", ("cupy",), True),
    )
}


def names() -> tuple[str, ...]:
    """All registered backend names."""
    return tuple(_REGISTRY)


def info(name: str) -> BackendInfo:
    """The registry entry for ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidInputError(f"unknown backend {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def available() -> dict[str, bool]:
    """Backend name -> whether its packages are installed (nothing is imported)."""
    return {name: all(is_available(m) for m in i.requires) for name, i in _REGISTRY.items()}


def get(name: str, *, member: str | None = None) -> type[MemberRunner]:
    """The runner class of backend ``name``, importing its module now."""
    entry = info(name)
    who = f"backend '{name}'" + (f" of member '{member}'" if member else "")
    for module in entry.requires:
        if not is_available(module):
            raise BackendUnavailableError(
                f"{who} needs the Python package '{module}', which is not installed; "
                f"install it with: {install_hint(module)}"
            )
    module_name, class_name = entry.runner.split(":")
    runner_cls: type[MemberRunner] = getattr(importlib.import_module(module_name), class_name)
    return runner_cls


def create_runner(member: Member, device: Device, *, stream: Any | None = None) -> MemberRunner:
    """A runner for ``member`` on ``device`` (not yet activated)."""
    return get(member.backend, member=member.name)(member, device, stream=stream)


__all__ = ["BackendInfo", "available", "create_runner", "get", "info", "names"]
