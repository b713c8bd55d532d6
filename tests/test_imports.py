"""colocate imports, and its CLI answers --help, with no heavy framework installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("torch", "onnxruntime", "onnx", "onnxscript", "cupy", "tensorrt", "pynvml", "matplotlib")
SUBCOMMANDS = ("devices", "demo", "profile")


def run_blocked(code: str) -> subprocess.CompletedProcess[str]:
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in BLOCKED)
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_module_imports_without_frameworks() -> None:
    proc = run_blocked(
        """
        import importlib, pkgutil
        import colocate
        for info in pkgutil.walk_packages(colocate.__path__, "colocate."):
            if info.name == "colocate.__main__":
                continue
            importlib.import_module(info.name)
        for name in ("torch", "onnxruntime", "cupy", "tensorrt"):
            assert sys.modules.get(name) is None, name
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_cli_help_without_frameworks() -> None:
    for command in SUBCOMMANDS:
        proc = run_blocked(
            f"""
            from colocate.cli import main
            try:
                main([{command!r}, "--help"])
            except SystemExit as exc:
                assert exc.code == 0, exc.code
            """
        )
        assert proc.returncode == 0, (command, proc.stderr)
        assert "usage: colocate" in proc.stdout


def test_missing_backend_error_names_the_extra() -> None:
    proc = run_blocked(
        """
        from colocate import zoo
        from colocate.backends import create_runner, available
        from colocate.devices import cpu_device
        from colocate.errors import BackendUnavailableError
        assert available() == {"torch": False, "onnxruntime": False, "tensorrt": False, "cupy": False}
        try:
            create_runner(zoo.member("mlp"), cpu_device())
        except BackendUnavailableError as exc:
            print(exc)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "member 'mlp'" in proc.stdout and "colocate[torch]" in proc.stdout


def test_the_top_level_api_names_the_functions_the_docs_use() -> None:
    proc = run_blocked(
        """
        import colocate
        import colocate.comparison as comparison
        from colocate.comparison import RunSettings
        # the submodule is 'comparison', so 'colocate.compare' stays the function after its import
        assert colocate.compare is comparison.compare and callable(colocate.compare)
        assert colocate.calibrate is comparison.calibrate
        assert colocate.calibrate_backends is comparison.calibrate_backends
        assert colocate.RunSettings is RunSettings
        for name in colocate.__all__:
            assert getattr(colocate, name) is not None, name
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_a_worker_does_not_import_the_planner() -> None:
    # a process or mps worker unpickles its spec through colocate.execution.processes: the
    # search, the graphs and networkx would add a quarter of a second to every worker's start
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, colocate.execution.processes\n"
            "print(sorted(m for m in ('networkx', 'colocate.planning.search', 'colocate.planning.graph',"
            " 'colocate.planning.strategies') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_planning_package_resolves_every_name_it_exports() -> None:
    import colocate.planning as planning

    assert sorted(planning.__all__) == sorted(planning._LAZY)
    for name in planning.__all__:
        assert getattr(planning, name) is not None
        assert name in dir(planning)
    try:
        planning.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
