"""Members and ensembles: recipes for models, and how their predictions combine.

A :class:`Member` holds a recipe (a factory, a module, a file path, a callable),
never a loaded model, so building an ensemble costs nothing and members can be
sent to worker processes. A backend's runner loads it on a device.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from colocate.errors import InvalidInputError, ModelLoadError

Precision = Literal["fp32", "fp16", "bf16"]
OutputKind = Literal["logits", "probs"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
KNOWN_BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "tensorrt", "cupy")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_BACKENDS_WITH_FILES = ("onnxruntime", "tensorrt")

Array = npt.NDArray[Any]
CombineFn = Callable[[Sequence[Array], Sequence[float] | None], Array]
StackedRule = Callable[[Sequence[Array] | Array, Sequence[float] | None], Array]
"""A built-in combine rule: also takes the members' probabilities as one (members, batch, classes) array."""


@dataclass(frozen=True)
class InputSpec:
    """What one member takes: a batch of ``shape`` (batch dimension first) of ``dtype``.

    ``shape[0]`` is the batch dimension: ``-1`` accepts any batch size, a positive
    value pins it. The other dimensions must be positive.
    """

    shape: tuple[int, ...]  # batch dimension first; -1 = any batch size
    dtype: str = "float32"  # numpy dtype name
    name: str = "input"  # input name (the ONNX/TensorRT input tensor name)

    def __post_init__(self) -> None:
        if not self.shape:
            raise InvalidInputError("InputSpec.shape is empty; give (batch, ...) e.g. (-1, 3, 32, 32)")
        if self.shape[0] != -1 and self.shape[0] < 1:
            raise InvalidInputError(
                f"InputSpec.shape[0] is {self.shape[0]}; use -1 for any batch size or a positive size"
            )
        if any(d < 1 for d in self.shape[1:]):
            raise InvalidInputError(f"InputSpec.shape {self.shape} has a non-positive dimension")
        try:
            np.dtype(self.dtype)
        except TypeError as exc:
            raise InvalidInputError(f"InputSpec.dtype {self.dtype!r} is not a numpy dtype") from exc

    def with_batch(self, batch_size: int) -> tuple[int, ...]:
        """The concrete shape for ``batch_size``."""
        return (batch_size, *self.shape[1:])

    def example(self, batch_size: int, seed: int = 0) -> Array:
        """A reproducible random batch matching this spec."""
        if batch_size < 1:
            raise InvalidInputError(f"batch size must be >= 1, got {batch_size}")
        rng = np.random.default_rng(seed)
        dtype = np.dtype(self.dtype)
        shape = self.with_batch(batch_size)
        if np.issubdtype(dtype, np.integer):
            return rng.integers(0, 100, size=shape).astype(dtype)
        return rng.standard_normal(size=shape).astype(dtype)

    def check(self, member: str, batch: object) -> None:
        """Raise :class:`InvalidInputError` naming ``member`` unless ``batch`` fits the spec."""
        if not isinstance(batch, np.ndarray):
            raise InvalidInputError(
                f"member '{member}': input must be a numpy array, got {type(batch).__name__}; "
                "convert it with numpy.asarray(...)"
            )
        if batch.dtype != np.dtype(self.dtype):
            raise InvalidInputError(
                f"member '{member}': input dtype {batch.dtype} does not match the spec "
                f"{np.dtype(self.dtype)}; cast the batch (batch.astype('{self.dtype}')) "
                "or fix InputSpec.dtype"
            )
        expected = self.shape
        ok = batch.ndim == len(expected) and all(
            e == -1 or e == g for e, g in zip(expected, batch.shape, strict=False)
        )
        if not ok or batch.shape[0] < 1:
            shown = "(" + ", ".join("B" if d == -1 else str(d) for d in expected) + ")"
            raise InvalidInputError(
                f"member '{member}': input shape {tuple(batch.shape)} does not match the spec "
                f"{shown}; reshape the batch or fix InputSpec.shape"
            )


