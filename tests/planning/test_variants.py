"""The planner chooses each member's backend variant (``plan(..., backends=...)``) on synthetic profiles."""

from __future__ import annotations

import dataclasses

import pytest

from colocate import serde
from colocate.devices import find_device
from colocate.errors import InvalidInputError, UnknownBackendError
from colocate.planning import plan, plan_all, render_plan
from colocate.planning.synthetic import synthetic_profile
from colocate.planning.types import Plan
from colocate.profiling import ProfileSet, VariantProfiles


def _variant_profiles(**sets: dict[str, dict[str, float]]) -> VariantProfiles:
    """label -> member -> synthetic_profile keyword figures, on a simulated H100, at batch 1."""
    device = find_device("sim:h100")
    built = {}
    for label, members in sets.items():
        profiles = []
        for name, figures in members.items():
            p = synthetic_profile(name, device, batch_size=1, **figures)
            if label == "onnxruntime":
                p = dataclasses.replace(p, backend="onnxruntime")
            profiles.append(p)
        built[label.replace("_", "+")] = ProfileSet(tuple(profiles))
    members = {name for s in built.values() for name in s.members}
    return VariantProfiles(sets=built, defaults={m: "torch" for m in sorted(members)})


def _figures(latency_ms: float, weights_mib: float = 100.0) -> dict[str, float]:
    return {
        "latency_s": latency_ms / 1e3,
        "busy": 0.5,
        "sm_fill": 0.5,
        "host_share": 0.9,
        "weights_mib": weights_mib,
    }


def test_planner_picks_the_faster_variant_and_records_it() -> None:
    profiles = _variant_profiles(
        torch={"resnet": _figures(8.0), "mlp": _figures(1.0)},
        torch_cudagraph={"resnet": _figures(2.0), "mlp": _figures(1.5)},
    )
    device = find_device("sim:h100")
    chosen = plan(["resnet", "mlp"], device, profiles, batch_size=1, backends="auto")
    assert chosen.strategy == "auto+backends"
    by_member = {b.member: b for b in chosen.backends}
    assert by_member["resnet"].label == "torch+cudagraph"
    assert by_member["resnet"].backend == "torch"
    assert by_member["resnet"].options == ("cuda_graph",)
    assert by_member["resnet"].speedup_alone == pytest.approx(4.0, rel=0.05)
    assert by_member["mlp"].label == "torch"  # its graphed variant is slower
    default = plan(["resnet", "mlp"], device, profiles, batch_size=1)
    assert default.backends == ()
    assert chosen.prediction.throughput_sps > 2 * default.prediction.throughput_sps
    text = render_plan(chosen)
    assert "resnet: torch+cudagraph, 4.0x torch's predicted throughput at batch 1" in text
    assert "torch+cudagraph (4.0x torch)" in text


def test_only_the_named_backends_are_considered() -> None:
    profiles = _variant_profiles(
        torch={"a": _figures(8.0), "b": _figures(4.0)},
        torch_cudagraph={"a": _figures(2.0), "b": _figures(3.0)},
        onnxruntime={"a": _figures(1.0), "b": _figures(1.0)},
    )
    device = find_device("sim:h100")
    chosen = plan(["a", "b"], device, profiles, batch_size=1, backends=("torch", "torch+cudagraph"))
    assert {b.label for b in chosen.backends} == {"torch+cudagraph"}
    every = plan(["a", "b"], device, profiles, batch_size=1, backends="auto")
    assert {b.label for b in every.backends} == {"onnxruntime"}


def test_memory_makes_the_planner_fall_back_to_a_smaller_variant() -> None:
    # on the 80 GiB H100, big's fastest variant needs 90 GiB: it cannot fit, the eager one can
    profiles = _variant_profiles(
        torch={"big": _figures(10.0, weights_mib=2000), "small": _figures(1.0)},
        onnxruntime={"big": _figures(2.0, weights_mib=90_000), "small": _figures(0.5)},
    )
    device = find_device("sim:h100")
    chosen = plan(["big", "small"], device, profiles, batch_size=1, backends="auto")
    labels = {b.member: b.label for b in chosen.backends}
    assert labels == {"big": "torch", "small": "onnxruntime"}
    assert any("big: kept on torch; onnxruntime is faster alone" in line for line in chosen.explanation)
    assert any("does not fit in memory" in line for line in chosen.explanation)


def test_equal_variants_keep_the_member_as_given() -> None:
    profiles = _variant_profiles(
        torch={"a": _figures(2.0)},
        onnxruntime={"a": _figures(2.0)},
    )
    chosen = plan(["a"], find_device("sim:h100"), profiles, batch_size=1, backends="auto")
    assert chosen.backends[0].label == "torch"


def test_plan_with_backends_round_trips_and_old_plans_load() -> None:
    profiles = _variant_profiles(
        torch={"a": _figures(8.0), "b": _figures(1.0)},
        torch_cudagraph={"a": _figures(2.0), "b": _figures(1.0)},
    )
    chosen = plan(["a", "b"], find_device("sim:h100"), profiles, batch_size=1, backends="auto")
    again = serde.loads(Plan, serde.dumps(chosen))
    assert again == chosen
    assert again.backend_of("a") is not None and again.backend_of("a").label == "torch+cudagraph"
    # a plan written before plans had backends: no "backends" key
    data = serde.to_dict(chosen)
    del data["backends"]
    old = serde.from_dict(Plan, data)
    assert old.backends == () and old.backend_of("a") is None
    assert serde.loads(VariantProfiles, serde.dumps(profiles)) == profiles


def test_plan_all_adds_auto_with_backends() -> None:
    profiles = _variant_profiles(
        torch={"a": _figures(8.0), "b": _figures(1.0)},
        torch_cudagraph={"a": _figures(2.0), "b": _figures(1.0)},
    )
    plans = plan_all(
        ["a", "b"],
        find_device("sim:h100"),
        profiles,
        strategies=["sequential", "auto"],
        batch_size=1,
        backends="auto",
    )
    assert [p.strategy for p in plans] == ["sequential", "auto", "auto+backends"]
    assert plans[1].backends == ()


def test_bad_backends_are_clear_errors() -> None:
    profiles = _variant_profiles(torch={"a": _figures(1.0)})
    device = find_device("sim:h100")
    with pytest.raises(UnknownBackendError, match="unknown backend 'jax'; choose from torch"):
        plan(["a"], device, profiles, batch_size=1, backends="torch,jax")
    with pytest.raises(InvalidInputError, match="profile_variants"):
        plan(["a"], device, profiles.default_set, batch_size=1, backends="auto")
    with pytest.raises(InvalidInputError, match="no profiles under its default backend"):
        VariantProfiles(sets={"torch": profiles.default_set}, defaults={"zz": "torch"})


def test_greedy_pass_mixes_variants_when_all_fast_ones_do_not_fit_together() -> None:
    # each fast variant fits alone (40 GiB of 72 usable) but not both: every-member-fastest does
    # not fit; the greedy pass from the as-given plan switches the critical member only
    profiles = _variant_profiles(
        torch={"a": _figures(10.0), "b": _figures(5.0)},
        onnxruntime={"a": _figures(2.0, weights_mib=40_000), "b": _figures(1.0, weights_mib=40_000)},
    )
    chosen = plan(["a", "b"], find_device("sim:h100"), profiles, batch_size=1, backends="auto")
    assert {b.member: b.label for b in chosen.backends} == {"a": "onnxruntime", "b": "torch"}
    assert "greedy change(s)" in chosen.explanation[0]
    assert chosen.prediction.peak_memory_bytes <= 72 * (1 << 30)
