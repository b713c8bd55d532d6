"""The command line's bad-input and file-system paths: checked up front, one-line errors, exit codes.

Each check must come before any measuring: where a command would otherwise go on to load the
ensemble or profile it, those steps are replaced by ones that fail the test if reached.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest

import colocate.cli as cli
import colocate.comparison as compare_module
from colocate import serde, zoo
from colocate.cli import build_parser, main
from colocate.config import cache_dir
from colocate.devices import cpu_device
from colocate.errors import InvalidInputError
from colocate.execution.types import RunResult
from colocate.profiling import ProfileSettings, profile

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--device", "cpu", "--scale", "tiny"]


@pytest.fixture(scope="module")
def tiny_profiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    settings = ProfileSettings(warmup=1, repeats=3, max_time_s=0.2, trace_batches=1, thread_scaling=False)
    result = profile(zoo.default_ensemble(scale="tiny"), cpu_device(), (1,), settings=settings, cache=False)
    return serde.save(result, tmp_path_factory.mktemp("p") / "tiny.json")


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the ensemble or profiling it fails the test: the error must come before them."""

    def reached(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the command started its work before checking its arguments")

    monkeypatch.setattr(cli, "_load_ensemble", reached)
    monkeypatch.setattr(cli, "_profiles_for", reached)
    monkeypatch.setattr("colocate.demo.default_ensemble_for", reached)


def argparse_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """argparse's message for ``argv``, which must exit with code 2."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def subcommand_help(name: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return str(sub.choices[name].format_help())


# --- 1. --json: stdout is exactly the JSON ----------------------------------------------------


def test_run_json_prints_only_json_on_stdout(tiny_profiles: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["run", *TINY, "--profiles", str(tiny_profiles), "--strategy", "sequential"]
    assert main([*args, "--batch-size", "1", "--requests", "2", "--json"]) == 0
    captured = capsys.readouterr()
    result = serde.loads(RunResult, captured.out)  # the whole of stdout is the wrapped JSON
    assert result.requests_completed == 2
    assert "running plan 'sequential'" in captured.err  # the progress line went to stderr


# --- 2. compare / demo / run: bad arguments fail at once, with exit code 2 ---------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--strategies", "bogus,sequential"], "unknown strategy name(s) 'bogus'"),
        (["compare", "--strategies", "auto+bogus"], "unknown strategy name(s) 'auto+bogus'"),
        (["compare", "--seconds", "0"], "--seconds: must be a positive number of seconds"),
        (["compare", "--seconds", "-1"], "--seconds: must be a positive number of seconds"),
        (["compare", "--rates", "0,-5"], "--rates: takes offered loads in requests/s"),
        (["compare", "--repeats", "0"], "--repeats/--rounds: must be 1 or more rounds"),
        (["compare", "--requests", "0"], "--requests: must be 1 or more requests"),
        (["demo", "--seconds", "0"], "--seconds: must be a positive number of seconds"),
        (["demo", "--rounds", "0"], "--rounds: must be 1 or more rounds"),
        (["run", "--seconds", "-2"], "--seconds: must be a positive number of seconds"),
        (["run", "--concurrency", "0"], "--concurrency: must be 1 or more requests"),
    ],
)
def test_bad_run_arguments_are_refused_by_the_parser(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], no_work: None
) -> None:
    assert message in argparse_error(argv, capsys)


def test_plus_backends_strategy_names_are_accepted() -> None:
    args = build_parser().parse_args(["compare", "--strategies", "sequential,auto+backends"])
    assert args.strategies == ["sequential", "auto+backends"]
    assert build_parser().parse_args(["compare", "--rates", "5,20"]).rates == (5.0, 20.0)


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "--device", "h100", "--scale", "tiny"],
        ["compare", "--device", "sim:h100", "--scale", "tiny", "--no-calibrate"],
        ["demo", "--device", "h100"],
        ["demo", "--device", "sim:h100", "--quick"],
        ["run", "--device", "sim:h100", "--scale", "tiny"],
    ],
)
def test_a_simulated_device_is_refused_before_any_work(
    argv: list[str], capsys: pytest.CaptureFixture[str], no_work: None
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("colocate: error: --device ") and "simulated GPU" in err
    assert "colocate plan --device" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["run", "compare", "demo"])
def test_device_help_of_commands_that_run_does_not_offer_simulated_gpus(command: str) -> None:
    text = " ".join(subcommand_help(command).split())
    options = text[text.index("options:") :]
    device_help = options[options.index("--device DEVICE") : options.index("--scale")]
    assert "best (default)" in device_help and "sim:h100" not in device_help
    assert "sim:h100" in " ".join(subcommand_help("plan").split())


def test_compare_exits_non_zero_when_every_plan_fails(
    tiny_profiles: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> tuple[None, str]:
        return None, "WorkerFailedError: the plan's process died"

    monkeypatch.setattr(compare_module, "run_plan", broken)
    args = ["compare", *TINY, "--profiles", str(tiny_profiles), "--strategies", "sequential,streams"]
    argv = [*args, "--batch-sizes", "1", "--requests", "2", "--no-calibrate"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "every plan failed or was rejected" in err and "process died" in err
    assert main([*argv, "--json"]) == 1
    reports = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in reports[0]["results"]] == ["failed", "failed"]


# --- 4. file-system errors: one line, exit code 2, before the work ----------------------------


def test_cache_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: None) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert main(["profile", *TINY, "--cache-dir", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert f"--cache-dir {blocker}: is a file, not a folder" in err and "Traceback" not in err


UNWRITABLE_ROOTS = ["afile", "afile/below", "/proc/colocate-no-such"]


def _cache_root(where: str, tmp_path: Path) -> str:
    (tmp_path / "afile").write_text("x")
    return where if where.startswith("/") else str(tmp_path / where)


@pytest.mark.parametrize("where", UNWRITABLE_ROOTS)
def test_unwritable_colocate_cache_dir(
    where: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_work: None,
) -> None:
    root = _cache_root(where, tmp_path)
    monkeypatch.setenv("COLOCATE_CACHE_DIR", root)
    with pytest.raises(InvalidInputError, match="set COLOCATE_CACHE_DIR to a folder you can write to"):
        cache_dir("profiles")
    assert main(["profile", *TINY]) == 2
    err = capsys.readouterr().err
    assert root in err and "COLOCATE_CACHE_DIR" in err and err.count("\n") == 1


@pytest.mark.parametrize("where", UNWRITABLE_ROOTS)
def test_plan_checks_the_cache_before_profiling(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLOCATE_CACHE_DIR", _cache_root(where, tmp_path))
    monkeypatch.setattr(cli, "_load_ensemble", lambda *_args: zoo.default_ensemble(scale="tiny"))

    def no_profiling(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("profiled before checking the cache folder")

    monkeypatch.setattr("colocate.profiling.profile_isolated", no_profiling)
    assert main(["plan", *TINY]) == 2  # the profiles would land in the user cache
    err = capsys.readouterr().err
    assert "the profile cache" in err or "COLOCATE_CACHE_DIR" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["profile", *TINY, "--out", "{tmp}"], "--out {tmp}: is a folder"),
        (["plan", *TINY, "--out", "{tmp}"], "--out {tmp}: is a folder"),
        (["run", *TINY, "--out", "{tmp}"], "--out {tmp}: is a folder"),
        (["plan", *TINY, "--out", "/proc/colocate-x/plan.json"], "--out /proc/colocate-x/plan.json"),
        (["plan", *TINY, "--out", "{tmp}/afile/plan.json"], "is a file, not a folder"),
        (["compare", *TINY, "--out", "{tmp}/afile"], "--out {tmp}/afile: is a file, not a folder"),
        (["compare", *TINY, "--out", "/proc/colocate-x"], "--out /proc/colocate-x: cannot write there"),
        (["demo", *TINY, "--out", "{tmp}/afile"], "--out {tmp}/afile: is a file, not a folder"),
    ],
)
def test_bad_output_paths_fail_before_the_work(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: None
) -> None:
    (tmp_path / "afile").write_text("x")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert err.startswith("colocate: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_writers_turn_os_errors_into_colocate_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=rf"cannot write {re.escape(str(tmp_path))}"):
        serde.save(cpu_device(), tmp_path)  # a folder, not a file
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InvalidInputError, match="cannot write the report to"):
        compare_module.save_report(None, tmp_path / "afile")  # type: ignore[arg-type]


# --- 5. the documented commands use flags that exist ------------------------------------------


def test_documented_commands_use_existing_flags() -> None:
    """Every flag of a ``colocate <command>`` line in the docs exists, or a note right after the
    line says it was removed (recorded commands keep the flags they were run with)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    pattern = r"colocate (devices|demo|profile|plan|run|compare)\b([^`\n]*)"
    checked = 0
    for doc in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]:
        text = doc.read_text(encoding="utf-8")
        for found in re.finditer(pattern, text):
            known = set(sub.choices[found.group(1)]._option_string_actions)
            after = text[found.end() : found.end() + 400]
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", found.group(2)):
                checked += 1
                noted = f"`{flag}`, a flag since removed" in after
                assert flag in known or noted, (
                    f"{doc.name}: {found.group(0)!r} uses {flag}, which does not exist"
                )
    assert checked > 20


