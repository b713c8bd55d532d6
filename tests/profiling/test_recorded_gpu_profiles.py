"""The GPU profiles recorded on a lent H200 (tests/data) load and hold together.

The planner's tests use these on machines without a GPU, so they must stay
readable by the current schema and physically consistent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from colocate import serde
from colocate.profiling import ProfileSet

DATA = Path(__file__).resolve().parent.parent / "data"
EAGER = DATA / "profiles-h200-default-large-fp32.json"
GRAPHED = DATA / "profiles-h200-default-large-fp16-cudagraph.json"
MEMBERS = ("resnet", "mobilenet", "efficientnet", "vit", "mlp")


@pytest.mark.parametrize("path", [EAGER, GRAPHED], ids=lambda p: p.name)
def test_recorded_profiles_are_consistent(path: Path) -> None:
    profiles = serde.load(ProfileSet, path)
    assert profiles.members == MEMBERS and profiles.batch_sizes == (1, 8, 32, 128)
    for p in profiles.profiles:
        assert p.ok and p.device.kind == "cuda" and "H200" in p.device.name
        assert p.latency is not None and p.memory is not None and p.kernels is not None
        assert 0 < p.latency.median_s <= p.latency.p90_s <= p.latency.p99_s
        assert 0 < p.kernels.busy_fraction <= 1 and 0 < p.kernels.sm_fill <= 1
        assert p.kernels.kernels_per_batch >= 1 and p.energy is not None
    for member in MEMBERS:
        series = [profiles.get(member, b) for b in profiles.batch_sizes]
        acts = [p.memory.peak_activation_bytes for p in series]  # type: ignore[union-attr]
        assert acts == sorted(acts), (member, acts)
        weights = {p.memory.weights_bytes for p in series}  # type: ignore[union-attr]
        assert len(weights) == 1


def test_cuda_graphs_cut_host_share_at_batch_one() -> None:
    eager = serde.load(ProfileSet, EAGER)
    graphed = serde.load(ProfileSet, GRAPHED)
    for member in MEMBERS:
        e, g = eager.get(member, 1), graphed.get(member, 1)
        assert e is not None and g is not None and e.host_share and g.host_share
        assert g.host_share < e.host_share, member