@dataclass(frozen=True)
class Member:
    """One model of an ensemble: a recipe that a backend knows how to load.

    ``source`` depends on ``backend``:

    - ``torch``: an ``nn.Module`` factory (a picklable callable returning the
      module, preferred) or an ``nn.Module``; or a path to a TorchScript file.
    - ``onnxruntime``: path to an ``.onnx`` file.
    - ``tensorrt``: path to a serialized engine (``.engine``/``.plan``) or to an
      ``.onnx`` file to build one from.
    - ``cupy``: a callable ``f(x: cupy.ndarray) -> cupy.ndarray``.
    """

    name: str  # unique within an ensemble: letters, digits, "_", ".", "-"
    backend: str  # one of KNOWN_BACKENDS
    source: Any  # how to load it; see the class docstring
    input: InputSpec  # the batch it takes
    precision: str = "fp32"  # "fp32", "fp16" or "bf16": the precision it runs in
    output: str = "logits"  # "logits" (softmax applied when combining) or "probs"
    options: Mapping[str, Any] = field(default_factory=dict)  # backend options

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_PATTERN.match(self.name):
            raise InvalidInputError(
                f"member name {self.name!r} is not valid; use 1-64 letters, digits, '_', '.', '-'"
            )
        if self.backend not in KNOWN_BACKENDS:
            raise InvalidInputError(
                f"member '{self.name}': unknown backend {self.backend!r}; "
                f"choose one of {', '.join(KNOWN_BACKENDS)}"
            )
        if self.precision not in PRECISIONS:
            raise InvalidInputError(
                f"member '{self.name}': unknown precision {self.precision!r}; "
                f"choose one of {', '.join(PRECISIONS)}"
            )
        if self.output not in ("logits", "probs"):
            raise InvalidInputError(
                f"member '{self.name}': output must be 'logits' or 'probs', got {self.output!r}"
            )
        if not isinstance(self.input, InputSpec):
            raise InvalidInputError(
                f"member '{self.name}': input must be an InputSpec, got {type(self.input).__name__}"
            )
        if self.backend in _BACKENDS_WITH_FILES or isinstance(self.source, (str, Path)):
            if not isinstance(self.source, (str, Path)):
                raise InvalidInputError(
                    f"member '{self.name}': backend '{self.backend}' loads from a file; "
                    f"source must be a path, got {type(self.source).__name__}"
                )
            path = Path(self.source)
            if not path.is_file():
                raise ModelLoadError(
                    f"member '{self.name}': model file {str(path)!r} does not exist; "
                    "check the path (export ONNX files with colocate.zoo.export_onnx)"
                )
        elif self.backend == "cupy" and not callable(self.source):
            raise InvalidInputError(
                f"member '{self.name}': backend 'cupy' needs a callable source, "
                f"got {type(self.source).__name__}"
            )

    @property
    def source_path(self) -> Path | None:
        """The model file, for file-based sources; None otherwise."""
        return Path(self.source) if isinstance(self.source, (str, Path)) else None

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (the source as a path or a qualified name)."""
        return {
            "name": self.name,
            "backend": self.backend,
            "source": describe_source(self.source),
            "input": {"shape": list(self.input.shape), "dtype": self.input.dtype, "name": self.input.name},
            "precision": self.precision,
            "output": self.output,
        }


def describe_source(source: Any) -> str:
    """A readable, stable description of a member's source."""
    if isinstance(source, (str, Path)):
        return str(source)
    func = getattr(source, "func", None)  # functools.partial
    if func is not None:
        args = ", ".join(
            [repr(a) for a in getattr(source, "args", ())]
            + [f"{k}={v!r}" for k, v in sorted(getattr(source, "keywords", {}).items())]
        )
        return f"{_qualname(func)}({args})"
    return _qualname(source)


def _qualname(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or type(obj).__module__
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}.{name}"


# --- combine rules -----------------------------------------------------------


def softmax(x: Array, axis: int = -1) -> Array:
    """Numerically stable softmax in float64."""
    z = np.asarray(x, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=axis, keepdims=True))


def _softmax_in_place(z: Array) -> None:
    """:func:`softmax` over the last axis of a float64 array, overwriting it (fewer allocations)."""
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)


def _stacked(probs: Sequence[Array] | Array) -> Array:
    """The members' probabilities as one (members, batch, classes) array (no copy when they are one)."""
    return probs if isinstance(probs, np.ndarray) else np.stack(probs)


def mean_probs(probs: Sequence[Array] | Array, weights: Sequence[float] | None = None) -> Array:
    """Mean of the members' class probabilities, shape (batch, classes)."""
    stacked = _stacked(probs)
    return np.asarray(stacked.sum(axis=0) / stacked.shape[0])  # np.mean's sum and division, less overhead


def weighted_mean(probs: Sequence[Array] | Array, weights: Sequence[float] | None = None) -> Array:
    """Weighted mean of class probabilities; weights are normalised to sum to 1."""
    if weights is None:
        raise InvalidInputError("combine rule 'weighted' needs Ensemble.weights")
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return np.asarray(np.tensordot(w, _stacked(probs), axes=1))


def majority_vote(probs: Sequence[Array] | Array, weights: Sequence[float] | None = None) -> Array:
    """Vote shares, shape (batch, classes): the fraction of members whose top class is each class.

    ``argmax`` of the result is the majority class; a tie goes to the lowest class index.
    """
    stacked = _stacked(probs)  # (members, batch, classes)
    members, batch, classes = stacked.shape
    votes = stacked.argmax(axis=-1)  # (members, batch)
    counts = np.zeros((batch, classes), dtype=np.float64)
    for member_votes in votes:
        counts[np.arange(batch), member_votes] += 1.0
    return np.asarray(counts / members)


def _scores(member: Member, output: Array) -> Array:
    """A member's raw output as an array, checked to be (batch, classes)."""
    out = np.asarray(output)
    if out.ndim != 2:
        raise InvalidInputError(
            f"member '{member.name}': output shape {out.shape} is not (batch, classes); "
            "ensembles combine 2-D score outputs"
        )
    return out


