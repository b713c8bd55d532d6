#!/usr/bin/env python3
"""Run every GPU check of colocate in one go and write one JSON result.

Meant for a lent GPU machine with its own python3 (torch with CUDA, CuPy,
nvidia-ml-py), no network: it installs the project without touching the
machine's packages, runs every ``gpu``-marked test and the GPU benchmarks,
and writes ``benchmarks/results/<stamp>-<gpu>-gpu-check.json`` beside the
benchmarks' results. With ``$OUT`` set (the lent machine's folder of files to
bring back, at most 8 files) it also keeps there a copy of that summary and one
``gpu-check-results.tar.gz`` of every result file, rewritten after each check.
Standard library only, so it runs before anything is installed. Exit status 0 only when every check passed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# the files of a check's folder kept as results: JSON, plots, and run logs (colocate compare's
# runs.jsonl: every plan run as it ended, kept when the check is cut)
KEPT_SUFFIXES = (".json", ".jsonl", ".png")
RESULTS = ROOT / "benchmarks" / "results"
PY = sys.executable

# GPU commands beyond the tests: (name, argv, timeout in s). "{python}" is this python3,
# "{outdir}" a fresh folder whose *.json files are kept as results (benchmarks/results/
# <stamp>-<gpu>-<file>, and copied into $OUT). Later issues add theirs here.
GPU_BENCHMARKS: list[tuple[str, list[str], int]] = [
    ("devices", ["{python}", "-m", "colocate", "devices", "--json"], 60),
    ("demo-quick", ["{python}", "-m", "colocate", "demo", "--quick", "--device", "cuda"], 90),
    # Issue 8's GPU target cases first, so that a budget cut never drops them: 8 small members
    # at batch 8, then at batch 1 (auto >= 2.5x sequential, within 5 % of the best plan), each its
    # own step so that a slow first case cannot starve the second. Batch 8 goes first: it has
    # never been measured on a GPU, batch 1 has (and the steps before these took 82 s on the
    # H100, so with a 590 s budget the second case starts with about 270 s left). On the lent H100
    # (benchmarks/results/20261127T1959-nvidia-h100-80gb-hbm3-gpu-check.json) the batch-1 case
    # took 329 s with auto+backends calibrated as well (147 s of it), and the batch-8 case was cut
    # by the 450 s limit both shared; without --backends a case took about 230 s (the batch-8
    # rerun's log, ...T2009-...-packing-b8-cut.log), and a calibration now also measures an MPS
    # worker per member and, when its calibrated pick was not among the plans it ran, that pick
    # (each of those about 15 s a round on the H100). With at most two close calls
    # (--settle-plans 2), a case needs about 250 s with two settling rounds and 185-200 s with
    # one: batch 1, where a process and an MPS worker per member measured 15 % apart and one run
    # of a plan varies that much, gets two; batch 8 one, so that both fit one call. On this CPU
    # the batch-1 command with one round took 162 s and settled 15 % behind an MPS worker per
    # member that one round had measured 27 % lower than its final run
    # (benchmarks/results/20261127T2141-cpu-packing-gpu-check-b1-one-round.json). auto+backends has its
    # own command in benchmarks/README.md.
    *(
        (
            f"packing-b{batch}",
            [
                "{python}",
                "benchmarks/packing.py",
                "--device",
                "cuda",
                "--no-default",
                "--sizes",
                "8",
                "--batch-sizes",
                str(batch),
                # auto right after the loop: the comparison runs the plans in this order, so a
                # case cut by its limit has measured the pair the target is about first
                "--strategies",
                "sequential,auto,mps,processes,streams",
                "--seconds",
                "2",
                "--calibrate-pairs",
                "1",
                "--settle-plans",
                "2",
                "--settle-rounds",
                str(rounds),
                "--allow-mps-start",
                "--out",
                f"{{outdir}}/packing-b{batch}.json",
            ],
            timeout,
        )
        for batch, rounds, timeout in ((8, 1, 230), (1, 2, 270))
    ),
    (
        "profile-default-ensemble",
        [
            "{python}",
            "benchmarks/profile_default_ensemble.py",
            "--device",
            "cuda",
            "--batch-sizes",
            "1,8,32,128",
            "--precisions",
            "fp32",
            "--out",
            "{outdir}/profile-default-ensemble.json",
        ],
        150,
    ),
    (
        "compare",
        [
            "{python}",
            "-m",
            "colocate",
            "compare",
            "--device",
            "cuda",
            "--strategies",
            "sequential,streams,processes,mps,auto",
            "--batch-sizes",
            "8",
            "--seconds",
            "2",
            "--allow-mps-start",
            "--out",
            "{outdir}/compare",
        ],
        240,
    ),
    (
        "run-auto",
        [
            "{python}",
            "-m",
            "colocate",
            "run",
            "--device",
            "cuda",
            "--strategy",
            "auto",
            "--batch-size",
            "8",
            "--seconds",
            "3",
            "--allow-mps-start",
            "--out",
            "{outdir}/run-auto.json",
        ],
        120,
    ),
    # Issue 8's other benchmarks at GPU size, cut so that the whole check fits a lent machine's
    # minutes (a full run of each is in benchmarks/README.md). Each writes its JSON as it
    # goes, so one stopped by its timeout still leaves what it measured.
    (
        "executor-overhead",
        [
            "{python}",
            "benchmarks/executor_overhead.py",
            "--device",
            "cuda",
            "--rounds",
            "2",
            "--requests",
            "150",
            "--warmup",
            "10",
            "--modes",
            "direct,stream",
            "--out",
            "{outdir}/executor-overhead.json",
        ],
        100,  # 2 rounds x 2 modes in fresh processes, then the pipe floor and the idle penalty (~4 s)
    ),
    (
        "framework-study",
        [
            "{python}",
            "benchmarks/framework_study.py",
            "--device",
            "cuda",
            "--batch-sizes",
            "1,8,64,256",
            "--backends",
            "torch,torch-cudagraph,onnxruntime,tensorrt",
            "--repeats",
            "10",
            "--max-time",
            "0.4",
            "--out",
            "{outdir}/framework-study.json",
        ],
        100,
    ),
]


def timeout_within_budget(timeout: int, left_s: float | None, reserve_s: float = 30.0) -> int | None:
    """The timeout a check gets with ``left_s`` of the budget left, or None to skip it.

    A check needs at least ``reserve_s`` to be worth starting; it is then cut to what is
    left, less 5 s for writing the summary.
    """
    if left_s is None:
        return timeout
    if left_s < reserve_s:
        return None
    return int(min(timeout, left_s - 5))


def bundle_results(files: list[Path], target: Path) -> Path:
    """Write ``files`` (by their names alone) into the gzipped tar ``target``; returns it.

    One file to bring back however many results a run made: the lent machine returns at most
    8 files from ``$OUT``, and leaves out the rest."""
    partial = target.with_name(target.name + ".partial")
    with tarfile.open(partial, "w:gz") as bundle:
        for path in files:
            if path.is_file():
                bundle.add(path, arcname=path.name)
    partial.replace(target)
    return target


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run_check(name: str, argv: list[str], timeout: int, env: dict[str, str]) -> dict[str, Any]:
    """Run one check in a session of its own; past ``timeout`` kill it with all it started.

    A benchmark runs each plan in a child process, which starts worker processes of its own:
    killing the benchmark alone would leave them on the GPU, under the next check's figures.
    """
    print(f"== {name}: {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    # output to a file, not a pipe: a process the check leaves behind keeps a pipe open
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as log:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        kill_session(proc.pid)  # past the timeout, or whatever it left running once it ended
        if timed_out:
            proc.wait()
            code = -9
        log.seek(0)
        out = (f"timed out after {timeout}s\n" if timed_out else "") + log.read()
    seconds = time.perf_counter() - start
    print(_tail(out, 25), flush=True)
    print(f"== {name}: exit {code} in {seconds:.1f}s", flush=True)
    return {
        "name": name,
        "command": " ".join(argv),
        "returncode": code,
        "seconds": round(seconds, 2),
        "outcome": "passed" if code == 0 else "failed",
        "output_tail": _tail(out),
    }


def kill_session(session: int) -> None:
    """SIGKILL every process left in ``session`` (a process group led by the check it started)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # nothing left in it
        os.killpg(session, signal.SIGKILL)


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for module in ("torch", "numpy", "cupy", "onnxruntime", "onnx", "networkx", "pynvml", "tensorrt"):
        try:
            mod = __import__(module)
            found[module] = str(getattr(mod, "__version__", "unknown"))
        except Exception as exc:  # record why, never stop the check
            found[module] = None if isinstance(exc, ImportError) else f"error: {exc}"
    try:
        import torch

        found["torch_cuda"] = torch.version.cuda
        found["cudnn"] = str(torch.backends.cudnn.version())
    except Exception:
        pass
    try:
        found["colocate_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
            ).stdout.strip()
            or None
        )
    except OSError:
        found["colocate_commit"] = None
    return found


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"host_cpus": os.cpu_count()}
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "name,driver_version,memory.total,compute_cap,mig.mode.current,compute_mode"
        proc = subprocess.run(
            [smi, f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        info["nvidia_smi"] = proc.stdout.strip() or proc.stderr.strip()
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(
                name=props.name,
                sm_count=props.multi_processor_count,
                memory_total_bytes=props.total_memory,
                compute_capability=f"{props.major}.{props.minor}",
                device_count=torch.cuda.device_count(),
            )
    except Exception as exc:
        info["torch_error"] = str(exc)
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            info["driver_version"] = pynvml.nvmlSystemGetDriverVersion()
            cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
            info["cuda_driver_version"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:
        info["nvml_error"] = str(exc)
    return info


def parse_junit(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "")[:500]
        tests.append(
            {
                "test": f"{case.get('classname')}::{case.get('name')}",
                "outcome": outcome,
                "seconds": case.get("time", ""),
                "message": message,
            }
        )
    return tests


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget-s",
        type=float,
        default=float(os.environ.get("GPU_CHECK_BUDGET_S", "0")) or None,
        help="stop starting checks after this many seconds; each check's timeout is cut to "
        "what is left (env GPU_CHECK_BUDGET_S; default: no limit)",
    )
    parser.add_argument("--only", default="", help="comma list of benchmark names to run (default all)")
    parser.add_argument(
        "--no-tests",
        action="store_true",
        help="skip the gpu-marked tests (for a second call on a machine that ran them already: "
        "every second goes to the benchmarks named with --only)",
    )
    args = parser.parse_args(argv)
    deadline = time.perf_counter() + args.budget_s if args.budget_s else None
    only = {n for n in args.only.split(",") if n}
    unknown = only - {name for name, _, _ in GPU_BENCHMARKS}
    if unknown:
        parser.error(f"unknown check(s) {sorted(unknown)}; known: {[n for n, _, _ in GPU_BENCHMARKS]}")
    started = dt.datetime.now(dt.timezone.utc)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    work = ROOT / "benchmarks" / "results" / "_gpu_check_tmp"
    work.mkdir(parents=True, exist_ok=True)
    checks = []

    install = run_check(
        "install",
        [PY, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."],
        300,
        env,
    )
    checks.append(install)
    if install["returncode"] != 0:  # fall back to the source tree
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")

    junit = work / "junit.xml"
    if not args.no_tests:
        pytest_argv = [PY, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider"]
        checks.append(run_check("pytest -m gpu", [*pytest_argv, f"--junitxml={junit}"], 180, env))
    device = device_info()
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", str(device.get("name", "no-gpu"))).strip("-").lower()
    stamp = started.strftime("%Y%m%dT%H%M")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_dir = os.environ.get("OUT")
    benchmarks: dict[str, list[str]] = {}
    found_versions = versions()
    summary = RESULTS / f"{stamp}-{gpu}-gpu-check.json"

    def write_summary(finished: bool) -> dict[str, Any]:
        # written after every check, so a run cut short still leaves its results behind
        result = {
            "kind": "gpu-check",
            "date": started.isoformat(timespec="seconds"),
            "command": " ".join(["make gpu-check", *(argv if argv is not None else sys.argv[1:])]),
            "finished": finished,
            "device": device,
            "versions": found_versions,
            "checks": checks,
            "gpu_tests_run": not args.no_tests,
            "tests": parse_junit(junit),
            "result_files": benchmarks,
            "budget_s": args.budget_s,
            "skipped": [c["name"] for c in checks if c["outcome"] == "skipped"],
            "passed": finished and all(c["returncode"] == 0 for c in checks if c["outcome"] != "skipped"),
        }
        summary.write_text(json.dumps(result, indent=2) + "\n")
        if out_dir:
            shutil.copy(summary, Path(out_dir) / summary.name)
            kept_files = [RESULTS / name for names in benchmarks.values() for name in names]
            bundle_results([summary, *kept_files], Path(out_dir) / "gpu-check-results.tar.gz")
        return result

    write_summary(False)
    for name, command, timeout in GPU_BENCHMARKS:
        if only and name not in only:
            continue
        outdir = work / name
        outdir.mkdir(parents=True, exist_ok=True)
        command = [a.replace("{outdir}", str(outdir)).replace("{python}", PY) for a in command]
        left = None if deadline is None else deadline - time.perf_counter()
        allowed = timeout_within_budget(timeout, left)
        if allowed is None:
            print(f"== {name}: skipped, {left:.0f}s of the budget left", flush=True)
            checks.append(
                {
                    "name": name,
                    "command": " ".join(command),
                    "returncode": None,
                    "seconds": 0.0,
                    "outcome": "skipped",
                    "output_tail": f"skipped: {left:.0f}s of --budget-s left",
                }
            )
            write_summary(False)
            continue
        checks.append(run_check(name, command, allowed, env))
        kept = []
        produced_files = sorted(p for p in outdir.rglob("*") if p.suffix in KEPT_SUFFIXES)
        for produced in produced_files:
            flat = "-".join(produced.relative_to(outdir).parts)
            target = RESULTS / f"{stamp}-{gpu}-{flat}"
            shutil.copy(produced, target)
            kept.append(target.name)
        benchmarks[name] = kept
        write_summary(False)

    result = write_summary(True)
    shutil.rmtree(work, ignore_errors=True)
    target = summary
    counts: dict[str, int] = {}
    for test in result["tests"]:
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    print(f"gpu-check: wrote {target}; tests {counts}; passed={result['passed']}", flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
