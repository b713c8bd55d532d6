"""How a worker's reply carries the members' outputs (processes.pack_outputs / unpack_outputs)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from colocate.execution.processes import pack_outputs, unpack_outputs


def _round_trip(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # as through the pipe: pickled by the worker, unpickled by the front
    return unpack_outputs(pickle.loads(pickle.dumps(pack_outputs(outputs), pickle.HIGHEST_PROTOCOL)))


def test_outputs_of_one_shape_and_dtype_travel_in_one_buffer_and_come_back_writable() -> None:
    rng = np.random.default_rng(0)
    outputs = {name: rng.normal(size=(3, 7)).astype(np.float32) for name in ("resnet", "vit", "mlp")}
    packed = pack_outputs(outputs)
    assert isinstance(packed, tuple)
    names, shape, dtype, data = packed
    assert names == ("resnet", "vit", "mlp") and shape == (3, 7) and dtype == "<f4"
    assert len(data) == 3 * 3 * 7 * 4
    back = _round_trip(outputs)
    assert list(back) == ["resnet", "vit", "mlp"]  # the members' order is kept
    for name, array in outputs.items():
        np.testing.assert_array_equal(back[name], array)
        assert back[name].dtype == np.float32 and back[name].flags.writeable
    back["resnet"][:] = 0.0  # one member's array is its own: the others keep their values
    np.testing.assert_array_equal(back["vit"], outputs["vit"])


@pytest.mark.parametrize(
    "outputs",
    [
        {"a": np.ones((2, 3), np.float32), "b": np.zeros((2, 4), np.float32)},  # shapes differ
        {"a": np.ones((2, 3), np.float32), "b": np.arange(6, dtype=np.float64).reshape(2, 3)},  # dtypes
    ],
    ids=["shapes", "dtypes"],
)
def test_outputs_that_differ_travel_one_by_one(outputs: dict[str, np.ndarray]) -> None:
    assert isinstance(pack_outputs(outputs), list)
    back = _round_trip(outputs)
    for name, array in outputs.items():
        np.testing.assert_array_equal(back[name], array)
        assert back[name].dtype == array.dtype and back[name].shape == array.shape


def test_a_non_contiguous_output_is_packed_by_value() -> None:
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    outputs = {"a": base.T, "b": base.T[::-1]}  # transposed views: not C-contiguous
    back = _round_trip(outputs)
    np.testing.assert_array_equal(back["a"], base.T)
    np.testing.assert_array_equal(back["b"], base.T[::-1])
