#!/usr/bin/env python3
"""Your own ensemble: a torch member and an ONNX member, combined by majority vote.

    python examples/custom_ensemble.py

It builds two small classifiers, exports one to ONNX, declares both as members
(recipes: nothing is loaded yet), runs each on the CPU with its backend, and
combines their predictions.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from colocate import Ensemble, InputSpec, Member
from colocate.backends import create_runner
from colocate.devices import cpu_device
from colocate.zoo import export_onnx

FEATURES, CLASSES = 32, 4


def build_head() -> torch.nn.Module:
    """A small classifier head (module-level, so the member can go to a worker process)."""
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 64), torch.nn.GELU(), torch.nn.Linear(64, CLASSES))


def main() -> None:
    spec = InputSpec((-1, FEATURES))
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(build_head, Path(tmp) / "head.onnx", input_shape=spec.shape)
        ensemble = Ensemble(
            members=(
                Member("head_torch", backend="torch", source=build_head, input=spec),
                Member("head_onnx", backend="onnxruntime", source=onnx_path, input=spec),
                Member("head_bf16", backend="torch", source=build_head, input=spec, precision="bf16"),
            ),
            combine="vote",
        )
        batch = spec.example(6, seed=3)
        device = cpu_device()
        outputs = {}
        for member in ensemble.members:
            with create_runner(member, device) as runner:
                outputs[member.name] = runner.infer(batch)
        shares = ensemble.combine_outputs(outputs)
    print("vote shares per sample:")
    for row in shares:
        print("  " + " ".join(f"{v:.2f}" for v in row), "-> class", int(row.argmax()))


if __name__ == "__main__":
    main()
