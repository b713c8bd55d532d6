"""Smoke runs of the study benchmarks: each script runs end to end on tiny sizes and writes its JSON and PNG.

Timings are never asserted: only that the script exits 0, that its JSON carries the metadata
every result carries (kind, date, command, device, versions) and its per-configuration fields,
and that the PNG beside it is a PNG.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METADATA = ("kind", "date", "command", "device", "versions")

pytestmark = pytest.mark.slow


def _run(script: str, out: Path, *extra: str) -> dict[str, Any]:
    command = [sys.executable, str(BENCHMARKS / script), "--smoke", "--out", str(out), *extra]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, (
        f"{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    assert out.is_file(), f"{script} wrote no {out.name}"
    png = out.with_suffix(".png")
    assert png.is_file(), f"{script} wrote no {png.name}"
    assert png.read_bytes()[:8] == PNG_MAGIC
    data: dict[str, Any] = json.loads(out.read_text())
    for key in METADATA:
        assert key in data, f"{script}: result JSON has no '{key}'"
    assert data["device"]["kind"] in ("cpu", "cuda", "simulated")
    assert data["versions"]["python"]
    assert "--smoke" in data["command"]
    return data


def test_framework_study_smoke(tmp_path: Path) -> None:
    data = _run("framework_study.py", tmp_path / "x.json", "--device", "cpu")
    assert data["kind"] == "framework-study"
    assert data["device"]["kind"] == "cpu"
    assert data["batch_sizes"] == [1, 2]
    assert len(data["archs"]) == 2
    rows = data["results"]
    assert rows
    for row in rows:
        for key in (
            "arch",
            "backend",
            "precision",
            "threads",
            "batch_size",
            "status",
            "throughput_sps",
            "latency_p50_s",
            "latency_p95_s",
            "latency_p99_s",
            "load_time_s",
            "weights_bytes",
            "peak_activation_bytes",
        ):
            assert key in row, f"framework-study row has no '{key}'"
    ok = [r for r in rows if r["status"] == "ok"]
    assert any(r["backend"] == "torch" for r in ok), "no torch configuration ran"
    for r in ok:
        assert r["throughput_sps"] > 0
        assert r["latency_p50_s"] <= r["latency_p95_s"] <= r["latency_p99_s"]
    # GPU-only backends are skipped on the CPU with a reason, not silently
    skipped = {s["backend"] for s in data["skipped"]}
    assert {"torch-cudagraph", "tensorrt"} <= skipped
    assert {w["arch"] for w in data["winners"]} == set(data["archs"])


def test_framework_study_compiles_torch_only_when_named(monkeypatch: pytest.MonkeyPatch) -> None:
    study = load_script("framework_study", BENCHMARKS)
    from colocate.devices import cpu_device
    from colocate.profiling import ProfileSettings

    assert "torch-compile" in study.BACKENDS and "torch-compile" not in study.DEFAULT_BACKENDS
    cpu = cpu_device()
    configs, _ = study.plan_configs(cpu, ["torch", "torch-compile"], ["fp32"], [1, 2])
    compiled = [c for c in configs if c.backend == "torch-compile"]
    if not compiled:
        pytest.skip("torch.compile cannot run on this machine's CPU")
    assert [c.threads for c in compiled] == [1, 2]  # torch threads, like eager torch
    member = study.member_for("mlp", "tiny", compiled[0], None)
    assert member.options == {"compile": True}
    quick = ProfileSettings(warmup=1, repeats=3, max_time_s=0.2, kernels=False, thread_scaling=False)
    rows = study.run_config("mlp", compiled[0], member, cpu, [1, 2], quick)
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    assert all(r["compile_s"] is not None and r["compile_s"] > 0 for r in rows)
    assert all(r["threads_via"] == "torch.set_num_threads" for r in rows)
    eager = study.run_config(
        "mlp", configs[0], study.member_for("mlp", "tiny", configs[0], None), cpu, [1], quick
    )
    assert eager[0]["compile_s"] is None
    # no C++ compiler: skipped with the reason, not failed
    monkeypatch.setattr("colocate.variants.shutil.which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    configs, skipped = study.plan_configs(cpu, ["torch-compile"], ["fp32"], [1])
    assert configs == [] and [s["backend"] for s in skipped] == ["torch-compile"]
    assert "needs a C++ compiler" in skipped[0]["reason"]


def test_executor_overhead_smoke(tmp_path: Path) -> None:
    data = _run("executor_overhead.py", tmp_path / "x.json", "--device", "cpu")
    assert data["kind"] == "executor-overhead"
    assert data["device"]["kind"] == "cpu"
    summary = {row["mode"]: row for row in data["summary"]}
    assert set(summary) == {"direct", "stream", "process", "mps"}
    for row in summary.values():
        for key in ("per_request_s", "throughput_sps", "overhead_per_member_us", "throughput_loss_pct"):
            assert key in row, f"executor-overhead summary has no '{key}'"
        assert row["per_request_s"] is not None, f"{row['mode']} failed: {row['errors']}"
    for mode in ("stream", "process", "mps"):
        assert summary[mode]["overhead_per_member_us"] is not None
        assert summary[mode]["throughput_loss_pct"] is not None
        # the executor's own per-request timing: never negative, and less than a whole request
        dispatch_us = summary[mode]["dispatch_overhead_per_member_us"]
        assert dispatch_us is not None
        assert 0.0 <= dispatch_us * data["members"] * 1e-6 < summary[mode]["per_request_s"]
        assert 0.0 <= summary[mode]["dispatch_throughput_loss_pct"] < 100.0
        assert summary[mode]["dispatch_within_target"] in (True, False)
    for mode in ("process", "mps"):  # interleaved (in the smoke's two blocks): the members' own time too
        assert summary[mode]["compute_difference_per_member_us"] is not None
    for mode in ("stream", "process", "mps"):  # where a request's time went, per slot kind
        parts = summary[mode]["breakdown_s"]
        assert set(parts) == {
            "breakdown_latency_s",
            "breakdown_queued_s",
            "breakdown_compute_s",
            "breakdown_returned_s",
            "breakdown_combine_s",
            "breakdown_overhead_s",
        }
        assert all(value >= 0.0 for value in parts.values()), parts
        assert 0.0 < parts["breakdown_compute_s"] < parts["breakdown_latency_s"]
    # how predict() waited for replies: the smoke's one-thread workers leave a core free
    assert data["reply_wait"] == "auto" and data["threads"] == 1
    free = "near-reply" if len(os.sched_getaffinity(0)) >= 2 else "sleep"
    assert summary["process"]["reply_polling"] == [free]
    assert summary["mps"]["reply_polling"] == [free]
    assert summary["stream"]["reply_polling"] == ["sleep"]  # a stream slot shares the interpreter
    floor = data["pipe_floor"]
    assert floor["busy_s"] == summary["direct"]["per_request_s"]
    assert 0.0 < floor["round_trip_extra_p50_s"] <= floor["round_trip_extra_p90_s"]
    assert all(run["status"] == "ok" for run in data["runs"])


def test_plan_speed_smoke(tmp_path: Path) -> None:
    # plans for the simulated H100 (its default device); the planning itself runs on this CPU
    data = _run("plan_speed.py", tmp_path / "x.json")
    assert data["kind"] == "plan-speed"
    assert [r["members"] for r in data["results"]] == [16]
    result = data["results"][0]
    for key in (
        "median_s",
        "times_s",
        "target_s",
        "within_target",
        "phases_s",
        "dominant_phase",
        "plan_slots",
    ):
        assert key in result, f"plan-speed result has no '{key}'"
    assert result["runs"] == 1
    assert "coloring" in result["phases_s"]


def test_plan_speed_times_every_strategy_a_calibration_plans(tmp_path: Path) -> None:
    data = _run("plan_speed.py", tmp_path / "x.json", "--strategy", "all", "--sizes", "6")
    assert data["strategy"] == "all"
    result = data["results"][0]
    assert result["members"] == 6
    assert result["target_s"] is None  # the targets are auto's alone
    assert "exhaustive" in result["phases_s"]
    assert result["plan_from"].startswith("auto:")


def test_plan_speed_plans_from_recorded_gpu_profiles(tmp_path: Path) -> None:
    recorded = BENCHMARKS / "results" / "20261127T1959-nvidia-h100-80gb-hbm3-profile-default-ensemble.json"
    data = _run(
        "plan_speed.py",
        tmp_path / "x.json",
        *("--profiles", str(recorded), "--strategy", "all", "--sizes", "7", "--batch-size", "8"),
    )
    assert data["device"]["name"] == "NVIDIA H100 80GB HBM3"  # the device they were taken on
    assert data["profiles"] == str(recorded)
    result = data["results"][0]
    assert result["members"] == 7
    assert sum(result["plan_slots"].values()) >= 1
    assert result["plan_from"].startswith("auto:")


def test_repeated_members_cycle_the_recorded_ones_under_new_names() -> None:
    plan_speed = load_script("plan_speed", BENCHMARKS)
    recorded = plan_speed.recorded_profiles(
        BENCHMARKS / "results" / "20261127T1959-nvidia-h100-80gb-hbm3-profile-default-ensemble.json"
    )
    made = plan_speed.repeated_members(recorded, 7)
    assert made.members == (
        "resnet-0", "mobilenet-1", "efficientnet-2", "vit-3", "mlp-4", "resnet-5", "mobilenet-6"
    )  # fmt: skip
    assert made.get("mobilenet-6", 8).latency == recorded.get("mobilenet", 8).latency
    assert made.batch_sizes == recorded.batch_sizes
