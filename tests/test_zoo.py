"""Tests of colocate.zoo: the embedded default ensemble (CPU only)."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from colocate import zoo
from colocate.ensemble import Ensemble, InputSpec, Member
from colocate.errors import BackendUnavailableError, InvalidInputError, ModelLoadError

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")


def _batch(scale: zoo.Scale, batch_size: int, seed: int = 0) -> torch.Tensor:
    shape = (batch_size, *zoo.input_shape(scale)[1:])
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- building and running --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", zoo.ARCHITECTURES)
@pytest.mark.parametrize("num_classes", [10, 7])
def test_tiny_models_run_and_return_finite_logits(arch: str, num_classes: int) -> None:
    model = zoo.build_model(arch, scale="tiny", num_classes=num_classes)
    assert isinstance(model, torch.nn.Module)
    assert not model.training
    with torch.no_grad():
        out = model(_batch("tiny", 2))
    assert out.shape == (2, num_classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_input_shapes() -> None:
    assert zoo.input_shape("tiny") == (-1, 3, 32, 32)
    assert zoo.input_shape("small") == (-1, 3, 64, 64)
    assert zoo.input_shape("large") == (-1, 3, 224, 224)
    assert zoo.input_shape(1.5) == zoo.input_shape("small")
    assert zoo.input_shape() == zoo.input_shape("small")


def test_public_constants() -> None:
    assert zoo.ARCHITECTURES == ("resnet", "mobilenet", "efficientnet", "vit", "mlp")
    assert zoo.SCALES == ("tiny", "small", "large")


# --- seeding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", zoo.ARCHITECTURES)
def test_same_seed_same_weights_other_seed_other_weights(arch: str) -> None:
    a = zoo.build_model(arch, scale="tiny", seed=3)
    b = zoo.build_model(arch, scale="tiny", seed=3)
    c = zoo.build_model(arch, scale="tiny", seed=4)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)
    x = _batch("tiny", 2)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_build_model_leaves_global_rng_untouched() -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    zoo.build_model("vit", scale="tiny", seed=0)
    zoo.build_model("resnet", scale="tiny", seed=99)
    assert torch.equal(torch.get_rng_state(), before)


def test_architectures_draw_from_different_seeds() -> None:
    # e.g. the tiny resnet and mobilenet stems are both (8, 3, 3, 3) convolutions: with one
    # shared seed they would start with the same random values
    firsts = []
    for arch in zoo.ARCHITECTURES:
        params = list(zoo.build_model(arch, scale="tiny", seed=0).parameters())
        firsts.append(params[0].flatten()[:8].clone())
    for i in range(len(firsts)):
        for j in range(i + 1, len(firsts)):
            assert not torch.equal(firsts[i], firsts[j])


# --- the size knob -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", zoo.ARCHITECTURES)
def test_parameter_count_grows_with_scale(arch: str) -> None:
    counts = [zoo.count_parameters(zoo.build_model(arch, scale=s)) for s in zoo.SCALES]
    assert counts[0] < counts[1] < counts[2], counts
    floats = [zoo.count_parameters(zoo.build_model(arch, scale=s)) for s in (0.5, 1.0, 2.0)]
    assert floats[0] < floats[1] < floats[2], floats


@pytest.mark.parametrize("arch", zoo.ARCHITECTURES)
def test_float_scale_one_is_small(arch: str) -> None:
    assert _same_weights(zoo.build_model(arch, scale=1.0), zoo.build_model(arch, scale="small"))


def test_large_models_are_big() -> None:
    counts = {arch: zoo.count_parameters(zoo.build_model(arch, scale="large")) for arch in zoo.ARCHITECTURES}
    assert sum(c >= 10_000_000 for c in counts.values()) >= 2, counts
    assert all(c >= 1_000_000 for c in counts.values()), counts


def test_count_parameters() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    assert zoo.count_parameters(model) == 4 * 3 + 3 + 3 * 2 + 2


# --- errors --------------------------------------------------------------------------------------


def test_unknown_arch_is_named() -> None:
    with pytest.raises(InvalidInputError, match="alexnet") as info:
        zoo.build_model("alexnet")
    assert "resnet" in str(info.value)
    with pytest.raises(InvalidInputError, match="alexnet"):
        zoo.member("alexnet")
    with pytest.raises(InvalidInputError, match="alexnet"):
        zoo.ModelFactory("alexnet")


@pytest.mark.parametrize("scale", ["huge", 0.0, -1.0, float("nan"), True, "Small"])
def test_bad_scale_is_rejected(scale: object) -> None:
    with pytest.raises(InvalidInputError, match="scale"):
        zoo.build_model("mlp", scale=scale)  # type: ignore[arg-type]


def test_unknown_scale_names_the_choices() -> None:
    with pytest.raises(InvalidInputError) as info:
        zoo.input_shape("huge")
    message = str(info.value)
    assert "huge" in message
    assert all(s in message for s in zoo.SCALES)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
def test_bad_num_classes_is_rejected(num_classes: object) -> None:
    with pytest.raises(InvalidInputError, match="num_classes"):
        zoo.build_model("mlp", scale="tiny", num_classes=num_classes)  # type: ignore[arg-type]


# --- ModelFactory ----------------------------------------------------------------------------------


def test_model_factory_pickles_and_builds_the_same_weights() -> None:
    factory = zoo.ModelFactory("efficientnet", scale="tiny", num_classes=5, seed=7)
    clone = pickle.loads(pickle.dumps(factory))
    assert clone == factory
    assert hash(clone) == hash(factory)
    assert "efficientnet" in repr(factory)
    assert _same_weights(factory(), clone())
    assert _same_weights(factory(), zoo.build_model("efficientnet", scale="tiny", num_classes=5, seed=7))


def test_model_factory_is_frozen() -> None:
    factory = zoo.ModelFactory("mlp")
    with pytest.raises(AttributeError):
        factory.arch = "vit"  # type: ignore[misc]


def test_built_models_pickle_and_deepcopy() -> None:
    import copy

    model = zoo.build_model("vit", scale="tiny")
    x = _batch("tiny", 2)
    with torch.no_grad():
        ref = model(x)
        for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert type(other) is type(model)
            assert _same_weights(model, other)
            assert torch.equal(other(x), ref)


def test_member_describe_shows_the_recipe() -> None:
    m = zoo.member("resnet", scale="tiny", seed=2)
    source = m.describe()["source"]
    assert "build_model" in source and "'resnet'" in source and "seed=2" in source


def test_import_does_not_import_torch() -> None:
    code = "import sys, colocate.zoo; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- ONNX export -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", zoo.ARCHITECTURES)
def test_export_onnx_runs_in_onnxruntime_with_dynamic_batch(arch: str, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    factory = zoo.ModelFactory(arch, scale="tiny")
    path = zoo.export_onnx(factory, tmp_path / f"{arch}.onnx", input_shape=zoo.input_shape("tiny"))
    assert path == tmp_path / f"{arch}.onnx" and path.is_file()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["output"]
    model = factory()
    for batch_size in (3, 1):
        x = _batch("tiny", batch_size, seed=batch_size)
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == (batch_size, 10)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_export_onnx_overwrites_and_restores_training_mode(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    model = zoo.build_model("mlp", scale="tiny").train()
    path = tmp_path / "sub" / "mlp.onnx"
    zoo.export_onnx(model, path, input_shape=zoo.input_shape("tiny"))
    first = path.stat().st_size
    zoo.export_onnx(model, str(path), input_shape=zoo.input_shape("tiny"))
    assert path.stat().st_size == first
    assert model.training


def test_export_onnx_fixed_batch(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    path = zoo.export_onnx(
        zoo.ModelFactory("mlp", scale="tiny"),
        tmp_path / "m.onnx",
        input_shape=(4, 3, 32, 32),
        dynamic_batch=False,
    )
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4


def test_export_onnx_falls_back_to_torch_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")

    def no_legacy(*args: object, **kwargs: object) -> None:
        raise TypeError("legacy exporter removed")

    monkeypatch.setattr(zoo, "_export_legacy", no_legacy)
    factory = zoo.ModelFactory("mlp", scale="tiny")
    path = zoo.export_onnx(factory, tmp_path / "mlp.onnx", input_shape=zoo.input_shape("tiny"))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _batch("tiny", 3)
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, factory()(x).numpy(), rtol=1e-3, atol=1e-4)


def test_export_onnx_reports_a_failing_factory(tmp_path: Path) -> None:
    pytest.importorskip("onnx")

    def broken() -> torch.nn.Module:
        raise RuntimeError("boom")

    with pytest.raises(ModelLoadError, match="boom"):
        zoo.export_onnx(broken, tmp_path / "x.onnx", input_shape=(-1, 4))


def test_export_onnx_without_onnx_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(BackendUnavailableError, match=r"colocate\[onnx\]"):
        zoo.export_onnx(
            zoo.ModelFactory("mlp", scale="tiny"), tmp_path / "x.onnx", input_shape=(-1, 3, 32, 32)
        )


# --- members and the default ensemble --------------------------------------------------------------


def test_member_for_torch() -> None:
    m = zoo.member("vit", scale="tiny", name="vit-a", seed=1, num_classes=4, precision="fp16")
    assert isinstance(m, Member)
    assert m.name == "vit-a" and m.backend == "torch" and m.precision == "fp16"
    assert m.source == zoo.ModelFactory("vit", scale="tiny", num_classes=4, seed=1)
    assert m.input == InputSpec(shape=(-1, 3, 32, 32), dtype="float32")
    assert zoo.member("mlp").name == "mlp"


def test_onnx_member_needs_onnx_dir() -> None:
    with pytest.raises(InvalidInputError, match="onnx_dir"):
        zoo.member("vit", backend="onnxruntime")
    with pytest.raises(InvalidInputError, match="onnx_dir"):
        zoo.member("vit", backend="tensorrt")


def test_member_rejects_unsupported_backend() -> None:
    with pytest.raises(InvalidInputError, match="cupy"):
        zoo.member("mlp", backend="cupy")


def test_onnx_member_exports_a_file(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    m = zoo.member("mlp", scale="tiny", backend="onnxruntime", onnx_dir=tmp_path)
    assert m.backend == "onnxruntime"
    assert m.source_path is not None and m.source_path.is_file()
    assert m.source_path.parent == tmp_path
    other = zoo.member("mlp", scale="small", backend="onnxruntime", onnx_dir=tmp_path)
    assert other.source_path != m.source_path  # scales do not overwrite each other's files


@pytest.mark.parametrize("scale", zoo.SCALES)
def test_default_ensemble_members(scale: str) -> None:
    ensemble = zoo.default_ensemble(scale=scale)
    assert isinstance(ensemble, Ensemble)
    assert ensemble.name == f"default-{scale}"
    assert ensemble.member_names == zoo.ARCHITECTURES
    assert len(set(ensemble.member_names)) == 5
    assert all(m.backend == "torch" for m in ensemble.members)
    assert all(m.input.shape == zoo.input_shape(scale) for m in ensemble.members)
    assert ensemble.combine == "mean"


def test_default_ensemble_onnxruntime(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    ensemble = zoo.default_ensemble(scale="tiny", backend="onnxruntime", combine="vote", onnx_dir=tmp_path)
    assert len(set(ensemble.member_names)) == 5
    assert all(m.backend == "onnxruntime" and m.source_path is not None for m in ensemble.members)
    assert ensemble.combine == "vote"


def test_small_default_ensemble_forward_batch_8() -> None:
    ensemble = zoo.default_ensemble(scale="small")
    batch = ensemble.members[0].input.example(8)
    outputs = {}
    start = time.perf_counter()
    with torch.no_grad():
        for m in ensemble.members:
            m.input.check(m.name, batch)
            outputs[m.name] = m.source()(torch.from_numpy(batch)).numpy()
    elapsed = time.perf_counter() - start
    print(f"small default ensemble, batch 8, build + forward: {elapsed * 1000:.0f} ms")
    combined = ensemble.combine_outputs(outputs)
    assert combined.shape == (8, 10)
    np.testing.assert_allclose(combined.sum(axis=1), 1.0, rtol=1e-6)


def test_build_model_is_thread_safe() -> None:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from colocate import zoo as zoo_module

    def weights(arch: str) -> list[torch.Tensor]:
        return [p.detach().clone() for p in zoo_module.build_model(arch, scale="tiny").parameters()]

    expected = {arch: weights(arch) for arch in ("resnet", "vit")}
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda a: (a, weights(a)), ["resnet", "vit"] * 4))
    for arch, got in results:
        assert all(torch.equal(x, y) for x, y in zip(got, expected[arch], strict=True)), arch
