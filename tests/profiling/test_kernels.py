"""Kernel and operator footprints: synthetic Chrome traces with known answers, and real CPU traces."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colocate.errors import InvalidInputError, MeasurementError
from colocate.profiling.kernels import (
    BATCH_ANNOTATION,
    TRACE_SOURCE,
    cpu_trace,
    footprint_from_trace,
    peak_allocated_from_trace,
    top_ops_from_trace,
    trace_gpu,
    union_length,
)

TRACES = Path(__file__).resolve().parent.parent / "data" / "traces"
H100_SMS = 132


# --------------------------------------------------------------------------- synthetic events, Kineto's shape


def annotation(ts: float, dur: float, *, gpu: bool = False) -> dict[str, Any]:
    """A ``record_function("colocate.batch")`` range: CPU side, or its GPU-timeline twin."""
    return {
        "ph": "X",
        "cat": "gpu_user_annotation" if gpu else "user_annotation",
        "name": BATCH_ANNOTATION,
        "pid": 0 if gpu else 4242,
        "tid": 7 if gpu else 4242,
        "ts": ts,
        "dur": dur,
        "args": {"External id": 1, "Record function id": 0},
    }


def kernel(
    ts: float,
    dur: float,
    *,
    stream: int = 7,
    grid: list[int] | None = None,
    block: tuple[int, int, int] = (128, 1, 1),
    occupancy: dict[str, float] | None = None,
    cat: str = "kernel",
    name: str = "void at::native::vectorized_elementwise_kernel<4>(...)",
) -> dict[str, Any]:
    """A CUPTI kernel event with the args keys Kineto writes (libkineto CuptiActivity.cpp)."""
    args: dict[str, Any] = {
        "External id": 11,
        "queued": 0,
        "device": 0,
        "context": 1,
        "stream": stream,
        "correlation": 322,
        "registers per thread": 32,
        "shared memory": 0,
        "block": list(block),
    }
    if grid is not None:
        blocks = math.prod(grid)
        args["grid"] = grid
        args["blocks per SM"] = blocks / H100_SMS
        args["warps per SM"] = blocks / H100_SMS * block[0] / 32
    args.update(occupancy or {})
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": stream, "ts": ts, "dur": dur, "args": args}


def noise(ts: float) -> list[dict[str, Any]]:
    """Events every real trace has that must not count as kernels."""
    return [
        {
            "ph": "X",
            "cat": "cpu_op",
            "name": "aten::conv2d",
            "pid": 4242,
            "tid": 4242,
            "ts": ts + 1,
            "dur": 5,
        },
        {
            "ph": "X",
            "cat": "cuda_runtime",
            "name": "cudaLaunchKernel",
            "pid": 4242,
            "tid": 4242,
            "ts": ts + 2,
            "dur": 3,
            "args": {"External id": 11, "cbid": 211, "correlation": 322},
        },
        {"ph": "f", "id": 322, "pid": 0, "tid": 7, "ts": ts + 10, "cat": "ac2g", "name": "ac2g", "bp": "e"},
    ]


def two_batch_trace() -> list[dict[str, Any]]:
    """2 batches x 3 kernels on stream 7; the numbers in the tests below follow from these."""
    pct = "est. achieved occupancy %"
    fraction = "est. achieved occupancy"  # the older spelling, as a fraction
    events = [
        annotation(1000, 100),
        annotation(2000, 100),
        annotation(1005, 140, gpu=True),  # the GPU twin: ignored
        annotation(2015, 120, gpu=True),
        # batch 0: gaps 10 and 30 µs
        kernel(1010, 20, grid=[66, 1, 1], occupancy={pct: 50}),
        kernel(1040, 30, grid=[132, 2, 1], occupancy={pct: 100}),
        kernel(1100, 40, grid=[1, 1, 1], occupancy={fraction: 0.25}),
        # batch 1: gaps 10 and 10 µs
        kernel(2020, 20, grid=[66, 1, 1], occupancy={pct: 50}),
        kernel(2050, 30, grid=[132, 2, 1], occupancy={pct: 100}),
        kernel(2090, 40, grid=[1, 1, 1], occupancy={fraction: 0.25}),
        *noise(1000),
        *noise(2000),
    ]
    return events[::-1]  # export order must not matter


# --------------------------------------------------------------------------- footprint_from_trace


def test_known_answers_of_a_two_batch_trace() -> None:
    fp = footprint_from_trace(two_batch_trace(), batches=2, sm_count=H100_SMS)
    assert fp.source == TRACE_SOURCE
    assert fp.traced_batches == 2
    assert fp.kernels_per_batch == 3
    assert fp.kernel_time_s == pytest.approx(90e-6)
    # window: first annotation start (1000) to the last kernel end (2130); kernels cover 180 µs
    assert fp.busy_fraction == pytest.approx(180 / 1130)
    # within-batch gaps [10, 30, 10, 10] µs (the 870 µs between batches is the profiling loop's)
    assert fp.launch_gap_median_s == pytest.approx(10e-6)
    assert fp.launch_gap_p90_s == pytest.approx(24e-6)  # 10 + 0.7 * (30 - 10)
    assert fp.max_grid_blocks == 264
    # time weights: 1 block 80 µs, 66 blocks 40 µs, 264 blocks 60 µs -> half of 180 reached at 66
    assert fp.typical_grid_blocks == 66
    assert fp.sm_fill == pytest.approx((0.5 * 40 + 1.0 * 60 + (1 / 132) * 80) / 180)
    # 50 % x 40 µs, 100 % x 60 µs, 0.25 (older key, a fraction) = 25 % x 80 µs
    assert fp.occupancy_pct == pytest.approx((50 * 40 + 100 * 60 + 25 * 80) / 180)
    assert fp.first_kernel_delay_s == pytest.approx(15e-6)  # median of 10 and 20 µs


def test_overlapping_kernels_on_two_streams_count_once() -> None:
    events = [
        annotation(0, 1),
        kernel(0, 10, stream=7, grid=[4, 1, 1]),
        kernel(5, 10, stream=8, grid=[4, 1, 1]),
        kernel(20, 5, stream=7, grid=[4, 1, 1]),
    ]
    fp = footprint_from_trace(events, batches=1, sm_count=H100_SMS)
    assert fp.busy_fraction == pytest.approx(20 / 25)  # union [0, 15] + [20, 25]; durations sum to 25
    assert fp.kernel_time_s == pytest.approx(25e-6)
    # the only same-stream pair is on stream 7: 20 - 10 = 10 µs (the stream-8 overlap is no gap)
    assert fp.launch_gap_median_s == pytest.approx(10e-6)
    assert fp.launch_gap_p90_s == pytest.approx(10e-6)


def test_window_s_overrides_the_trace_window_and_is_clipped() -> None:
    events = [annotation(0, 1), kernel(0, 50, grid=[1, 1, 1])]
    assert footprint_from_trace(
        events, batches=1, sm_count=8, window_s=200e-6
    ).busy_fraction == pytest.approx(0.25)
    assert footprint_from_trace(events, batches=1, sm_count=8, window_s=10e-6).busy_fraction == 1.0


def test_capitalised_category_and_missing_args_are_accepted() -> None:
    events = [annotation(100, 10), kernel(105, 10, cat="Kernel"), {"cat": "kernel", "ts": 120, "dur": 10}]
    fp = footprint_from_trace(events, batches=1, sm_count=H100_SMS)
    assert fp.kernels_per_batch == 2
    assert fp.max_grid_blocks == 0  # no kernel has a grid: grid statistics stay empty
    assert fp.typical_grid_blocks == 0
    assert fp.sm_fill == 0.0
    assert fp.occupancy_pct is None
    assert fp.launch_gap_median_s == pytest.approx(0.0)  # default stream 0 vs stream 7: no pair
    assert fp.first_kernel_delay_s == pytest.approx(5e-6)


def test_kernels_without_grid_are_skipped_for_grid_statistics_only() -> None:
    events = [annotation(0, 1), kernel(0, 10, grid=[264, 1, 1]), kernel(10, 1000)]
    fp = footprint_from_trace(events, batches=1, sm_count=H100_SMS)
    assert fp.kernels_per_batch == 2
    assert fp.max_grid_blocks == fp.typical_grid_blocks == 264
    assert fp.sm_fill == 1.0


def test_kernels_of_a_warm_up_before_the_first_batch_are_left_out() -> None:
    events = [kernel(0, 500, grid=[999, 1, 1]), annotation(1000, 10), kernel(1005, 10, grid=[2, 1, 1])]
    fp = footprint_from_trace(events, batches=1, sm_count=H100_SMS)
    assert fp.kernels_per_batch == 1
    assert fp.max_grid_blocks == 2
    assert fp.busy_fraction == pytest.approx(10 / 15)
    with pytest.raises(MeasurementError, match="no GPU kernels"):
        footprint_from_trace([kernel(0, 5), annotation(10, 5)], batches=1, sm_count=H100_SMS)


def test_without_annotations_the_window_spans_the_kernels() -> None:
    events = [kernel(10, 10, grid=[1, 1, 1]), kernel(30, 10, grid=[1, 1, 1])]
    fp = footprint_from_trace(events, batches=1, sm_count=H100_SMS)
    assert fp.busy_fraction == pytest.approx(20 / 30)
    assert fp.first_kernel_delay_s == 0.0


def test_no_kernels_is_a_measurement_error() -> None:
    with pytest.raises(MeasurementError, match="no GPU kernels in the trace"):
        footprint_from_trace([annotation(0, 10), *noise(0)], batches=1, sm_count=H100_SMS)


@pytest.mark.parametrize("kwargs", [{"batches": 0, "sm_count": 1}, {"batches": 1, "sm_count": 0}])
def test_bad_arguments_are_rejected(kwargs: dict[str, int]) -> None:
    with pytest.raises(InvalidInputError):
        footprint_from_trace([kernel(0, 1)], **kwargs)


intervals = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=1e6, allow_nan=False),
        st.floats(min_value=0, max_value=1e4, allow_nan=False),
        st.integers(min_value=0, max_value=3),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(intervals, st.booleans())
def test_busy_fraction_is_a_fraction_and_the_union_never_exceeds_the_sum(
    spans: list[tuple[float, float, int]], annotated: bool
) -> None:
    events = [kernel(ts, dur, stream=stream, grid=[1, 1, 1]) for ts, dur, stream in spans]
    if annotated:
        events.append(annotation(min(ts for ts, _, _ in spans), 1.0))
    fp = footprint_from_trace(events, batches=1, sm_count=H100_SMS)
    assert 0.0 <= fp.busy_fraction <= 1.0
    covered = union_length((ts, ts + dur) for ts, dur, _ in spans)
    assert covered <= sum(dur for _, dur, _ in spans) * (1 + 1e-9) + 1e-9
    assert covered >= max(dur for _, dur, _ in spans) * (1 - 1e-9) - 1e-9
    assert fp.launch_gap_median_s >= 0 and fp.launch_gap_p90_s >= fp.launch_gap_median_s - 1e-12
    assert 0.0 <= fp.sm_fill <= 1.0


def test_trace_samples_under_tests_data_parse() -> None:
    """Every stored trace sample has kernels the parser understands."""
    samples = sorted(TRACES.glob("*.json"))
    assert samples, f"no trace samples under {TRACES}"
    for path in samples:
        data = json.loads(path.read_text(encoding="utf-8"))
        events = data["traceEvents"] if isinstance(data, dict) else data
        batches = sum(
            1 for e in events if e.get("name") == BATCH_ANNOTATION and e.get("cat") == "user_annotation"
        )
        fp = footprint_from_trace(events, batches=max(batches, 1), sm_count=H100_SMS)
        assert fp.kernels_per_batch >= 1, path.name
        assert 0.0 < fp.busy_fraction <= 1.0, path.name
        assert fp.max_grid_blocks >= 1, path.name
        assert 0.0 < fp.sm_fill <= 1.0, path.name
        assert fp.occupancy_pct is not None and 0.0 <= fp.occupancy_pct <= 100.0, path.name


def test_a_real_h200_trace_gives_hand_checked_answers() -> None:
    """A real export (torch 2.11 + CUDA 13, H200): conv net, 2 batches, synchronised after each.

    Recorded with ``profile(activities=[CPU, CUDA])``, ``record_function("colocate.batch")``
    around each batch and ``torch.cuda.synchronize()`` after it. It holds the CPU annotations,
    their ``gpu_user_annotation`` twins, cpu ops, ``cuda_runtime`` launches, flow events and
    5 kernels per batch on stream 7.
    """
    data = json.loads((TRACES / "h200_torch2.11_cu130_convnet_2batches.json").read_text(encoding="utf-8"))
    events = data["traceEvents"]
    assert {"user_annotation", "gpu_user_annotation", "kernel", "cuda_runtime", "cpu_op"} <= {
        e.get("cat") for e in events
    }
    fp = footprint_from_trace(events, batches=2, sm_count=data["deviceProperties"][0]["numSms"])
    assert fp.kernels_per_batch == 5
    # kernel durations (µs): 3.807 + 1.985 + 1.12 + 4.032 + 1.536 and 3.616 + 1.824 + 1.12 + 3.808 + 1.536
    assert fp.kernel_time_s == pytest.approx(24.384e-6 / 2)
    assert fp.max_grid_blocks == 256
    # blocks (time): 2 (3.072), 4 (7.84), 64 (2.24), 128 (7.423), 256 (3.809): half of 24.384 reached at 64
    assert fp.typical_grid_blocks == 64
    # first kernel after each CPU annotation start: 2127.372 µs (profiler start-up) and 118.338 µs
    assert fp.first_kernel_delay_s == pytest.approx((2127.372 + 118.338) / 2 * 1e-6)
    assert 0.0 < fp.busy_fraction < 0.05  # a tiny net: the GPU idles between launches
    # Kineto's own "blocks per SM" = grid blocks / SMs, so sm_fill agrees with it
    kernels = [e for e in events if e.get("cat") == "kernel"]
    for e in kernels:
        assert e["args"]["blocks per SM"] == pytest.approx(math.prod(e["args"]["grid"]) / 132, abs=1e-6)
    assert fp.occupancy_pct is not None and 0.0 < fp.occupancy_pct < 100.0


# --------------------------------------------------------------------------- operators and memory


def cpu_op(name: str, ts: float, dur: float, tid: int = 1) -> dict[str, Any]:
    return {"ph": "X", "cat": "cpu_op", "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur, "args": {}}


def test_self_time_subtracts_direct_children_only() -> None:
    events = [
        cpu_op("aten::linear", 0, 10),  # self 10 - 4 = 6
        cpu_op("aten::addmm", 2, 4),  # self 4 - 1 = 3
        cpu_op("aten::copy_", 3, 1),  # grandchild of linear: counts against addmm only
        cpu_op("aten::relu", 10, 2),  # starts where linear ends: a sibling, self 2
        annotation(0, 20),  # not an operator
    ]
    ops = dict(top_ops_from_trace(events))
    total = 6 + 3 + 1 + 2
    assert ops == pytest.approx(
        {
            "aten::linear": 6 / total,
            "aten::addmm": 3 / total,
            "aten::copy_": 1 / total,
            "aten::relu": 2 / total,
        }
    )


def test_top_ops_aggregate_by_name_across_threads_and_respect_the_limit() -> None:
    events = [
        cpu_op("aten::linear", 0, 10, tid=1),
        cpu_op("aten::addmm", 2, 4, tid=1),
        cpu_op("aten::addmm", 2, 8, tid=2),  # other thread: not nested in tid 1's linear
        cpu_op("aten::relu", 20, 2, tid=2),
    ]
    ops = top_ops_from_trace(events, limit=2)
    assert [name for name, _ in ops] == ["aten::addmm", "aten::linear"]
    assert ops[0][1] == pytest.approx(12 / 20)
    assert ops[1][1] == pytest.approx(6 / 20)
    assert sum(share for _, share in ops) <= 1.0
    assert top_ops_from_trace([]) == ()


def memory(ts: float, size: int, device_type: int = 0) -> dict[str, Any]:
    """A ``[memory]`` instant event as torch 2.13 exports it."""
    return {
        "ph": "i",
        "cat": "cpu_instant_event",
        "s": "t",
        "name": "[memory]",
        "pid": 1,
        "tid": 1,
        "ts": ts,
        "args": {
            "Total Reserved": 0,
            "Total Allocated": 0,
            "Bytes": size,
            "Device Id": -1 if device_type == 0 else 0,
            "Device Type": device_type,
            "Addr": 94516213348736,
            "finished": False,
            "Ev Idx": 46,
        },
    }


def test_peak_allocated_is_the_max_of_the_running_sum() -> None:
    events = [
        memory(3, -100),
        memory(1, 100),
        memory(2, 50),
        memory(4, 80),
        memory(2.5, 10_000, device_type=1),
    ]
    assert peak_allocated_from_trace(events) == 150  # 100, 150, 50, 130
    assert peak_allocated_from_trace(events, device_type=1) == 10_000
    assert peak_allocated_from_trace([memory(1, -64)]) == 0  # a free of older memory only
    assert peak_allocated_from_trace([]) == 0


# --------------------------------------------------------------------------- real traces (torch on the CPU)


def _mlp_batch(batch_size: int) -> Any:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).eval()
    x = torch.randn(batch_size, 64)

    def run() -> Any:
        with torch.no_grad():
            return model(x)

    run()  # warm-up outside the trace
    return run


def test_cpu_trace_of_a_real_mlp() -> None:
    top_small, peak_small = cpu_trace(_mlp_batch(1), batches=3)
    top_large, peak_large = cpu_trace(_mlp_batch(64), batches=3)
    for top in (top_small, top_large):
        assert top, "no operators in a real CPU trace"
        assert len(top) <= 8
        assert all(name.startswith("aten::") for name, _ in top)
        shares = [share for _, share in top]
        assert shares == sorted(shares, reverse=True)
        assert all(share > 0 for share in shares)
        assert sum(shares) <= 1.0 + 1e-9
    assert "aten::addmm" in dict(top_large)
    assert peak_small > 0
    assert peak_large > peak_small
    assert peak_large >= 64 * 256 * 4  # at least the hidden activation of batch 64 in fp32


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_trace_gpu_on_a_real_conv_net() -> None:
    import torch

    device = torch.device("cuda")
    model = (
        torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, padding=1),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(64, 10),
        )
        .to(device)
        .eval()
    )
    x = torch.randn(8, 3, 64, 64, device=device)

    def run() -> Any:
        with torch.no_grad():
            return model(x)

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    fp = trace_gpu(run, torch.cuda.synchronize, batches=3, sm_count=sms)
    assert fp.source == TRACE_SOURCE
    assert fp.traced_batches == 3
    assert fp.kernels_per_batch >= 1
    assert 0.0 < fp.busy_fraction <= 1.0
    assert fp.kernel_time_s > 0
    assert fp.max_grid_blocks >= 1
    assert 1 <= fp.typical_grid_blocks <= fp.max_grid_blocks
    assert 0.0 < fp.sm_fill <= 1.0
    assert fp.first_kernel_delay_s >= 0.0
    assert fp.occupancy_pct is None or 0.0 <= fp.occupancy_pct <= 100.0


def test_quiet_profiler_log_drops_only_profiler_noise(capfd: pytest.CaptureFixture[str]) -> None:
    import os

    from colocate.profiling.kernels import quiet_profiler_log

    with quiet_profiler_log():
        noise = b"USDT:2026-11-27 04:47:34 5960:5960 SyncActivityProfilerHandler.cpp:52] profiler_start\n"
        os.write(2, noise)
        os.write(2, b"a real warning\n")
    err = capfd.readouterr().err
    assert "profiler_start" not in err and "a real warning" in err
