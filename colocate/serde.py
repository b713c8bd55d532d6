"""JSON round-trip for colocate's frozen dataclasses.

``to_dict`` turns a dataclass (nested dataclasses, tuples, dicts, enums of plain
values) into JSON-able data; ``from_dict`` rebuilds it from the field types and
checks every value's type, saying which field got what. Files carry a
``schema_version`` and the type name, so loading the wrong file is an error,
not a silently wrong object.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

from colocate.errors import InvalidInputError, os_error_reason

SCHEMA_VERSION = 1

T = TypeVar("T")


def to_dict(obj: Any) -> Any:
    """JSON-able data for a dataclass instance (recursively) or a plain value."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return None
    return obj


def from_dict(cls: type[T], data: Any, *, where: str = "") -> T:
    """Rebuild a ``cls`` dataclass from :func:`to_dict` output, checking types."""
    result = _decode(cls, data, where or cls.__name__)
    return typing.cast(T, result)


def _decode(tp: Any, data: Any, where: str) -> Any:
    if tp is Any:
        return data
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if data is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _decode(option, data, where)
            except InvalidInputError as exc:
                errors.append(str(exc))
        raise InvalidInputError(f"{where}: {data!r} matches none of {tp}: " + "; ".join(errors))
    if origin is typing.Literal:
        if data not in typing.get_args(tp):
            raise InvalidInputError(f"{where}: {data!r} is not one of {typing.get_args(tp)}")
        return data
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(data, (list, tuple)):
            raise InvalidInputError(f"{where}: expected a list, got {type(data).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(data))
        if len(args) != len(data):
            raise InvalidInputError(f"{where}: expected {len(args)} items, got {len(data)}")
        return tuple(_decode(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, data, strict=True)))
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(data, list):
            raise InvalidInputError(f"{where}: expected a list, got {type(data).__name__}")
        return [_decode(arg, v, f"{where}[{i}]") for i, v in enumerate(data)]
    if origin in (dict, typing.Mapping) or tp is dict:
        args = typing.get_args(tp) or (str, Any)
        if not isinstance(data, dict):
            raise InvalidInputError(f"{where}: expected an object, got {type(data).__name__}")
        return {
            _decode(args[0], k, f"{where} key"): _decode(args[1], v, f"{where}[{k!r}]")
            for k, v in data.items()
        }
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(data, dict):
            raise InvalidInputError(
                f"{where}: expected an object for {tp.__name__}, got {type(data).__name__}"
            )
        hints = typing.get_type_hints(tp)
        kwargs = {}
        names = {f.name for f in dataclasses.fields(tp) if f.init}
        unknown = set(data) - names
        if unknown:
            raise InvalidInputError(f"{where}: unknown field(s) {sorted(unknown)} for {tp.__name__}")
        for f in dataclasses.fields(tp):
            if not f.init or f.name not in data:
                continue
            kwargs[f.name] = _decode(hints[f.name], data[f.name], f"{where}.{f.name}")
        try:
            return tp(**kwargs)
        except TypeError as exc:
            raise InvalidInputError(f"{where}: cannot build {tp.__name__}: {exc}") from exc
    if tp is float:
        if data is None:
            return float("nan")
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise InvalidInputError(f"{where}: expected a number, got {data!r}")
        return float(data)
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise InvalidInputError(f"{where}: expected an integer, got {data!r}")
        return data
    if tp in (str, bool):
        if not isinstance(data, tp):
            raise InvalidInputError(f"{where}: expected {tp.__name__}, got {data!r}")
        return data
    if tp is type(None):
        if data is not None:
            raise InvalidInputError(f"{where}: expected null, got {data!r}")
        return None
    raise InvalidInputError(f"{where}: cannot decode type {tp!r}")


def dumps(obj: Any) -> str:
    """JSON text for a dataclass, wrapped with its type name and schema version."""
    payload = {
        "schema_version": SCHEMA_VERSION,
        "type": type(obj).__name__,
        "data": to_dict(obj),
    }
    return json.dumps(payload, indent=2, sort_keys=False)


def loads(cls: type[T], text: str, *, source: str = "<string>") -> T:
    """Parse :func:`dumps` output back into a ``cls`` instance."""
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{source}: not valid JSON ({exc})") from exc
    if not isinstance(payload, dict) or "data" not in payload:
        raise InvalidInputError(f"{source}: not a colocate JSON file (no 'data' key)")
    if payload.get("type") != cls.__name__:
        raise InvalidInputError(f"{source}: holds a {payload.get('type')!r}, expected a {cls.__name__!r}")
    version = payload.get("schema_version")
    if version != SCHEMA_VERSION:
        raise InvalidInputError(
            f"{source}: schema_version {version!r} is not supported (this colocate reads "
            f"{SCHEMA_VERSION}); re-create the file with this version"
        )
    return from_dict(cls, payload["data"], where=source)


def save(obj: Any, path: str | Path) -> Path:
    """Write :func:`dumps` of ``obj`` to ``path`` (parents created) and return the path.

    Raises:
        InvalidInputError: the file cannot be written (``path`` is a folder, a file stands where a
            folder is needed, no permission); the message names the path.
    """
    target = Path(path)
    text = dumps(obj) + "\n"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError(
            f"cannot write {target}: {os_error_reason(exc, path=target)}; give a file path you can "
            "write to (not a folder's)"
        ) from exc
    return target


def load(cls: type[T], path: str | Path) -> T:
    """Read a file written by :func:`save`."""
    source = Path(path)
    if not source.is_file():
        raise InvalidInputError(f"{source}: no such file")
    return loads(cls, source.read_text(encoding="utf-8"), source=str(source))
