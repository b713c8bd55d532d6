from __future__ import annotations

import json
from pathlib import Path

import pytest

from colocate import serde
from colocate.cli import main
from colocate.profiling import ProfileSet


def test_devices_json_lists_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "--json"]) == 0
    devices = json.loads(capsys.readouterr().out)
    assert any(d["kind"] == "cpu" and d["cpu_cores"] >= 1 for d in devices)


def test_devices_with_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "--simulated", "--json"]) == 0
    devices = json.loads(capsys.readouterr().out)
    simulated = {d["name"] for d in devices if d["kind"] == "simulated"}
    assert any("H100" in name for name in simulated) and any("T4" in name for name in simulated)
    assert main(["devices"]) == 0
    assert "cpu" in capsys.readouterr().out


def test_demo_json_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "demo",
                "--quick",
                "--device",
                "cpu",
                "--scale",
                "tiny",
                "--batch-size",
                "3",
                "--repeats",
                "2",
                "--json",
            ]
        )
        == 0
    )
    payload = json.loads(capsys.readouterr().out)
    data = payload["data"]
    assert payload["type"] == "DemoResult"
    assert [m["member"] for m in data["members"]] == ["resnet", "mobilenet", "efficientnet", "vit", "mlp"]
    assert len(data["predicted_class"]) == 3 and all(0 <= c < 10 for c in data["predicted_class"])
    assert data["sequential_latency_s"] > 0


def test_demo_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--quick", "--device", "cpu", "--scale", "tiny", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "combined prediction" in out and "efficientnet" in out


def test_profile_writes_json_and_uses_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.json"
    args = [
        "profile",
        "--device",
        "cpu",
        "--scale",
        "tiny",
        "--batch-sizes",
        "1,2",
        "--repeats",
        "3",
        "--warmup",
        "1",
        "--no-thread-scaling",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "0 hit(s), 10 miss(es)" in first
    profiles = serde.load(ProfileSet, out)
    assert len(profiles.profiles) == 10 and profiles.batch_sizes == (1, 2)
    assert main(args) == 0
    assert "10 hit(s), 0 miss(es)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--device", "cuda:7"], "cuda:7"),
        (["profile", "--device", "cpu", "--ensemble", "nomodule"], "module:function"),
        (
            ["profile", "--device", "cpu", "--ensemble", "colocate.config:DEFAULT_BATCH_SIZES"],
            "not a colocate.Ensemble",
        ),
        (["profile", "--device", "cpu", "--ensemble", "json:dumps"], "calling it raised TypeError"),
    ],
)
def test_errors_exit_2_with_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_batch_sizes_rejected_by_argparse() -> None:
    with pytest.raises(SystemExit):
        main(["profile", "--batch-sizes", "1,x"])
