"""colocate profile | plan | run | compare with --backends, end to end on the CPU at tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from colocate import serde, zoo
from colocate.cli import main
from colocate.devices import find_device
from colocate.execution.types import RunResult
from colocate.planning.synthetic import synthetic_profile
from colocate.planning.types import Plan
from colocate.profiling import ProfileSet, VariantProfiles
from colocate.report import Report

TINY = ["--device", "cpu", "--scale", "tiny"]


@pytest.fixture(scope="module")
def variant_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny default ensemble profiled under torch and onnxruntime (exports in a private cache)."""
    root = tmp_path_factory.mktemp("variants")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLOCATE_CACHE_DIR", str(root / "cache"))
        out = root / "variants.json"
        args = [
            "profile",
            *TINY,
            "--backends",
            "torch,onnxruntime",
            "--batch-sizes",
            "1",
            "--repeats",
            "3",
            "--warmup",
            "1",
            "--no-trace",
            "--no-thread-scaling",
            "--out",
            str(out),
        ]
        assert main(args) == 0
    return out


@pytest.fixture()
def cache(variant_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache the ONNX exports of ``variant_file`` are in (a run finds them there)."""
    monkeypatch.setenv("COLOCATE_CACHE_DIR", str(variant_file.parent / "cache"))


def test_profile_writes_variant_profiles(variant_file: Path) -> None:
    found = serde.load(VariantProfiles, variant_file)
    assert found.labels == ("torch", "onnxruntime")
    assert set(found.members) == set(zoo.ARCHITECTURES)
    assert {p.backend for p in found.sets["onnxruntime"].profiles} == {"onnxruntime"}


def test_plan_with_backends_then_run_it(
    variant_file: Path, cache: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan_file = tmp_path / "plan.json"
    args = ["plan", *TINY, "--profiles", str(variant_file), "--backends", "auto", "--batch-size", "1"]
    assert main([*args, "--out", str(plan_file)]) == 0
    text = capsys.readouterr().out
    assert "strategy auto+backends" in text and "backends: each member's variant chosen" in text
    saved = serde.load(Plan, plan_file)
    assert {b.member for b in saved.backends} == set(zoo.ARCHITECTURES)
    out = tmp_path / "run.json"
    assert main(["run", *TINY, "--plan", str(plan_file), "--requests", "4", "--out", str(out)]) == 0
    result = serde.load(RunResult, out)
    assert result.status == "ok" and result.requests_completed == 4
    if any(b.backend == "onnxruntime" for b in saved.backends):
        assert "onnxruntime" in result.versions
    capsys.readouterr()
    # the same profiles without --backends: every member as given
    assert main(["plan", *TINY, "--profiles", str(variant_file), "--batch-size", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["backends"] == []


def test_compare_adds_auto_with_backends(
    variant_file: Path, cache: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    args = [
        "compare",
        *TINY,
        "--profiles",
        str(variant_file),
        "--backends",
        "auto",
        "--strategies",
        "sequential",
        "--batch-sizes",
        "1",
        "--requests",
        "4",
        "--no-calibrate",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    report = serde.load(Report, out / "report.json")
    names = [r.name for r in report.results]
    assert names == ["sequential", "auto+backends"]
    with_backends = report.results[1]
    assert with_backends.status == "ok", with_backends.reason
    assert with_backends.plan is not None and with_backends.plan.backends


def test_bad_backends_and_profiles_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--device", "sim:h100", "--backends", "torch,jax"])
    assert exc.value.code == 2
    assert "unknown backend 'jax'" in capsys.readouterr().err
    plain = serde.save(
        ProfileSet((synthetic_profile("mlp", find_device("sim:h100"), batch_size=1, latency_s=1e-3),)),
        tmp_path / "plain.json",
    )
    assert main(["plan", "--device", "sim:h100", "--profiles", str(plain), "--backends", "auto"]) == 2
    assert "colocate profile --backends" in capsys.readouterr().err


def test_plan_for_a_simulated_gpu_chooses_cuda_graphs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h100 = find_device("sim:h100")
    eager = [
        synthetic_profile(a, h100, batch_size=1, latency_s=4e-3, host_share=0.9) for a in zoo.ARCHITECTURES
    ]
    graphed = [
        synthetic_profile(a, h100, batch_size=1, latency_s=1e-3, host_share=0.2) for a in zoo.ARCHITECTURES
    ]
    profiles = VariantProfiles(
        sets={"torch": ProfileSet(tuple(eager)), "torch+cudagraph": ProfileSet(tuple(graphed))},
        defaults={a: "torch" for a in zoo.ARCHITECTURES},
    )
    path = serde.save(profiles, tmp_path / "variants.json")
    args = ["plan", "--device", "sim:h100", "--scale", "large", "--profiles", str(path), "--backends", "auto"]
    assert main([*args, "--batch-size", "1", "--json"]) == 0
    chosen = json.loads(capsys.readouterr().out)["data"]
    assert chosen["strategy"] == "auto+backends"
    assert {b["label"] for b in chosen["backends"]} == {"torch+cudagraph"}


def test_compare_calibrates_the_variants_auto_backends_chose(
    variant_file: Path, cache: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the calibration itself is stubbed (tests/test_variants.py runs it for real): this checks
    # that compare calibrates auto+backends' variants as they run and says so
    import colocate.comparison as comparison
    from colocate.report import Calibration

    calibrated: list[tuple[str, ...]] = []

    def quick(ensemble: Any, device: Any, profiles: Any, **options: Any) -> Calibration:
        calibrated.append(tuple(m.backend for m in ensemble.members))
        return Calibration(ensemble.name, device, options.get("batch_size", 1), (), time_scale=0.9)

    monkeypatch.setattr(comparison, "calibrate", quick)
    out = tmp_path / "cmp"
    args = [
        "compare",
        *TINY,
        "--profiles",
        str(variant_file),
        "--backends",
        "onnxruntime",
        "--strategies",
        "sequential,auto",
        "--batch-sizes",
        "1",
        "--requests",
        "4",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    report = serde.load(Report, out / "report.json")
    with_backends = next(r for r in report.results if r.name == "auto+backends")
    assert with_backends.status == "ok", with_backends.reason
    assert with_backends.plan is not None
    chosen = {b.member: b.backend for b in with_backends.plan.backends if b.label != b.default}
    assert chosen, "with only onnxruntime allowed besides torch, some member runs on it"
    # first the members as given, then the ensemble as auto+backends runs it
    assert len(calibrated) == 2 and set(calibrated[0]) == {"torch"}
    assert "onnxruntime" in calibrated[1]
    said = "'auto+backends': the variants it chose were calibrated"
    noted = [n for n in report.notes if n.startswith(said)]
    assert len(noted) == 1 and "time scale 0.90" in noted[0], report.notes
    assert any("laid out again" in line for line in with_backends.plan.explanation)