# --- 6. messages name the command-line flags ---------------------------------------------------


def test_throughput_under_latency_needs_the_flag(capsys: pytest.CaptureFixture[str], no_work: None) -> None:
    assert main(["plan", *TINY, "--objective", "throughput_under_latency"]) == 2
    err = capsys.readouterr().err
    assert "needs --latency-bound-ms" in err and "latency_bound_s" not in err


@pytest.mark.parametrize(
    ("argv", "message", "absent"),
    [
        (
            ["plan", "--latency-bound-ms", "-5"],
            "--latency-bound-ms: must be a positive number",
            "latency_bound_s",
        ),
        (
            ["plan", "--latency-bound-ms", "0"],
            "--latency-bound-ms: must be a positive number",
            "latency_bound_s",
        ),
        (["profile", "--repeats", "0"], "--repeats: must be 1 or more runs", "trace_batches"),
        (["profile", "--warmup", "-1"], "--warmup: must be 0 or more runs", "trace_batches"),
        (["compare", "--rates", "a,b"], "--rates: takes offered loads in requests/s", "<lambda>"),
        (["plan", "--batch-size", "0"], "--batch-size: must be 1 or more samples", "invalid"),
    ],
)
def test_flag_errors_name_the_flag(
    argv: list[str], message: str, absent: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = argparse_error(argv, capsys)
    assert message in err and absent not in err


def test_unknown_device_says_each_option_once(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--device", "tpu"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'tpu'" in err and err.count("JSON spec file") == 1


# --- 7. compare --json says what it prints ------------------------------------------------------


def test_compare_json_help_says_it_prints_a_list_of_reports() -> None:
    text = " ".join(subcommand_help("compare").split())
    assert "print a JSON list, one Report per --batch-sizes entry" in text
    assert "colocate.serde.from_dict(colocate.report.Report, item)" in text


# --- profiles and plan files made for another model, device or batch size ---------------------


def test_profiles_of_another_model_are_refused(
    tiny_profiles: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the tiny ensemble's profiles, planned for the small one (no --scale): the figures were
    # another model's, and the plan was printed as if they were this one's
    assert main(["plan", "--device", "cpu", "--profiles", str(tiny_profiles), "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--profiles {tiny_profiles} was made for other models than ensemble" in err
    assert "'resnet' (planned or profiled for model" in err and "--scale/--ensemble" in err
    assert main(["plan", *TINY, "--profiles", str(tiny_profiles), "--batch-size", "1"]) == 0


@pytest.fixture(scope="module")
def tiny_plan(tiny_profiles: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    args = ["plan", *TINY, "--profiles", str(tiny_profiles), "--batch-size", "1", "--strategy", "sequential"]
    assert main([*args, "--out", str(out)]) == 0
    return out


def test_a_plan_file_runs_only_with_its_models_and_batch_size(
    tiny_plan: Path, capsys: pytest.CaptureFixture[str], no_work: None
) -> None:
    from colocate.planning.types import Plan

    assert dict(serde.load(Plan, tiny_plan).model_hashes).keys() == set(zoo.ARCHITECTURES)
    capsys.readouterr()
    assert main(["run", "--plan", str(tiny_plan), "--batch-size", "8", "--requests", "1"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 8: the plan" in err and "is for batch size 1" in err


def test_a_plan_file_for_other_models_is_refused_before_running(
    tiny_plan: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def reached(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the plan ran")

    monkeypatch.setattr("colocate.comparison.execute", reached)
    capsys.readouterr()
    assert main(["run", "--device", "cpu", "--plan", str(tiny_plan), "--requests", "1"]) == 2  # small
    err = capsys.readouterr().err
    assert f"the plan {tiny_plan} was made for other models than ensemble" in err


def test_a_plan_for_a_simulated_gpu_does_not_run_on_the_cpu(
    tiny_profiles: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sim.json"
    args = ["plan", "--device", "sim:h100", "--scale", "tiny", "--profiles", str(tiny_profiles)]
    assert main([*args, "--batch-size", "1", "--out", str(out)]) == 0
    monkeypatch.setattr("colocate.comparison.execute", lambda *a, **k: pytest.fail("the plan ran"))
    capsys.readouterr()
    assert main(["run", "--plan", str(out), "--device", "cpu", "--scale", "tiny", "--requests", "1"]) == 2
    err = capsys.readouterr().err
    assert "a simulated GPU, and this would run it on" in err and "colocate plan --device cpu" in err


def test_an_ensemble_module_in_the_current_folder_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    (tmp_path / "my_committee.py").write_text(
        "from colocate import zoo\n\ndef build():\n    return zoo.default_ensemble(scale='tiny')\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    args = argparse.Namespace(ensemble="my_committee:build", scale=None, backend="torch")
    assert cli._load_ensemble(args, cpu_device()).name == zoo.default_ensemble(scale="tiny").name
    with pytest.raises(InvalidInputError, match="importable from the current folder"):
        cli._load_ensemble(argparse.Namespace(ensemble="no_such_module_here:build"), cpu_device())


def test_plan_all_with_out_is_refused_not_ignored(capsys: pytest.CaptureFixture[str], no_work: None) -> None:
    assert main(["plan", *TINY, "--all", "--out", "plans.json"]) == 2
    assert "--out saves one plan, and --all makes one per strategy" in capsys.readouterr().err


def test_compare_refuses_a_calibration_from_another_batch_size_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from colocate.report import Calibration

    monkeypatch.setattr(cli, "_profiles_for", lambda *a, **k: pytest.fail("it profiled first"))
    name = zoo.default_ensemble(scale="tiny").name
    path = serde.save(
        Calibration(ensemble=name, device=cpu_device(), batch_size=8, pairs=()), tmp_path / "c.json"
    )
    assert main(["compare", *TINY, "--batch-sizes", "1,8", "--calibration", str(path)]) == 2
    assert "the calibration was measured at batch size 8, not 1" in capsys.readouterr().err
