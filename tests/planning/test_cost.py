"""The cost model on hand-computed two-member cases, memory accounting, MPS shares and bounds."""

from __future__ import annotations

import dataclasses
import math

import pytest

from colocate.devices import cpu_device
from colocate.errors import InvalidInputError
from colocate.planning import CostModel, DemandSet, SlotSpec, mps_percentages
from colocate.planning.demands import MPS_CLIENT_SHARE, MemberDemand, demand_set
from colocate.planning.types import Slot

from .helpers import MIB, demand, demands

M = CostModel()
COMBINE_2 = M.combine_base_s + 2 * M.combine_per_member_s  # two members


def two(host: float = 0.1, busy: float = 0.3, fill: float = 0.5) -> DemandSet:
    return demands(
        demand("a", 10.0, busy=busy, fill=fill, host=host),
        demand("b", 8.0, busy=busy, fill=fill, host=host),
    )


def test_sequential_predicts_the_sum() -> None:
    ds = two()
    p = M.predict((Slot("s0", "stream", ("a", "b")),), ds)
    interval = 0.018 + M.stream_dispatch_s
    assert p.latency_s == pytest.approx(interval + COMBINE_2, rel=1e-9)
    assert p.throughput_sps == pytest.approx(8 / interval, rel=1e-9)
    assert p.bound == "critical path"
    assert p.critical_member == "b"  # the last member of the only slot
    a, b = p.members
    assert (a.start_s, a.finish_s) == pytest.approx((0.00002, 0.01002))
    assert (b.start_s, b.finish_s) == pytest.approx((0.01002, 0.01802))
    assert a.slowdown == pytest.approx(1.0) and b.slowdown == pytest.approx(1.0)


def test_two_light_streams_predict_the_max_not_the_sum() -> None:
    # each busy 30 % with fill 0.5: together they use 0.3 of the SMs and overlap freely,
    # paying only the bandwidth term 1 + 0.1 x (the other's 0.15)
    ds = two()
    p = M.predict((SlotSpec("stream", ("a",)), SlotSpec("stream", ("b",))), ds)
    k = 1 + M.bandwidth_interference * 0.15
    dur_a = (10 - 3) + 3 * k
    dur_b = (8 - 2.4) + 2.4 * k
    end = dur_b + (1 - dur_b / dur_a) * 10  # b finishes, then a runs alone
    assert p.latency_s == pytest.approx((end / 1e3) + M.stream_dispatch_s + COMBINE_2, rel=1e-9)
    assert p.latency_s < 0.0105  # about the max (10 ms), far from the sum (18 ms)
    assert p.critical_member == "a"
    by = {m.member: m for m in p.members}
    assert by["b"].slowdown == pytest.approx(dur_b / 8, rel=1e-9)


def test_host_bound_members_gain_only_where_contexts_overlap() -> None:
    ds = two(host=1.0)
    seq = M.predict((SlotSpec("stream", ("a", "b")),), ds)
    streams = M.predict((SlotSpec("stream", ("a",)), SlotSpec("stream", ("b",))), ds)
    procs = M.predict((SlotSpec("process", ("a",)), SlotSpec("process", ("b",))), ds)
    # streams: one GIL, both stretched 2x until b is done at 16 ms, then a's last 2 ms alone; the
    # GIL bound (18 ms of host work + the front's dispatch and combine) binds: no gain over sequential
    assert streams.bound == "host (GIL)"
    assert streams.latency_s == pytest.approx(0.018 + 2 * M.stream_dispatch_s + 2 * COMBINE_2, rel=1e-9)
    assert streams.latency_s >= seq.latency_s
    # processes without MPS: a context holds the GPU for its member's whole (host-bound) latency and
    # switching costs time_slice_overhead (measured on an H200): slower than one after another
    assert procs.bound == "time slicing"
    assert procs.throughput_sps < seq.throughput_sps
    # where MPS overlaps the clients as documented, their own interpreters pay off
    trusting = CostModel(trust_mps_overlap=True)
    mps = trusting.predict((SlotSpec("mps", ("a",), 50.0), SlotSpec("mps", ("b",), 50.0)), ds)
    assert mps.throughput_sps > 1.7 * trusting.predict((SlotSpec("stream", ("a", "b")),), ds).throughput_sps


def test_mps_share_below_the_fill_stretches_the_kernels() -> None:
    ds = demands(demand("a", 10.0, busy=1.0, fill=1.0, host=0.0))
    p = M.predict((SlotSpec("mps", ("a",), 50.0),), ds)
    assert p.members[0].slowdown == pytest.approx(2.0, rel=1e-9)
    full = M.predict((SlotSpec("mps", ("a",), 100.0),), ds)
    assert full.members[0].slowdown == pytest.approx(1.0)


