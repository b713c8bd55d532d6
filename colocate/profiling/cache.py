"""On-disk profile cache, keyed by what makes a measurement differ.

The key is the model's hash, the device's fingerprint, the backend, the
precision, the batch size and the versions of colocate and the framework; one
JSON file per key under the user's cache directory (overridable).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from colocate import serde
from colocate._optional import is_available
from colocate.config import cache_dir
from colocate.devices import Device
from colocate.ensemble import Member
from colocate.errors import ColocateError
from colocate.profiling.memory import model_file_bytes
from colocate.profiling.types import Profile

_FRAMEWORK_MODULE = {"torch": "torch", "onnxruntime": "onnxruntime", "tensorrt": "tensorrt", "cupy": "cupy"}


@functools.cache
def framework_version(backend: str) -> str:
    """Version of the package behind ``backend`` ("missing" if not installed).

    Read from the installed distribution's metadata, so that a cache lookup does not pay for
    importing the framework (importing torch alone takes about a second).
    """
    module = _FRAMEWORK_MODULE.get(backend, backend)
    if not is_available(module):
        return "missing"
    for dist in sorted(importlib.metadata.packages_distributions().get(module, [])):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return str(getattr(__import__(module), "__version__", "unknown"))


def _sha256_file(path: Path, digest: Any) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)


_HASH_CHARS = 20


def model_hash(member: Member) -> str:
    """A stable hash of the member's model: its weights, its file, or its recipe.

    A source with a ``cache_key()`` method (e.g. the zoo's factories, which are
    deterministic) is hashed by that key without loading it; a file by its
    bytes (and external-data side file); a torch module or factory by its
    weights; a plain callable by its code.
    """
    digest = hashlib.sha256()
    source = member.source
    digest.update(member.backend.encode())
    path = member.source_path
    if path is not None:
        _sha256_file(path, digest)
        side = path.with_name(path.name + ".data")
        if side.is_file():
            _sha256_file(side, digest)
        digest.update(str(model_file_bytes(path)).encode())
    elif callable(getattr(source, "cache_key", None)):
        digest.update(str(source.cache_key()).encode())
    elif member.backend == "torch":
        import torch

        module = source if isinstance(source, torch.nn.Module) else source()
        digest.update(type(module).__qualname__.encode())
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    else:
        try:
            digest.update(inspect.getsource(source).encode())
        except (OSError, TypeError):
            digest.update(repr(source).encode())
    return digest.hexdigest()[:_HASH_CHARS]


def quick_model_hash(member: Member) -> str | None:
    """:func:`model_hash` where it needs no model built (a model file, or a source with a
    ``cache_key()`` such as the zoo's factories); None otherwise."""
    if member.source_path is None and not callable(getattr(member.source, "cache_key", None)):
        return None
    return model_hash(member)


def model_mismatches(members: Iterable[Member], recorded: Mapping[str, str]) -> list[str]:
    """The members whose model differs from the one ``recorded`` (member -> model hash) names:
    one line each, ``"'name' (measured abc..., this one def...)"``. Members without a record,
    records that are not :func:`model_hash`'s (synthetic profiles name theirs), and members
    :func:`quick_model_hash` cannot hash cheaply are not checked."""
    lines = []
    for member in members:
        then = recorded.get(member.name)
        if not then or len(then) != _HASH_CHARS or any(c not in "0123456789abcdef" for c in then):
            continue
        now = quick_model_hash(member)
        if now is not None and now != then:
            lines.append(f"'{member.name}' (planned or profiled for model {then[:8]}, this one is {now[:8]})")
    return lines


def cache_key(member: Member, device: Device, batch_size: int, digest: str, measured: str = "") -> str:
    """The cache key of one (member, device, batch size) measurement.

    It holds everything that changes the figures: the model (``digest``), the device, the
    backend, its options and version, the precision, the batch size and the member's input
    (its shape and dtype: the same model on larger images is another measurement), torch's
    intra-op thread count for a torch member on the CPU (process-wide, not an option), and
    ``measured``: what the measurement records (the profiler's settings that add or leave out
    figures, such as the thread scaling or the operator trace).
    """
    from colocate import __version__

    parts = [
        digest,
        device.fingerprint(),
        member.backend,
        member.precision,
        str(batch_size),
        __version__,
        framework_version(member.backend),
        json.dumps(sorted((str(k), repr(v)) for k, v in member.options.items())),
        f"input {member.input.shape} {member.input.dtype}",
        f"torch threads {_torch_threads(member, device)}",
        measured,
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _torch_threads(member: Member, device: Device) -> int | None:
    """torch's intra-op thread count, for a torch member on the CPU (else None)."""
    if member.backend != "torch" or device.kind != "cpu" or not is_available("torch"):
        return None
    import torch

    return int(torch.get_num_threads())


class ProfileCache:
    """Profiles on disk, one JSON file per key. ``hits`` and ``misses`` count lookups."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir("profiles")
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.hits = 0
        self.misses = 0

    def path_for(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def lookup(self, key: str) -> Profile | None:
        """The cached profile for ``key``, or None (an unreadable entry counts as a miss)."""
        path = self.path_for(key)
        if path.is_file():
            try:
                profile = serde.load(Profile, path)
            except ColocateError:
                path.unlink(missing_ok=True)
            else:
                self.hits += 1
                return profile
        self.misses += 1
        return None

    def store(self, key: str, profile: Profile) -> Path:
        """Save ``profile`` under ``key`` (atomically: write, then rename)."""
        path = self.path_for(key)
        tmp = path.with_suffix(".tmp")
        serde.save(profile, tmp)
        tmp.replace(path)
        return path

    def clear(self) -> int:
        """Remove every cached profile; return how many were removed."""
        removed = 0
        for path in self.root.glob("*.json"):
            path.unlink()
            removed += 1
        return removed
