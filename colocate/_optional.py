"""Optional heavy dependencies: the only place that maps a module to its pip extra."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from colocate.errors import BackendUnavailableError

# module name -> (pip distribution to mention, colocate extra that installs it)
_PACKAGE_OF_MODULE: dict[str, tuple[str, str]] = {
    "torch": ("torch", "torch"),
    "onnxruntime": ("onnxruntime (or onnxruntime-gpu)", "onnx"),
    "onnx": ("onnx", "onnx"),
    "onnxscript": ("onnxscript", "onnx"),
    "cupy": ("cupy-cuda13x (or cupy-cuda12x)", "gpu"),
    "pynvml": ("nvidia-ml-py", "gpu"),
    "tensorrt": ("tensorrt", "tensorrt"),
    "matplotlib": ("matplotlib", "plot"),
}


def is_available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it.

    A module blocked with ``sys.modules[name] = None`` counts as unavailable.
    """
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def install_hint(module: str) -> str:
    """The pip command that installs ``module`` as a colocate extra."""
    package, extra = _PACKAGE_OF_MODULE.get(module, (module, ""))
    if extra:
        return f"pip install 'colocate[{extra}]' (provides {package})"
    return f"pip install {package}"


def optional_import(module: str, *, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`BackendUnavailableError` naming the extra.

    Args:
        module: importable module name, e.g. ``"onnxruntime"``.
        purpose: what needs it, for the message, e.g. ``"backend 'onnxruntime' of member 'mlp'"``.
    """
    if not is_available(module):
        raise BackendUnavailableError(
            f"{purpose} needs the Python package '{module}', which is not installed; "
            f"install it with: {install_hint(module)}"
        )
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"{purpose} needs the Python package '{module}', which is installed but fails "
            f"to import ({exc}); reinstall it with: {install_hint(module)}"
        ) from exc