def test_saturated_streams_cannot_beat_the_sm_time() -> None:
    ds = demands(
        demand("a", 10.0, busy=1.0, fill=1.0, host=0.0),
        demand("b", 10.0, busy=1.0, fill=1.0, host=0.0),
    )
    seq = M.predict((SlotSpec("stream", ("a", "b")),), ds)
    streams = M.predict((SlotSpec("stream", ("a",)), SlotSpec("stream", ("b",))), ds)
    # D = 2: each gets half the SMs, plus the (capped) bandwidth term: 10 ms x 2 x 1.1
    assert streams.members[0].finish_s == pytest.approx(0.022 + M.stream_dispatch_s, rel=1e-9)
    assert streams.throughput_sps <= 8 / 0.020  # SM time: 20 ms of the whole GPU per request
    assert streams.throughput_sps < seq.throughput_sps


def test_time_slicing_bounds_busy_processes() -> None:
    ds = demands(
        demand("a", 10.0, busy=0.9, fill=0.2, host=0.05),
        demand("b", 10.0, busy=0.9, fill=0.2, host=0.05),
    )
    procs = CostModel().evaluate((SlotSpec("process", ("a",)), SlotSpec("process", ("b",))), ds)
    sliced = dict(procs.bounds_s)["time slicing"]
    # each context holds the GPU for its member's latency (10 ms), plus the switching overhead
    assert sliced == pytest.approx(0.020 * (1 + M.time_slice_overhead), rel=1e-9)
    assert procs.throughput_sps <= 8 / sliced + 1e-9
    streams = CostModel().evaluate((SlotSpec("stream", ("a",)), SlotSpec("stream", ("b",))), ds)
    assert streams.throughput_sps > procs.throughput_sps  # low fill: streams overlap, processes cannot


def test_memory_counts_weights_largest_activation_and_contexts() -> None:
    ds = demands(
        demand("a", 1.0, weights_mib=100, act_mib=100),
        demand("b", 1.0, weights_mib=200, act_mib=300),
        context_mib=500,
    )

    def slot(mib: float) -> int:
        return math.ceil(mib * MIB * (1 + M.allocator_margin))

    assert M.peak_memory_bytes((SlotSpec("stream", ("a", "b")),), ds) == slot(300 + 300) + 500 * MIB
    two_streams = (SlotSpec("stream", ("a",)), SlotSpec("stream", ("b",)))
    assert M.peak_memory_bytes(two_streams, ds) == slot(200) + slot(500) + 500 * MIB
    two_procs = (SlotSpec("process", ("a",)), SlotSpec("process", ("b",)))
    assert M.peak_memory_bytes(two_procs, ds) == slot(200) + slot(500) + 2 * 500 * MIB
    # an MPS client pays a share of a context (the server holds what the clients share); the
    # serving process pays a whole one for its stream slot
    client = round(500 * MIB * MPS_CLIENT_SHARE)
    assert ds.mps_client_bytes == client and 0 < client < 500 * MIB
    mixed = (SlotSpec("stream", ("a",)), SlotSpec("mps", ("b",), 50.0))
    assert M.peak_memory_bytes(mixed, ds) == slot(200) + slot(500) + 500 * MIB + client
    two_clients = (SlotSpec("mps", ("a",), 50.0), SlotSpec("mps", ("b",), 50.0))
    assert M.peak_memory_bytes(two_clients, ds) == slot(200) + slot(500) + 2 * client  # no serving context
    # the client's memory limit still budgets a whole context: libraries' workspaces count against it
    limit = M.mps_memory_limit_bytes(("b",), ds)
    budget = (slot(500) + 500 * MIB) * 1.1  # its members and its context, with 10 % headroom
    assert limit % MIB == 0 and budget <= limit < budget + MIB


def test_mps_shares_follow_sm_work_with_caps() -> None:
    ds = demands(
        demand("a", 30.0, busy=1.0, fill=1.0),
        demand("b", 10.0, busy=1.0, fill=1.0),
    )
    assert mps_percentages([["a"], ["b"]], ds) == (75.0, 25.0)
    capped = demands(
        demand("a", 30.0, busy=1.0, fill=0.2),  # more work, but its kernels cover only 20 % of the SMs
        demand("b", 10.0, busy=1.0, fill=1.0),
    )
    assert mps_percentages([["a"], ["b"]], capped) == (20.0, 80.0)
    many = demands(*[demand(f"m{i}", 1.0 + i, busy=0.5, fill=0.9) for i in range(40)])
    shares = mps_percentages([[f"m{i}"] for i in range(40)], many)
    assert sum(shares) <= 100.0 and min(shares) >= 1.0
    assert list(shares) == sorted(shares)  # more work, larger share


