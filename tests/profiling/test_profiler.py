from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from colocate import (
    BackendUnavailableError,
    Device,
    InputSpec,
    InvalidInputError,
    Member,
    serde,
    zoo,
)
from colocate.profiling import ProfileCache, ProfileSet, ProfileSettings, profile
from colocate.profiling.cache import cache_key

FAST = ProfileSettings(warmup=1, repeats=5, max_time_s=0.2, trace_batches=1, thread_scaling=False)


def linear_512() -> torch.nn.Module:
    return torch.nn.Linear(512, 512, bias=False)


def linear_512x2() -> torch.nn.Module:
    return torch.nn.Linear(512, 1024, bias=False)


class OomAbove4(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.proj(x)


def linear_member(name: str, factory: object, features: int = 512) -> Member:
    return Member(name=name, backend="torch", source=factory, input=InputSpec((-1, features)))


def test_memory_grows_with_batch_size(cpu: Device, tmp_path: Path) -> None:
    member = zoo.member("resnet", scale="tiny")
    result = profile(member, cpu, (1, 32), settings=FAST, cache=ProfileCache(tmp_path))
    small, large = result.get("resnet", 1), result.get("resnet", 32)
    assert small is not None and large is not None and small.memory and large.memory
    assert large.memory.peak_activation_bytes > small.memory.peak_activation_bytes > 0
    assert large.memory.weights_bytes == small.memory.weights_bytes > 0


def test_weights_grow_with_size_knob(cpu: Device, tmp_path: Path) -> None:
    tiny = zoo.member("mobilenet", scale="tiny", name="m_tiny")
    small = zoo.member("mobilenet", scale="small", name="m_small")
    result = profile([tiny, small], cpu, (1,), settings=FAST, cache=ProfileCache(tmp_path))
    w_tiny = result.get("m_tiny", 1).memory.weights_bytes  # type: ignore[union-attr]
    w_small = result.get("m_small", 1).memory.weights_bytes  # type: ignore[union-attr]
    assert w_small > w_tiny


def test_twice_the_parameters_twice_the_weights(cpu: Device, tmp_path: Path) -> None:
    members = [linear_member("one", linear_512), linear_member("two", linear_512x2)]
    result = profile(members, cpu, (4,), settings=FAST, cache=ProfileCache(tmp_path))
    one = result.get("one", 4).memory.weights_bytes  # type: ignore[union-attr]
    two = result.get("two", 4).memory.weights_bytes  # type: ignore[union-attr]
    assert one == 512 * 512 * 4
    assert 1.9 < two / one < 2.1


def test_latency_percentiles_ordered_and_cpu_footprint(cpu: Device, tmp_path: Path) -> None:
    settings = ProfileSettings(warmup=1, repeats=8, max_time_s=0.5, trace_batches=1)
    p = profile(zoo.member("mlp", scale="tiny"), cpu, (8,), settings=settings, cache=False).profiles[0]
    assert p.ok and p.latency is not None
    assert 0 < p.latency.median_s <= p.latency.p90_s <= p.latency.p99_s
    assert p.throughput_sps == pytest.approx(8 / p.latency.median_s)
    assert p.cpu is not None and 0.0 <= p.cpu.busy_share <= 1.0
    # the timed window is about a millisecond: a 10 ms CPU clock (os.times) read 0 or 1 here,
    # and the planner took a 0 for "not measured"
    assert p.cpu.busy_share > 0.0
    assert p.cpu.busy_share < 1.0 or p.cpu.threads > 1
    assert p.cpu.thread_scaling[0][0] == 1
    assert p.cpu.top_ops and sum(share for _, share in p.cpu.top_ops) <= 1.0 + 1e-9
    assert p.kernels is None and p.energy is None and p.host_share is None
    assert p.versions["torch"] == torch.__version__ and p.model_hash


def test_cache_hits_and_misses_by_key(cpu: Device, tmp_path: Path) -> None:
    cache = ProfileCache(tmp_path)
    member = zoo.member("mlp", scale="tiny")
    first = profile(member, cpu, (1, 2), settings=FAST, cache=cache)
    assert (cache.hits, cache.misses) == (0, 2)
    again = profile(member, cpu, (1, 2), settings=FAST, cache=cache)
    assert (cache.hits, cache.misses) == (2, 2)
    assert again == first
    profile(member, cpu, (3,), settings=FAST, cache=cache)  # new batch size
    assert cache.misses == 3
    profile(zoo.member("mlp", scale="tiny", precision="bf16"), cpu, (1,), settings=FAST, cache=cache)
    assert cache.misses == 4  # new precision
    other_cpu = Device(kind="cpu", name=cpu.name, memory_total_bytes=cpu.memory_total_bytes, cpu_cores=99)
    profile(member, other_cpu, (1,), settings=FAST, cache=cache)
    assert cache.misses == 5  # another device
    profile(zoo.member("mlp", scale="tiny", seed=1), cpu, (1,), settings=FAST, cache=cache)
    assert cache.misses == 6  # other weights
    assert len(list(tmp_path.glob("*.json"))) == 6
    # what changes the figures without changing the model: each a new measurement, not a hit
    wider = dataclasses.replace(member, input=InputSpec((-1, *(2 * d for d in member.input.shape[1:]))))
    assert cache_key(wider, cpu, 1, "m") != cache_key(member, cpu, 1, "m")  # larger inputs
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        profile(member, cpu, (1,), settings=FAST, cache=cache)
        assert cache.misses == 7  # torch's thread count, process-wide
    finally:
        torch.set_num_threads(threads)
    profile(member, cpu, (1,), settings=dataclasses.replace(FAST, thread_scaling=True), cache=cache)
    assert cache.misses == 8  # a profile without the thread scaling is not one with it
    again_scaled = profile(
        member, cpu, (1,), settings=dataclasses.replace(FAST, thread_scaling=True), cache=cache
    )
    assert cache.hits == 3 and again_scaled.profiles[0].cpu is not None
    assert again_scaled.profiles[0].cpu.thread_scaling != ()


def test_a_model_other_than_the_recorded_one_is_named() -> None:
    from colocate import zoo
    from colocate.ensemble import InputSpec, Member
    from colocate.profiling.cache import model_hash, model_mismatches, quick_model_hash

    tiny, small = zoo.member("mlp", scale="tiny"), zoo.member("mlp", scale="small")
    assert quick_model_hash(tiny) == model_hash(tiny)  # from the factory's key: nothing is built
    assert model_mismatches([tiny], {"mlp": model_hash(tiny)}) == []
    (line,) = model_mismatches([tiny], {"mlp": model_hash(small)})
    assert line.startswith("'mlp' (planned or profiled for model ") and model_hash(tiny)[:8] in line
    assert model_mismatches([tiny], {}) == []  # nothing recorded: nothing to check
    assert model_mismatches([tiny], {"mlp": "synthetic-mlp"}) == []  # made-up profiles: not checked
    module = Member("plain", "torch", source=torch.nn.Linear(4, 2), input=InputSpec((-1, 4)))
    assert quick_model_hash(module) is None  # would need its weights hashed: not checked
    assert model_mismatches([module], {"plain": "0" * 20}) == []


def test_profiles_round_trip_through_json(cpu: Device, tmp_path: Path) -> None:
    result = profile(zoo.member("vit", scale="tiny"), cpu, (1, 2), settings=FAST, cache=False)
    path = serde.save(result, tmp_path / "profiles.json")
    assert serde.load(ProfileSet, path) == result


def test_out_of_memory_recorded_and_run_goes_on(cpu: Device, tmp_path: Path) -> None:
    members = [linear_member("hungry", OomAbove4, features=8), zoo.member("mlp", scale="tiny")]
    result = profile(members, cpu, (1, 4, 8, 16), settings=FAST, cache=ProfileCache(tmp_path))
    statuses = {p.batch_size: p.status for p in result.profiles if p.member == "hungry"}
    assert statuses == {1: "ok", 4: "ok", 8: "out_of_memory", 16: "out_of_memory"}
    oom = result.get("hungry", 8)
    assert oom is not None and oom.max_fitting_batch == 4 and "out of memory" in (oom.error or "")
    assert all(p.ok for p in result.profiles if p.member == "mlp")


def test_missing_backend_names_the_member(
    cpu: Device, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    member = Member(name="onnx_member", backend="onnxruntime", source=model, input=InputSpec((-1, 4)))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendUnavailableError, match=r"member 'onnx_member'.*colocate\[onnx\]"):
        profile(member, cpu, (1,), settings=FAST, cache=False)


def test_input_spec_mismatch_names_the_member(cpu: Device) -> None:
    wrong = linear_member("wrong_spec", linear_512, features=500)
    with pytest.raises(InvalidInputError, match="member 'wrong_spec': running a batch of shape"):
        profile(wrong, cpu, (1,), settings=FAST, cache=False)


def test_onnxruntime_member_on_cpu(cpu: Device, tmp_path: Path) -> None:
    member = zoo.member("mlp", scale="tiny", backend="onnxruntime", onnx_dir=str(tmp_path))
    p = profile(member, cpu, (2,), settings=FAST, cache=False).profiles[0]
    assert p.ok and p.memory is not None and p.memory.weights_bytes > 0
    assert p.versions["onnxruntime"]


def test_simulated_device_rejected() -> None:
    sim = Device(kind="simulated", name="H100 (simulated)")
    with pytest.raises(InvalidInputError, match="cannot profile"):
        profile(zoo.member("mlp", scale="tiny"), sim, (1,))


@pytest.mark.parametrize("sizes", [(), (0,), (-1, 2)])
def test_bad_batch_sizes(cpu: Device, sizes: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInputError, match="batch sizes"):
        profile(zoo.member("mlp", scale="tiny"), cpu, sizes)


# --- GPU -----------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_profile_kernels_memory_energy(cuda: Device) -> None:
    settings = ProfileSettings(warmup=2, repeats=10, trace_batches=3, energy_min_time_s=0.3)
    result = profile(zoo.member("resnet", scale="small"), cuda, (1, 16), settings=settings, cache=False)
    small, large = result.get("resnet", 1), result.get("resnet", 16)
    assert small is not None and large is not None and small.ok and large.ok
    assert small.memory and large.memory
    assert large.memory.peak_activation_bytes > small.memory.peak_activation_bytes
    assert small.memory.weights_bytes > 0
    assert small.kernels is not None and small.kernels.kernels_per_batch >= 5
    assert 0 < small.kernels.busy_fraction <= 1 and 0 < small.kernels.sm_fill <= 1
    assert small.host_share is not None and 0 < small.host_share <= 1
    assert large.kernels is not None and large.kernels.kernel_time_s > small.kernels.kernel_time_s


def test_nvml_fallback_footprint_only_claims_busy_fraction() -> None:
    from colocate.profiling import EnergyFootprint
    from colocate.profiling.profiler import nvml_busy_footprint

    fp = nvml_busy_footprint(EnergyFootprint(300.0, 0.1, 42.0, "nvml total energy"))
    assert fp is not None and fp.busy_fraction == pytest.approx(0.42)
    assert fp.source.startswith("nvml sampling") and fp.kernels_per_batch == 0 and fp.occupancy_pct is None
    assert nvml_busy_footprint(EnergyFootprint(300.0, 0.1, None, "nvml power samples")) is None


def test_profile_isolated_matches_the_cache_of_an_in_process_run(
    cpu: Device, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from colocate.profiling import profile_isolated

    monkeypatch.setenv("COLOCATE_CACHE_DIR", str(tmp_path))
    member = zoo.member("mlp", scale="tiny")
    isolated = profile_isolated(member, cpu, (1, 2), settings=FAST)
    assert [p.batch_size for p in isolated.profiles] == [1, 2] and all(p.ok for p in isolated.profiles)
    cache = ProfileCache(tmp_path / "profiles")
    again = profile(member, cpu, (1, 2), settings=FAST, cache=cache)
    assert (cache.hits, cache.misses) == (2, 0)  # the child's measurements landed in the user cache
    assert again == isolated


def test_cached_profile_takes_the_asking_members_name(cpu: Device, tmp_path: Path) -> None:
    cache = ProfileCache(tmp_path)
    profile(zoo.member("mlp", scale="tiny"), cpu, (1,), settings=FAST, cache=cache)
    renamed = profile(zoo.member("mlp", scale="tiny", name="mlp-0"), cpu, (1,), settings=FAST, cache=cache)
    assert cache.hits == 1 and renamed.profiles[0].member == "mlp-0"
