"""Every zoo member loads and infers on every CPU backend, and the backends agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from colocate import Device, zoo
from colocate.backends import create_runner


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.mark.parametrize("arch", zoo.ARCHITECTURES)
def test_torch_and_onnxruntime_agree(arch: str, cpu: Device, onnx_dir: Path) -> None:
    torch_member = zoo.member(arch, scale="tiny")
    ort_member = zoo.member(arch, scale="tiny", backend="onnxruntime", onnx_dir=str(onnx_dir))
    batch = torch_member.input.example(3, seed=7)
    with create_runner(torch_member, cpu) as runner:
        torch_out = runner.infer(batch)
    with create_runner(ort_member, cpu) as runner:
        ort_out = runner.infer(batch)
    assert torch_out.shape == ort_out.shape == (3, 10)
    assert np.isfinite(torch_out).all()
    np.testing.assert_allclose(ort_out, torch_out, rtol=1e-3, atol=1e-4)


def test_default_ensemble_combines_on_both_backends(cpu: Device, onnx_dir: Path) -> None:
    for backend in ("torch", "onnxruntime"):
        ensemble = zoo.default_ensemble(scale="tiny", backend=backend, onnx_dir=str(onnx_dir))
        outputs = {}
        for member in ensemble.members:
            with create_runner(member, cpu) as runner:
                outputs[member.name] = runner.infer(member.input.example(4))
        combined = ensemble.combine_outputs(outputs)
        assert combined.shape == (4, 10)
        np.testing.assert_allclose(combined.sum(axis=1), 1.0, rtol=1e-9)