def test_measured_interference_overrides_the_pair() -> None:
    ds = two()
    model = CostModel(interference={("b", "a"): 3.0})
    p = model.predict((SlotSpec("stream", ("a",)), SlotSpec("stream", ("b",))), ds)
    makespan = max(m.finish_s for m in p.members) - M.stream_dispatch_s
    assert makespan / 0.010 == pytest.approx(3.0, rel=1e-6)  # the pair reproduces the measurement
    assert all(m.slowdown > 2.0 for m in p.members)
    eased = CostModel(interference={("a", "b"): 1.0}).predict(
        (SlotSpec("stream", ("a",)), SlotSpec("stream", ("b",))), ds
    )
    assert max(m.finish_s for m in eased.members) - M.stream_dispatch_s == pytest.approx(0.010, rel=1e-6)
    with pytest.raises(InvalidInputError, match="unknown member"):
        CostModel(interference={("a", "zz"): 1.2}).predict((SlotSpec("stream", ("a",)),), ds)
    with pytest.raises(InvalidInputError, match="positive"):
        CostModel(interference={("a", "b"): 0.0})


def test_predict_needs_a_device_for_plain_demands_and_rejects_mixed_workers() -> None:
    ds = two()
    with pytest.raises(InvalidInputError, match="device and batch_size"):
        M.predict((SlotSpec("stream", ("a",)),), ds.by_name)
    p = M.predict((SlotSpec("stream", ("a", "b")),), ds.by_name, ds.device, 8)
    assert p.latency_s > 0.018
    with pytest.raises(InvalidInputError, match="cannot mix 'process' and 'mps'"):
        M.predict((SlotSpec("process", ("a",)), SlotSpec("mps", ("b",), 50.0)), ds)
    with pytest.raises(InvalidInputError, match="no demand for member 'zz'"):
        M.predict((SlotSpec("stream", ("zz",)),), ds)


def test_p99_adds_the_tails_of_the_last_slot_in_quadrature() -> None:
    ds = demands(demand("a", 10.0, p99_ratio=1.5), demand("b", 2.0, p99_ratio=3.0))
    p = M.predict((SlotSpec("stream", ("a",)), SlotSpec("stream", ("b",))), ds)
    by = {m.member: m for m in p.members}
    a_time = by["a"].finish_s - by["a"].start_s
    assert p.latency_p99_s == pytest.approx(p.latency_s + 0.5 * a_time)  # b finishes early: its tail hides
    seq = M.predict((SlotSpec("stream", ("a", "b")),), ds)
    assert seq.latency_p99_s == pytest.approx(seq.latency_s + math.hypot(0.5 * 0.010, 2.0 * 0.002))


# -- CPU slots and several measured partners (calibrated against runs on a 2-core CPU)


def _cpu_demand(name: str, one_thread_ms: float, two_threads_ms: float) -> MemberDemand:
    return MemberDemand(
        member=name,
        batch_size=8,
        latency_s=two_threads_ms / 1e3,
        p99_s=two_threads_ms / 1e3,
        busy_fraction=1.0,
        sm_fill=1.0,
        host_share=0.0,
        weights_bytes=10 * MIB,
        activation_bytes=10 * MIB,
        threads=2,
        thread_scaling=((1, one_thread_ms / 1e3), (2, two_threads_ms / 1e3)),
    )


def _cpu(*members: MemberDemand) -> DemandSet:
    device = dataclasses.replace(cpu_device(), cpu_cores=2)
    return demand_set(device, 8, members, process_bytes=256 * MIB)


def test_serial_fraction_from_the_thread_scaling() -> None:
    assert _cpu_demand("a", 10, 10).serial_fraction() == pytest.approx(1.0)  # no gain from threads
    assert _cpu_demand("a", 10, 5).serial_fraction() == pytest.approx(0.0)  # perfect scaling
    assert _cpu_demand("a", 10, 7.5).serial_fraction() == pytest.approx(0.5)
    assert _cpu_demand("a", 10, 12).serial_fraction() == pytest.approx(1.0)  # slower with threads: clamped
    assert demand("a", 10).serial_fraction() == pytest.approx(0.2)  # no figures: the default


