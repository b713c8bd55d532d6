"""Backend variants of a member: the ways one model can run on a device.

A member names one backend, but the same model can often run several ways, and the fastest
differs by model, batch size and device (on an H100 CUDA-graph replay ran the zoo's large
models 3-6x faster than eager torch at batch 1; on a CPU ONNX Runtime ran the tiny ones 3-5x
faster than torch). A *variant* is the member under another backend or backend option, with
the same name and a short label:

==================  ========================================================================
label               what runs
==================  ========================================================================
``torch``           eager PyTorch (torch members)
``torch+cudagraph`` PyTorch replaying a CUDA graph per batch shape (torch members, GPU only)
``torch+compile``   PyTorch through ``torch.compile`` (torch members; inductor needs a C++
                    compiler on the CPU, triton on a GPU). Only when named: ``"auto"`` leaves
                    it out, since each member compiles once per batch shape in every process
                    that runs it (8-29 s a model and shape for the small zoo on a 2-core CPU, 1 s the MLP)
``onnxruntime``     ONNX Runtime on the member's ONNX file: its CPU provider on the CPU, the
                    CUDA execution provider on a GPU; a torch member is exported once (fp32,
                    cached on disk under the user's cache directory, ``onnx/variants``)
``tensorrt``        a TensorRT engine built from the ONNX file (GPU only, where ``tensorrt``
                    imports)
``cupy``            a CuPy member as given (no other variant)
==================  ========================================================================

:func:`backend_variants` lists the variants of a member that can run on a device (the member
as given first); :func:`variant_member` builds one by label (what an executor does with a
plan's choice). The planner chooses among the variants' profiles
(:func:`colocate.planning.plan` with ``backends=``).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from colocate._optional import install_hint, is_available
from colocate.config import cache_dir
from colocate.devices import Device
from colocate.ensemble import Member
from colocate.errors import (
    BackendUnavailableError,
    ColocateError,
    DeviceError,
    ExportError,
    InvalidInputError,
    UnknownBackendError,
)

VARIANT_LABELS: tuple[str, ...] = (
    "torch",
    "torch+cudagraph",
    "torch+compile",
    "onnxruntime",
    "tensorrt",
    "cupy",
)
"""Every variant label, in the order variants are listed."""
AUTO = "auto"
"""``backends="auto"``: every variant usable on the device, except those only listed when named."""
ONLY_WHEN_NAMED: tuple[str, ...] = ("torch+compile",)
"""Labels ``"auto"`` leaves out: their first run at each batch shape takes seconds to minutes."""
_ONNX_LABELS = ("onnxruntime", "tensorrt")
_OPTIONS_OF_LABEL: dict[str, tuple[str, ...]] = {
    "torch+cudagraph": ("cuda_graph",),
    "torch+compile": ("compile",),
}
_TORCH_VARIANT_OPTIONS = ("cuda_graph", "compile")

BackendChoice = str | Sequence[str]
"""``"auto"``, a comma-separated string of labels, or a sequence of labels."""


@dataclass(frozen=True)
class Variant:
    """One way to run a member: a label and the member configured for it (same name)."""

    label: str  # one of VARIANT_LABELS
    member: Member  # the member with this variant's backend, source and options


def variant_label(member: Member) -> str:
    """The label of ``member`` as given: its backend, ``torch+cudagraph`` / ``torch+compile`` for a
    torch member with the ``cuda_graph`` / ``compile`` option on."""
    if member.backend == "torch" and bool(member.options.get("cuda_graph", False)):
        return "torch+cudagraph"
    if member.backend == "torch" and member.options.get("compile", False) not in (False, None):
        return "torch+compile"
    return member.backend


def label_options(label: str) -> tuple[str, ...]:
    """The backend options a label switches on, e.g. ``("cuda_graph",)`` for ``torch+cudagraph``."""
    check_label(label)
    return _OPTIONS_OF_LABEL.get(label, ())


def label_backend(label: str) -> str:
    """The backend a label runs on (``torch+cudagraph`` -> ``torch``)."""
    check_label(label)
    return label.split("+", 1)[0]


def check_label(label: object, *, member: str | None = None) -> str:
    """``label`` if it is a known variant label, else :class:`UnknownBackendError` listing them."""
    if not isinstance(label, str) or label not in VARIANT_LABELS:
        who = f"member '{member}': " if member else ""
        raise UnknownBackendError(
            f"{who}unknown backend {label!r}; choose from {', '.join(VARIANT_LABELS)} or 'auto'"
        )
    return label


def parse_backends(backends: BackendChoice) -> tuple[str, ...] | None:
    """The labels asked for, or None for ``"auto"`` (every usable variant).

    Accepts ``"auto"``, ``"torch,onnxruntime"`` or a sequence of labels.

    Raises:
        UnknownBackendError: a label that is not a variant label (the message lists them).
        InvalidInputError: nothing was given.
    """
    items: Sequence[str]
    if isinstance(backends, str):
        if backends.strip() == AUTO:
            return None
        items = backends.split(",")
    else:
        items = list(backends)
    labels = tuple(dict.fromkeys(str(x).strip() for x in items if str(x).strip()))
    if not labels:
        raise InvalidInputError(
            f"backends {backends!r} names no backend; give 'auto' or labels such as 'torch,onnxruntime'"
        )
    if AUTO in labels:
        return None
    for label in labels:
        check_label(label)
    return labels


# ---------------------------------------------------------------------------
# What stands in the way of a variant
# ---------------------------------------------------------------------------


def source_problem(member: Member, label: str) -> str | None:
    """Why ``member``'s model cannot take the form ``label`` needs (None when it can).

    Independent of the device: torch variants need a torch member; ONNX-based ones need an
    ``.onnx`` source or a torch member that can be exported (a module or factory, float32
    input, fp32 precision, the ``onnx`` package installed).
    """
    check_label(label, member=member.name)
    own = variant_label(member)
    if label == own:
        return None
    if label.startswith("torch"):
        if member.backend != "torch":
            return f"it is a {member.backend} member; only torch members run under torch"
        return None
    if label == "cupy":
        return "only a member given as a CuPy callable runs under cupy"
    path = member.source_path
    if member.backend in _ONNX_LABELS and path is not None and path.suffix == ".onnx":
        return None
    if member.backend != "torch":
        return f"it is a {member.backend} member with no ONNX file; only torch members are exported to ONNX"
    if path is not None:
        return "its source is a TorchScript file; export it to ONNX yourself and give that file"
    if member.input.dtype != "float32":
        return f"its input is {member.input.dtype}; the ONNX export feeds float32"
    if member.precision != "fp32":
        return f"it runs in {member.precision}; the ONNX export is fp32"
    if not is_available("onnx"):
        return f"exporting to ONNX needs the package 'onnx': {install_hint('onnx')}"
    return None


def _compile_problem(device: Device) -> str | None:
    """What ``torch.compile``'s inductor lacks on ``device``'s machine (None when nothing)."""
    if device.is_gpu:
        if importlib.util.find_spec("triton") is None:
            return "torch.compile needs triton on a GPU (it comes with torch's CUDA wheels)"
        return None
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None and shutil.which("c++") is None:
        return f"torch.compile needs a C++ compiler on the CPU ({compiler!r} is not on PATH)"
    return None


def _onnxruntime_has_cuda() -> bool:
    try:
        ort = importlib.import_module("onnxruntime")
        return "CUDAExecutionProvider" in ort.get_available_providers()
    except Exception:  # a broken install counts as no CUDA provider
        return False


def device_problem(label: str, device: Device) -> str | None:
    """Why variant ``label`` cannot run on ``device`` (None when it can, or may on a simulated GPU).

    Checks the device kind and that the backend's package is installed; on a real GPU,
    ``onnxruntime`` also needs its CUDA execution provider. On a simulated GPU the packages of
    this machine do not matter (the plan is for another one): only the kind is checked.
    """
    check_label(label)
    backend = label_backend(label)
    if label == "torch+cudagraph" and not device.is_gpu:
        return "CUDA graphs need a GPU"
    if label == "torch+compile" and device.kind != "simulated":
        problem = _compile_problem(device)
        if problem is not None:
            return problem
    if backend in ("tensorrt", "cupy") and not device.is_gpu:
        return f"{backend} needs a GPU"
    if device.kind == "simulated":
        return None
    from colocate import backends as registry

    if not registry.available().get(backend, False):
        return f"{backend} is not installed: {install_hint(registry.info(backend).requires[0])}"
    if backend == "onnxruntime" and device.kind == "cuda" and not _onnxruntime_has_cuda():
        return "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)"
    return None


# ---------------------------------------------------------------------------
# Building variants
# ---------------------------------------------------------------------------


def onnx_file(member: Member, *, onnx_dir: str | Path | None = None) -> Path:
    """The ONNX file of ``member``: its own source, or an export made once and cached.

    A torch member is exported with :func:`colocate.zoo.export_onnx` to
    ``<onnx_dir or the cache>/onnx/variants/<model hash>.onnx``; a later call (in any process)
    finds the file and exports nothing. The file is written under a temporary name and renamed,
    so a reader never sees half of it.

    Raises:
        ExportError: the member cannot be exported (the message says why and what to do).
    """
    path = member.source_path
    if member.backend in _ONNX_LABELS and path is not None and path.suffix == ".onnx":
        return path
    problem = source_problem(member, "onnxruntime")
    if problem is not None:
        raise ExportError(
            f"member '{member.name}' cannot be exported to ONNX: {problem}; leave the ONNX-based "
            "backends out of backends= for it, or give an onnxruntime member with its .onnx file"
        )
    from colocate.profiling.cache import model_hash
    from colocate.zoo import export_onnx

    folder = Path(onnx_dir) if onnx_dir is not None else cache_dir("onnx", "variants")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = folder / f"{model_hash(member)}.onnx"
    if target.is_file():
        return target
    partial = folder / f".{target.stem}.{os.getpid()}.partial.onnx"
    try:
        export_onnx(member.source, partial, input_shape=member.input.shape)
        os.replace(partial, target)
    except ColocateError as exc:
        raise ExportError(
            f"member '{member.name}': exporting it to ONNX failed ({exc}); leave the ONNX-based "
            "backends out of backends= for it"
        ) from exc
    finally:
        partial.unlink(missing_ok=True)
    return target


def variant_member(
    member: Member, label: str, device: Device | None = None, *, onnx_dir: str | Path | None = None
) -> Member:
    """``member`` configured as variant ``label`` (same name), exporting to ONNX if needed.

    Args:
        member: the member as given.
        label: one of :data:`VARIANT_LABELS`.
        device: when given, the variant must be able to run there.
        onnx_dir: where ONNX exports go (default: the user cache, ``onnx/variants``).

    Raises:
        UnknownBackendError: ``label`` is not a variant label.
        ExportError: the member's model cannot take that form (e.g. a CuPy member as onnxruntime).
        BackendUnavailableError: the variant's package is missing on this machine.
        DeviceError: the variant cannot run on ``device`` (e.g. CUDA graphs on the CPU).
    """
    check_label(label, member=member.name)
    if device is not None:
        problem = device_problem(label, device)
        if problem is not None:
            error = BackendUnavailableError if "not installed" in problem else DeviceError
            raise error(
                f"member '{member.name}': backend variant '{label}' cannot run on {device.name}: {problem}"
            )
    if label == variant_label(member):
        return member
    problem = source_problem(member, label)
    if problem is not None:
        raise ExportError(
            f"member '{member.name}' cannot run as '{label}': {problem}; leave '{label}' out of "
            "backends= for it (or use backends='auto', which skips what does not apply)"
        )
    if label.startswith("torch"):
        options = {k: v for k, v in member.options.items() if k not in _TORCH_VARIANT_OPTIONS}
        for option in label_options(label):
            options[option] = True
        return dataclasses.replace(member, options=options)
    path = onnx_file(member, onnx_dir=onnx_dir)
    return Member(
        name=member.name,
        backend=label,
        source=path,
        input=member.input,
        precision="fp32",
        output=member.output,
    )


def backend_variants(
    member: Member,
    device: Device,
    backends: BackendChoice = AUTO,
    *,
    onnx_dir: str | Path | None = None,
) -> tuple[Variant, ...]:
    """The variants of ``member`` that can run on ``device``: the member as given first.

    With ``backends="auto"`` every variant that applies (but those in :data:`ONLY_WHEN_NAMED`)
    is listed and one that does not (a package missing, a GPU-only variant on the CPU, a model
    that cannot be exported) is left out. With labels, only those (and the member as given, the
    fallback) are listed; a label the device cannot run is left out too, but a member whose
    model cannot take an asked-for form is an error.

    Raises:
        UnknownBackendError: an unknown label.
        ExportError: an asked-for variant needs an ONNX file the member cannot be exported to.
    """
    wanted = parse_backends(backends)
    own = variant_label(member)
    found = [Variant(own, member)]
    for label in variant_labels(member, device, backends)[1:]:
        try:
            found.append(Variant(label, variant_member(member, label, onnx_dir=onnx_dir)))
        except ExportError:
            if wanted is not None:
                raise
    return tuple(found)


def variant_labels(member: Member, device: Device, backends: BackendChoice = AUTO) -> tuple[str, ...]:
    """The labels :func:`backend_variants` would list, checked without building anything.

    Nothing is exported and no framework is imported, so a process that goes on to serve can
    check its input before profiling the variants in a child process.

    Raises:
        UnknownBackendError: an unknown label.
        ExportError: an asked-for variant that the member's model cannot take.
    """
    wanted = parse_backends(backends)
    own = variant_label(member)
    labels = [own]
    for label in VARIANT_LABELS:
        if label == own or (wanted is not None and label not in wanted):
            continue
        if wanted is None and label in ONLY_WHEN_NAMED:
            continue
        if device_problem(label, device) is not None:
            continue
        problem = source_problem(member, label)
        if problem is not None:
            if wanted is None or label == "cupy" or (label.startswith("torch") and member.backend != "torch"):
                continue
            raise ExportError(
                f"member '{member.name}' cannot run as '{label}': {problem}; leave '{label}' out of "
                "backends= (or use backends='auto', which skips what does not apply)"
            )
        labels.append(label)
    return tuple(labels)


__all__ = [
    "AUTO",
    "ONLY_WHEN_NAMED",
    "VARIANT_LABELS",
    "BackendChoice",
    "Variant",
    "backend_variants",
    "check_label",
    "device_problem",
    "label_backend",
    "label_options",
    "onnx_file",
    "parse_backends",
    "source_problem",
    "variant_label",
    "variant_labels",
    "variant_member",
]
