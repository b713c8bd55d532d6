"""What every benchmark result carries: date, command, device, versions."""

from __future__ import annotations

import datetime as dt
import json
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from colocate import serde
from colocate.devices import Device

ROOT = Path(__file__).resolve().parent.parent


def device_tag(device: Device) -> str:
    """``cpu`` or the GPU's name as a file-name slug (e.g. ``nvidia-h200``)."""
    if device.kind == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device.name.lower()).strip("-") or device.kind


def int_list(text: str) -> list[int]:
    """``"1,8,64"`` -> ``[1, 8, 64]`` (empty items skipped)."""
    return [int(x) for x in text.split(",") if x.strip()]


def word_list(text: str) -> list[str]:
    """``"a, b"`` -> ``["a", "b"]`` (empty items skipped)."""
    return [x.strip() for x in text.split(",") if x.strip()]


def save_figure(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as the PNG beside a result (its folder made), and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def versions() -> dict[str, str | None]:
    """Versions of Python, colocate, the frameworks, and the git commit."""
    from colocate import __version__

    found: dict[str, str | None] = {"python": platform.python_version(), "colocate": __version__}
    for module in ("torch", "numpy", "onnxruntime", "cupy", "networkx"):
        try:
            found[module] = str(__import__(module).__version__)
        except ImportError:
            found[module] = None
    try:
        import torch

        found["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    found["git_commit"] = commit if len(commit) == 40 else None  # a copied tree has no history
    return found


def write_result(path: str | Path, kind: str, device: Device, payload: dict[str, Any]) -> Path:
    """Write a benchmark result JSON with the metadata every result carries."""
    result = {
        "kind": kind,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": serde.to_dict(device),
        "versions": versions(),
        **payload,
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1) + "\n")
    return target