def test_cpu_slots_run_at_their_share_of_the_threads() -> None:
    # perfectly parallel members: two processes on one core each are no faster than one after
    # another on both cores (before, each process was taken at its two-thread latency: 2x)
    ds = _cpu(_cpu_demand("a", 20, 10), _cpu_demand("b", 20, 10))
    seq = M.predict((SlotSpec("stream", ("a", "b")),), ds)
    procs = M.predict((SlotSpec("process", ("a",)), SlotSpec("process", ("b",))), ds)
    assert procs.throughput_sps == pytest.approx(seq.throughput_sps, rel=0.15)
    assert {m.member: m.finish_s - m.start_s for m in procs.members}["a"] >= 0.019


def test_cpu_stream_slots_serialise_on_the_interpreter_but_processes_do_not() -> None:
    # members that do not speed up with threads (an eager model at batch 1): the interpreter's
    # lock serialises stream slots, while two processes run on a core each
    ds = _cpu(_cpu_demand("a", 10, 10), _cpu_demand("b", 10, 10))
    seq = M.predict((SlotSpec("stream", ("a", "b")),), ds)
    streams = M.predict((SlotSpec("stream", ("a",)), SlotSpec("stream", ("b",))), ds)
    procs = M.predict((SlotSpec("process", ("a",)), SlotSpec("process", ("b",))), ds)
    assert streams.throughput_sps < 1.1 * seq.throughput_sps
    assert procs.throughput_sps > 1.6 * seq.throughput_sps


def test_several_measured_partners_do_not_compound() -> None:
    light = dict(busy=0.3, fill=0.1, host=0.1)
    ds = demands(demand("a", 10, **light), demand("b", 10, **light), demand("c", 10, **light))
    table = {("a", "b"): 2.0, ("a", "c"): 2.0, ("b", "c"): 2.0}
    model = CostModel(interference=table)
    pair = model.predict((SlotSpec("stream", ("a",)), SlotSpec("stream", ("b",))), ds)
    three = model.predict(tuple(SlotSpec("stream", (m,)) for m in "abc"), ds)
    slow_pair = max(m.slowdown for m in pair.members)
    slow_three = max(m.slowdown for m in three.members)
    assert slow_pair == pytest.approx(2.0, rel=0.05)
    # each member runs beside two partners measured at 2x: that is not 4x (the product)
    assert slow_three < 1.3 * slow_pair


def test_cpu_stream_slots_of_eager_torch_members_do_not_overlap() -> None:
    # perfectly parallel torch members: threads of one process still run one after another
    # (measured on the CPU), while ONNX Runtime members overlap
    torch_members = [dataclasses.replace(_cpu_demand(n, 10, 5), backend="torch") for n in "ab"]
    ort_members = [dataclasses.replace(_cpu_demand(n, 10, 5), backend="onnxruntime") for n in "ab"]
    layout = (SlotSpec("stream", ("a",)), SlotSpec("stream", ("b",)))
    torch_streams = M.predict(layout, _cpu(*torch_members))
    ort_streams = M.predict(layout, _cpu(*ort_members))
    torch_seq = M.predict((SlotSpec("stream", ("a", "b")),), _cpu(*torch_members))
    assert torch_streams.throughput_sps < 0.6 * torch_seq.throughput_sps  # 1 thread each, serialised
    assert ort_streams.throughput_sps > 1.6 * torch_streams.throughput_sps


def test_mps_plans_charge_clients_a_share_of_a_context_and_say_so() -> None:
    from colocate import zoo
    from colocate.planning import plan
    from colocate.planning.demands import member_demands
    from tests.planning.helpers import h100, recorded

    ensemble = zoo.default_ensemble(scale="large")
    device, profiles = h100(), recorded()
    ds = member_demands(ensemble, device, profiles, 8)
    mps = plan(ensemble, device, profiles, strategy="mps", batch_size=8)
    processes = plan(ensemble, device, profiles, strategy="processes", batch_size=8)
    assert len(mps.slots) == len(processes.slots) == len(ensemble.members)  # one worker per member
    # the same members and slots: the plans differ by a context's unshared part per worker
    saved = processes.prediction.peak_memory_bytes - mps.prediction.peak_memory_bytes
    assert saved == len(mps.slots) * (ds.process_bytes - ds.mps_client_bytes)
    memory_line = next(line for line in mps.explanation if line.startswith("peak memory"))
    assert f"{len(mps.slots)} x " in memory_line and "per MPS client" in memory_line
    assert "per CUDA context" not in memory_line  # no stream slot: the serving process has none
