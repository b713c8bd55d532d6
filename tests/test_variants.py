"""Backend variants: listing, building (ONNX export, cached), profiling, running a plan's choice."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from colocate import serde, zoo
from colocate.devices import cpu_device, find_device
from colocate.ensemble import Ensemble, InputSpec, Member
from colocate.errors import DeviceError, ExportError, UnknownBackendError
from colocate.execution import Executor
from colocate.planning import plan
from colocate.planning.types import MemberBackend, Slot
from colocate.profiling import ProfileCache, ProfileSettings, VariantProfiles, profile_variants
from colocate.variants import (
    backend_variants,
    device_problem,
    parse_backends,
    variant_label,
    variant_member,
)
from tests.execution.helpers import make_plan

QUICK = ProfileSettings(
    warmup=1, repeats=3, max_time_s=0.2, trace_batches=1, kernels=False, thread_scaling=False, energy=False
)


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache directory: ONNX exports and profiles land there, not in the user's."""
    monkeypatch.setenv("COLOCATE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cupy_member() -> Member:
    return Member("gpuonly", "cupy", source=abs, input=InputSpec((-1, 4)))


def test_cpu_lists_torch_and_onnxruntime_not_cuda_graphs(cache: Path) -> None:
    member = zoo.member("mlp", scale="tiny")
    variants = backend_variants(member, cpu_device())
    assert [v.label for v in variants] == ["torch", "onnxruntime"]
    assert variants[0].member is member
    onnx = variants[1].member
    assert onnx.name == "mlp" and onnx.backend == "onnxruntime"
    assert onnx.source_path is not None and onnx.source_path.is_file()
    assert cache in onnx.source_path.parents  # exported into the cache ...
    again = backend_variants(member, cpu_device(), "onnxruntime")
    assert again[1].member.source_path == onnx.source_path  # ... once


def test_a_gpu_lists_cuda_graphs(cache: Path) -> None:
    member = zoo.member("mlp", scale="tiny")
    labels = [v.label for v in backend_variants(member, find_device("sim:h100"), "torch,torch+cudagraph")]
    assert labels == ["torch", "torch+cudagraph"]
    graphed = variant_member(member, "torch+cudagraph", find_device("sim:h100"))
    assert graphed.options == {"cuda_graph": True} and variant_label(graphed) == "torch+cudagraph"
    assert variant_member(graphed, "torch").options == {}
    with pytest.raises(DeviceError, match="member 'mlp': backend variant 'torch\\+cudagraph' cannot run"):
        variant_member(member, "torch+cudagraph", cpu_device())


def test_torch_compile_is_listed_only_when_named(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    member = zoo.member("mlp", scale="tiny")
    assert "torch+compile" not in [v.label for v in backend_variants(member, find_device("sim:h100"))]
    labels = [v.label for v in backend_variants(member, find_device("sim:h100"), "torch,torch+compile")]
    assert labels == ["torch", "torch+compile"]
    compiled = variant_member(member, "torch+compile")
    assert compiled.options == {"compile": True} and variant_label(compiled) == "torch+compile"
    graphed = variant_member(compiled, "torch+cudagraph")
    assert graphed.options == {"cuda_graph": True}  # one torch variant's option replaces the other's
    assert variant_member(compiled, "torch").options == {}
    assert variant_label(dataclasses.replace(member, options={"compile": "max-autotune"})) == "torch+compile"
    # without a C++ compiler the CPU cannot compile: left out when listed, an error when built
    monkeypatch.setattr("colocate.variants.shutil.which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert device_problem("torch+compile", cpu_device()) == (
        "torch.compile needs a C++ compiler on the CPU ('g++' is not on PATH)"
    )
    assert [v.label for v in backend_variants(member, cpu_device(), "torch,torch+compile")] == ["torch"]
    with pytest.raises(DeviceError, match="member 'mlp': backend variant 'torch\\+compile' cannot run on"):
        variant_member(member, "torch+compile", cpu_device())
    assert device_problem("torch+compile", find_device("sim:h100")) is None  # a plan for another machine


def test_a_gpu_without_triton_cannot_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = dataclasses.replace(find_device("sim:h100"), kind="cuda")
    monkeypatch.setattr("colocate.variants.importlib.util.find_spec", lambda name: None)
    assert device_problem("torch+compile", gpu) == (
        "torch.compile needs triton on a GPU (it comes with torch's CUDA wheels)"
    )


def test_bad_backends_name_the_member_value_and_fix() -> None:
    with pytest.raises(
        UnknownBackendError, match="unknown backend 'jax'; choose from torch, torch\\+cudagraph"
    ):
        parse_backends("torch,jax")
    assert parse_backends("auto") is None
    assert parse_backends(["onnxruntime", "torch"]) == ("onnxruntime", "torch")
    with pytest.raises(
        ExportError, match="member 'gpuonly' cannot run as 'onnxruntime': it is a cupy member"
    ):
        backend_variants(_cupy_member(), cpu_device(), "onnxruntime")
    # "auto" leaves out what does not apply instead
    assert [v.label for v in backend_variants(_cupy_member(), cpu_device())] == ["cupy"]
    half = zoo.member("mlp", scale="tiny", precision="fp16")
    with pytest.raises(ExportError, match="runs in fp16; the ONNX export is fp32"):
        variant_member(half, "onnxruntime")


@pytest.mark.parametrize("isolated", [False, True])
def test_profile_variants_then_plan(cache: Path, isolated: bool) -> None:
    member = zoo.member("mlp", scale="tiny")
    ensemble = Ensemble((member,), name="one")
    profiles = profile_variants(
        ensemble, cpu_device(), (2,), settings=QUICK, isolated=isolated, cache=ProfileCache(cache / "p")
    )
    assert profiles.labels == ("torch", "onnxruntime")
    assert profiles.defaults == {"mlp": "torch"}
    assert {p.backend for p in profiles.sets["onnxruntime"].profiles} == {"onnxruntime"}
    assert serde.loads(VariantProfiles, serde.dumps(profiles)) == profiles
    chosen = plan(ensemble, cpu_device(), profiles, batch_size=2, backends=("onnxruntime",))
    assert chosen.backend_of("mlp") is not None
    assert chosen.strategy == "auto+backends"


def test_profile_variants_checks_its_input_before_profiling() -> None:
    with pytest.raises(UnknownBackendError, match="'tflite'"):
        profile_variants(zoo.member("mlp", scale="tiny"), cpu_device(), (1,), backends="tflite")
    with pytest.raises(ExportError, match="member 'gpuonly'"):
        profile_variants(_cupy_member(), cpu_device(), (1,), backends="onnxruntime")


def test_a_plan_variant_the_device_cannot_run_fails_start_naming_the_member() -> None:
    ensemble = Ensemble((zoo.member("mlp", scale="tiny"),), name="one")
    graphed = dataclasses.replace(
        make_plan(Slot("s0", "stream", ("mlp",)), batch_size=1),
        backends=(MemberBackend("mlp", "torch+cudagraph", "torch", ("cuda_graph",)),),
    )
    with pytest.raises(DeviceError, match=r"member 'mlp': backend variant 'torch\+cudagraph'.*need a GPU"):
        Executor(graphed, ensemble).start()


@pytest.mark.parametrize(
    ("kind", "variant"),
    [
        ("stream", MemberBackend("mlp", "onnxruntime", "onnxruntime", (), "torch")),
        ("process", MemberBackend("mlp", "onnxruntime", "onnxruntime", (), "torch")),
        ("stream", MemberBackend("mlp", "torch+compile", "torch", ("compile",), "torch")),
        ("process", MemberBackend("mlp", "torch+compile", "torch", ("compile",), "torch")),
    ],
    ids=["stream-onnxruntime", "process-onnxruntime", "stream-compile", "process-compile"],
)
def test_executor_runs_the_plans_variant_with_the_same_prediction(
    cache: Path, kind: str, variant: MemberBackend
) -> None:
    if variant.label == "torch+compile" and (problem := device_problem("torch+compile", cpu_device())):
        pytest.skip(problem)
    torch_member = zoo.member("mlp", scale="tiny")
    ensemble = Ensemble((torch_member, zoo.member("resnet", scale="tiny")), name="pair")
    batch = torch_member.input.example(3, seed=1)
    slots = (Slot("s0", kind, ("mlp",)), Slot("s1", "stream", ("resnet",)))  # type: ignore[arg-type]
    as_given = make_plan(*slots, batch_size=3)
    onnx_plan = make_plan(*slots, batch_size=3)
    onnx_plan = type(onnx_plan)(
        **{
            **onnx_plan.__dict__,
            "backends": (variant,),
        }
    )
    with Executor(as_given, ensemble, warmup=False) as executor:
        expected = executor.submit(batch, return_members=True).result(timeout=120)
    with Executor(onnx_plan, ensemble, warmup=False) as executor:
        assert variant_label(executor._variants["mlp"]) == variant.label
        got = executor.submit(batch, return_members=True).result(timeout=120)
    assert got.members is not None and expected.members is not None
    np.testing.assert_allclose(got.members["mlp"], expected.members["mlp"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.combined, expected.combined, rtol=1e-4, atol=1e-5)


def test_plans_with_other_variants_are_not_deduplicated() -> None:
    from colocate.comparison import dedupe_plans, profiles_for_plan

    base = make_plan(Slot("s0", "stream", ("mlp",)), batch_size=1)
    onnx = dataclasses.replace(
        base,
        strategy="auto+backends",
        backends=(MemberBackend("mlp", "onnxruntime", "onnxruntime", (), "torch"),),
    )
    same = dataclasses.replace(
        base, strategy="other+backends", backends=(MemberBackend("mlp", "torch", "torch", (), "torch"),)
    )
    assert [p.strategy for p in dedupe_plans([base, onnx, same])] == ["test=other+backends", "auto+backends"]
    cpu = cpu_device()
    from colocate.planning.synthetic import synthetic_profile
    from colocate.profiling import ProfileSet

    eager = ProfileSet((synthetic_profile("mlp", cpu, batch_size=1, latency_s=2e-3),))
    fast = ProfileSet((synthetic_profile("mlp", cpu, batch_size=1, latency_s=1e-3),))
    variants = VariantProfiles(sets={"torch": eager, "onnxruntime": fast}, defaults={"mlp": "torch"})
    assert profiles_for_plan(variants, onnx) == fast
    assert profiles_for_plan(variants, base) == eager


@pytest.mark.gpu
def test_on_a_gpu_the_plan_can_choose_cuda_graphs_and_runs_them(cache: Path, cuda: Any) -> None:
    member = zoo.member("resnet", scale="tiny")
    ensemble = Ensemble((member, zoo.member("mlp", scale="tiny")), name="pair")
    profiles = profile_variants(
        ensemble,
        cuda,
        (1,),
        backends="torch,torch+cudagraph",
        settings=QUICK,
        isolated=False,
        cache=ProfileCache(cache / "p"),
    )
    assert profiles.labels == ("torch", "torch+cudagraph")
    chosen = plan(ensemble, cuda, profiles, batch_size=1, backends="auto")
    graphed = dataclasses.replace(
        chosen, backends=tuple(dataclasses.replace(b, label="torch+cudagraph") for b in chosen.backends)
    )
    batch = member.input.example(1, seed=2)
    with Executor(dataclasses.replace(chosen, backends=()), ensemble) as executor:
        expected = executor.submit(batch, return_members=True).result(timeout=120)
    with Executor(graphed, ensemble) as executor:
        assert all(m.options.get("cuda_graph") for m in executor._variants.values())
        got = executor.submit(batch, return_members=True).result(timeout=120)
    np.testing.assert_allclose(got.combined, expected.combined, rtol=1e-3, atol=1e-4)


def test_calibrate_backends_measures_the_chosen_variants_and_keeps_the_choice(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import colocate.comparison as compare_module

    ensemble = Ensemble((zoo.member("mlp", scale="tiny"), zoo.member("resnet", scale="tiny")), name="pair")
    profiles = profile_variants(
        ensemble, cpu_device(), (2,), settings=QUICK, isolated=False, cache=ProfileCache(cache / "p")
    )
    chosen = plan(ensemble, cpu_device(), profiles, batch_size=2, backends=("onnxruntime",))
    assert chosen.backend_of("mlp") is not None  # at least one member runs as another variant
    seen: list[tuple[Ensemble, Any]] = []
    real = compare_module.calibrate

    def spy(ens: Ensemble, device: Any, profs: Any, **options: Any) -> Any:
        seen.append((ens, profs))
        return real(ens, device, profs, **options)

    monkeypatch.setattr(compare_module, "calibrate", spy)
    replanned, calibration = compare_module.calibrate_backends(
        ensemble, cpu_device(), profiles, chosen, batch_size=2, max_pairs=1, seconds=0.3, max_plans=2
    )
    ((as_run, run_profiles),) = seen
    # the calibration measured the members as the plan runs them, under the same names
    assert [m.name for m in as_run.members] == ["mlp", "resnet"]
    for choice in chosen.backends:
        assert as_run.member(choice.member).backend == choice.backend
        assert {p.backend for p in run_profiles.profiles if p.member == choice.member} == {choice.backend}
    assert replanned.backends == chosen.backends
    assert replanned.strategy == chosen.strategy
    assert any("laid out again" in line for line in replanned.explanation)
    # the pick (at least) ran as the variants, which gives the variants' own time scale
    assert calibration.plans and all(p.round_sps for p in calibration.plans)
    assert calibration.time_scale != 1.0
    batch = ensemble.members[0].input.example(2, seed=3)
    with Executor(replanned, ensemble, warmup=False) as executor:
        assert executor._variants["mlp"].backend == chosen.backend_of("mlp").backend  # type: ignore[union-attr]
        assert executor.predict(batch).shape == (2, 10)


def test_calibrate_backends_refuses_a_plan_without_variants() -> None:
    import colocate.comparison as compare_module
    from colocate.errors import InvalidInputError

    as_given = make_plan(Slot("s0", "stream", ("mlp",)), batch_size=1)
    ensemble = Ensemble((zoo.member("mlp", scale="tiny"),), name="one")
    empty = VariantProfiles(sets={}, defaults={})
    with pytest.raises(InvalidInputError, match="chose no backend variants"):
        compare_module.calibrate_backends(ensemble, cpu_device(), empty, as_given)
