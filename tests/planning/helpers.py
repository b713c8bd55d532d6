"""Synthetic devices, demands and profiles for the planner's tests (fast, deterministic)."""

from __future__ import annotations

from pathlib import Path

from colocate import serde
from colocate.devices import Device, find_device
from colocate.planning.demands import DemandSet, MemberDemand, demand_set
from colocate.planning.synthetic import synthetic_profile
from colocate.profiling import Profile, ProfileSet

MIB = 1 << 20
GIB = 1 << 30
DATA = Path(__file__).resolve().parent.parent / "data"
EAGER = DATA / "profiles-h200-default-large-fp32.json"
GRAPHED = DATA / "profiles-h200-default-large-fp16-cudagraph.json"


def h100() -> Device:
    """The simulated H100 (80 GiB, 132 SMs)."""
    return find_device("h100")


def t4() -> Device:
    """The simulated T4 (16 GiB, 40 SMs)."""
    return find_device("t4")


def recorded(path: Path = EAGER) -> ProfileSet:
    """The profiles recorded on an H200."""
    return serde.load(ProfileSet, path)


def demand(
    name: str,
    latency_ms: float,
    *,
    busy: float = 0.3,
    fill: float = 0.5,
    host: float = 0.1,
    weights_mib: float = 100,
    act_mib: float = 100,
    p99_ratio: float = 1.0,
    batch: int = 8,
) -> MemberDemand:
    """A hand-made member demand (times in ms for readability)."""
    latency = latency_ms / 1e3
    return MemberDemand(
        member=name,
        batch_size=batch,
        latency_s=latency,
        p99_s=latency * p99_ratio,
        busy_fraction=busy,
        sm_fill=fill,
        host_share=host,
        weights_bytes=int(weights_mib * MIB),
        activation_bytes=int(act_mib * MIB),
    )


def demands(*members: MemberDemand, device: Device | None = None, context_mib: float = 500) -> DemandSet:
    """A DemandSet on ``device`` (default the simulated H100) with a given context size."""
    return demand_set(device or h100(), members[0].batch_size, members, process_bytes=int(context_mib * MIB))


def profiles(*specs: dict[str, object], device: Device | None = None, batch: int = 8) -> ProfileSet:
    """Profiles from keyword dicts of :func:`synthetic_profile` (``name`` and ``latency_ms`` required)."""
    device = device or h100()
    out: list[Profile] = []
    for spec in specs:
        spec = dict(spec)
        name = str(spec.pop("name"))
        latency = float(spec.pop("latency_ms")) / 1e3  # type: ignore[arg-type]
        b = int(spec.pop("batch", batch))  # type: ignore[call-overload]
        out.append(synthetic_profile(name, device, batch_size=b, latency_s=latency, **spec))  # type: ignore[arg-type]
    return ProfileSet(tuple(out))