COMBINE_RULES: dict[str, StackedRule] = {
    "mean": mean_probs,
    "weighted": weighted_mean,
    "vote": majority_vote,
}


@dataclass(frozen=True)
class Ensemble:
    """Members and how their predictions combine.

    ``combine`` is ``"mean"`` (mean of probabilities), ``"weighted"`` (weighted
    mean, needs ``weights``), ``"vote"`` (majority vote, as vote shares), or a
    callable ``f(probs: list[array], weights) -> array``. Each member's output
    is turned into probabilities first (softmax of logits).
    """

    members: tuple[Member, ...]
    combine: str | CombineFn = "mean"
    weights: tuple[float, ...] | None = None  # one per member, for "weighted"
    name: str = "ensemble"

    def __post_init__(self) -> None:
        members = tuple(self.members)
        object.__setattr__(self, "members", members)
        if not members:
            raise InvalidInputError(f"ensemble '{self.name}' has no members; give at least one")
        seen: set[str] = set()
        for m in members:
            if not isinstance(m, Member):
                raise InvalidInputError(
                    f"ensemble '{self.name}': members must be Member objects, got {type(m).__name__}"
                )
            if m.name in seen:
                raise InvalidInputError(
                    f"ensemble '{self.name}': duplicate member name '{m.name}'; names must be unique"
                )
            seen.add(m.name)
        if isinstance(self.combine, str) and self.combine not in COMBINE_RULES:
            raise InvalidInputError(
                f"ensemble '{self.name}': unknown combine rule {self.combine!r}; "
                f"choose one of {', '.join(COMBINE_RULES)} or pass a callable"
            )
        if not isinstance(self.combine, str) and not callable(self.combine):
            raise InvalidInputError(f"ensemble '{self.name}': combine must be a rule name or a callable")
        if self.weights is not None:
            weights = tuple(float(w) for w in self.weights)
            object.__setattr__(self, "weights", weights)
            if len(weights) != len(members):
                raise InvalidInputError(
                    f"ensemble '{self.name}': {len(weights)} weights for {len(members)} members; "
                    "give one weight per member"
                )
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise InvalidInputError(
                    f"ensemble '{self.name}': weights {weights} must be >= 0 with a positive sum"
                )
        elif self.combine == "weighted":
            raise InvalidInputError(
                f"ensemble '{self.name}': combine rule 'weighted' needs weights (one per member)"
            )

    @property
    def member_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)

    def member(self, name: str) -> Member:
        """The member called ``name``."""
        for m in self.members:
            if m.name == name:
                return m
        raise InvalidInputError(
            f"ensemble '{self.name}' has no member '{name}'; members: {', '.join(self.member_names)}"
        )

    def to_probs(self, member: Member, output: Array) -> Array:
        """A member's raw output as class probabilities, shape (batch, classes)."""
        out = _scores(member, output)
        if member.output == "logits":
            return softmax(out)
        return out.astype(np.float64)

    def combine_outputs(self, outputs: Mapping[str, Array]) -> Array:
        """Combine raw member outputs (name -> array) into one (batch, classes) array."""
        # every request of every executor runs this: at batch 1 numpy's per-call overhead is
        # most of it, so the common case (every output there, same 2-D shape) takes few calls
        try:
            raw = [outputs[m.name] for m in self.members]
        except KeyError:
            missing = [n for n in self.member_names if n not in outputs]
            raise InvalidInputError(
                f"ensemble '{self.name}': no output for member(s) {', '.join(missing)}"
            ) from None
        raw = [out if isinstance(out, np.ndarray) else np.asarray(out) for out in raw]
        shape = raw[0].shape
        if len(shape) != 2 or any(out.shape != shape for out in raw):
            self._check_scores(raw)
        # one stack and one softmax over every logits member: at batch 1 a softmax per member
        # cost more than the whole combine did
        stacked = np.array(raw, dtype=np.float64)  # (members, batch, classes), a copy of our own
        logits = self._logits_rows
        if len(logits) == len(raw):
            _softmax_in_place(stacked)
        elif logits:
            rows = list(logits)
            part = stacked[rows]
            _softmax_in_place(part)
            stacked[rows] = part
        if isinstance(self.combine, str):  # the built-in rules take the stack as it is
            return np.asarray(COMBINE_RULES[self.combine](stacked, self.weights))
        return np.asarray(self.combine(list(stacked), self.weights))

    def _check_scores(self, raw: Sequence[Array]) -> None:
        """Raise the error for outputs that are not all (batch, classes) of one shape."""
        checked = [_scores(m, out) for m, out in zip(self.members, raw, strict=True)]
        detail = ", ".join(f"{m.name}={out.shape}" for m, out in zip(self.members, checked, strict=True))
        raise InvalidInputError(
            f"ensemble '{self.name}': member outputs differ in shape ({detail}); "
            "all members must predict the same classes for the same batch"
        )

    @functools.cached_property
    def _logits_rows(self) -> tuple[int, ...]:
        """The positions of the members whose outputs are logits (softmax before combining)."""
        return tuple(i for i, m in enumerate(self.members) if m.output == "logits")
