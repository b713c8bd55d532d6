"""The GPU check script's budget logic and command table (it runs only on a GPU machine)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from tests.scripts import SCRIPTS, load_script


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    return load_script("gpu_check")


def test_budget_cuts_and_skips_checks(gpu_check: ModuleType) -> None:
    assert gpu_check.timeout_within_budget(240, None) == 240  # no budget: the check's own limit
    assert gpu_check.timeout_within_budget(240, 1000.0) == 240
    assert gpu_check.timeout_within_budget(240, 100.0) == 95  # cut to what is left, less 5 s
    assert gpu_check.timeout_within_budget(240, 29.0) is None  # too little left: skipped


def test_every_benchmark_writes_into_its_outdir_and_scripts_exist(gpu_check: ModuleType) -> None:
    names = [name for name, _, _ in gpu_check.GPU_BENCHMARKS]
    assert len(names) == len(set(names))
    for name, argv, timeout in gpu_check.GPU_BENCHMARKS:
        assert argv[0] == "{python}" and timeout > 0, name
        scripts = [a for a in argv if a.endswith(".py")]
        for script in scripts:
            assert (SCRIPTS.parent / script).is_file(), f"{name}: {script} is missing"
        if "--out" in argv:
            assert argv[argv.index("--out") + 1].startswith("{outdir}"), name


def test_unknown_only_name_is_refused(gpu_check: ModuleType) -> None:
    with pytest.raises(SystemExit):
        gpu_check.main(["--only", "no-such-check"])


def test_results_travel_back_in_one_bundle(gpu_check: ModuleType, tmp_path: Path) -> None:
    import tarfile

    results = tmp_path / "results"
    results.mkdir()
    files = []
    for name in ("a-gpu-check.json", "a-packing-b1.json", "a-packing-b1.png"):
        (results / name).write_text(name)
        files.append(results / name)
    target = gpu_check.bundle_results([*files, results / "never-written.json"], tmp_path / "out.tar.gz")
    with tarfile.open(target) as bundle:
        assert sorted(bundle.getnames()) == sorted(f.name for f in files)
        member = bundle.extractfile("a-packing-b1.json")
        assert member is not None and member.read() == b"a-packing-b1.json"
    assert not (tmp_path / "out.tar.gz.partial").exists()


def test_the_target_cases_come_first_each_in_its_own_step(gpu_check: ModuleType) -> None:
    names = [name for name, _, _ in gpu_check.GPU_BENCHMARKS]
    assert names[2:4] == ["packing-b8", "packing-b1"]  # batch 8 has never been measured on a GPU
    for name, argv, timeout in gpu_check.GPU_BENCHMARKS[2:4]:
        assert argv[argv.index("--batch-sizes") + 1] == name.removeprefix("packing-b")
        assert argv[argv.index("--sizes") + 1] == "8"
        # the loop and auto first (a cut comparison has run them), then the plans made by hand
        strategies = argv[argv.index("--strategies") + 1].split(",")
        assert strategies[:2] == ["sequential", "auto"]
        assert {"streams", "processes", "mps"} <= set(strategies[2:])
        assert "--allow-mps-start" in argv and timeout >= 230
    rounds = [argv[argv.index("--settle-rounds") + 1] for _, argv, _ in gpu_check.GPU_BENCHMARKS[2:4]]
    assert rounds == ["1", "2"]  # batch 1, the close call between worker kinds, settles in two
    # both target steps and the checks before them fit a 590 s budget
    assert sum(timeout for _, _, timeout in gpu_check.GPU_BENCHMARKS[2:4]) + 90 <= 590


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie has ended; only our own children can be zombies, and this grandchild is init's
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split()[2] == "Z")


def test_a_check_past_its_timeout_is_killed_with_everything_it_started(
    gpu_check: ModuleType, tmp_path: Path
) -> None:
    import sys
    import time

    pid_file = tmp_path / "grandchild.pid"
    # a check that starts a long-lived process of its own (as a benchmark's plan child does) and hangs
    code = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    result = gpu_check.run_check("hangs", [sys.executable, "-c", code], 3, {"PATH": "/usr/bin:/bin"})
    assert result["returncode"] == -9 and result["outcome"] == "failed"
    assert result["output_tail"].startswith("timed out after 3s")
    assert "started" in result["output_tail"]  # what it printed before the kill is kept
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5.0
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild), "the check's own child outlived the timeout"


def test_a_check_that_ends_leaves_nothing_behind(gpu_check: ModuleType, tmp_path: Path) -> None:
    import sys
    import time

    pid_file = tmp_path / "orphan.pid"
    code = (
        "import subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "print('done')\n"
    )
    result = gpu_check.run_check("leaves-one", [sys.executable, "-c", code], 30, {"PATH": "/usr/bin:/bin"})
    assert result["returncode"] == 0 and "done" in result["output_tail"]
    orphan = int(pid_file.read_text())
    deadline = time.monotonic() + 5.0
    while _alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(orphan)


def test_run_logs_are_kept_with_the_results(gpu_check: ModuleType) -> None:
    # colocate compare --out writes runs.jsonl as it goes: what a cut compare step leaves
    assert {".json", ".jsonl", ".png"} <= set(gpu_check.KEPT_SUFFIXES)


@pytest.mark.parametrize("no_tests", [False, True])
def test_a_second_call_can_give_every_second_to_the_benchmarks(
    gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_tests: bool
) -> None:
    import json

    ran: list[str] = []

    def fake_run_check(name: str, argv: list[str], timeout: int, env: dict[str, str]) -> dict[str, object]:
        ran.append(name)
        return {
            "name": name,
            "command": " ".join(argv),
            "returncode": 0,
            "seconds": 0.0,
            "outcome": "passed",
            "output_tail": "",
        }

    monkeypatch.setattr(gpu_check, "run_check", fake_run_check)
    monkeypatch.setattr(gpu_check, "device_info", lambda: {"name": "Fake GPU"})
    monkeypatch.setattr(gpu_check, "versions", lambda: {})
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path / "results")
    monkeypatch.delenv("OUT", raising=False)
    argv = ["--only", "compare", *(["--no-tests"] if no_tests else [])]

    assert gpu_check.main(argv) == 0

    expected = ["install", "compare"] if no_tests else ["install", "pytest -m gpu", "compare"]
    assert ran == expected
    (summary,) = (tmp_path / "results").glob("*-fake-gpu-gpu-check.json")
    result = json.loads(summary.read_text())
    assert result["gpu_tests_run"] is not no_tests
    assert [c["name"] for c in result["checks"]] == expected and result["passed"]
