"""Environment variables and library defaults.

- ``COLOCATE_CACHE_DIR``: where colocate keeps profiles, ONNX exports and
  TensorRT engines (default ``$XDG_CACHE_HOME/colocate`` or ``~/.cache/colocate``).
"""

from __future__ import annotations

import os
from pathlib import Path

from colocate.errors import InvalidInputError, os_error_reason

DEFAULT_WARMUP = 3  # untimed runs before timing
DEFAULT_REPEATS = 20  # timed runs per measurement
DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 8, 32)


def cache_dir(*parts: str) -> Path:
    """The user's colocate cache directory (created, mode 0700), or a subdirectory of it.

    Raises:
        InvalidInputError: the folder cannot be made (a file in the way, no permission); the
            message names the folder and says to set ``COLOCATE_CACHE_DIR``.
    """
    root_env = os.environ.get("COLOCATE_CACHE_DIR")
    if root_env:
        root = Path(root_env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "colocate"
    path = root.joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        where = f"$COLOCATE_CACHE_DIR={root_env}" if root_env else "the default"
        raise InvalidInputError(
            f"cannot make the colocate cache folder {path} ({where}): {os_error_reason(exc)}; "
            "set COLOCATE_CACHE_DIR to a folder you can write to"
        ) from exc
    return path
