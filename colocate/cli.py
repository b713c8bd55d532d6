"""The ``colocate`` command line: a thin layer over the public functions.

Subcommands: ``devices`` and ``demo`` (more arrive with the profiler, planner
and executor). Every subcommand takes ``--json`` for machine-readable output.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from colocate import serde
from colocate.errors import ColocateError, InvalidInputError, os_error_reason


def _console(*, stderr: bool = False) -> Any:
    """A rich console on stdout, or on stderr (``stderr=True``: with ``--json``, where stdout
    carries only the JSON and progress lines go to stderr)."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output (logs, CI) gets a wide table instead of rich's 80-column default.
    return Console(soft_wrap=True, width=None if stream.isatty() else 160, stderr=stderr)


def _progress_bar(console: Any, label: str, *, disable: bool) -> Any:
    """A transient rich progress bar: label, bar, done/total, elapsed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn(f"[bold]{label}[/bold] {{task.description}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=disable,
    )


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table


# --- argument checks: made before anything is measured, and named by their flags -------------


def _whole(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse ``type``: a whole number >= ``minimum`` (``what`` names its unit)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a whole number of {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more {what}, got {text!r}")
        return value

    return parse


def _positive(what: str) -> Callable[[str], float]:
    """An argparse ``type``: a finite number > 0 (``what`` names its unit)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a number of {what}, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be a positive number of {what}, got {text!r}")
        return value

    return parse


def _rates(text: str) -> tuple[float, ...]:
    """``--rates``: offered loads in requests/s, positive numbers separated by commas."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        rates = tuple(float(part) for part in parts)
    except ValueError:
        rates = ()
    if not rates or not all(math.isfinite(r) and r > 0 for r in rates):
        raise argparse.ArgumentTypeError(
            f"takes offered loads in requests/s, positive numbers separated by commas like 5,20,50; "
            f"got {text!r}"
        )
    return rates


def _strategies(text: str) -> list[str]:
    """``--strategies``: planner strategy names separated by commas, checked now."""
    from colocate.planning import STRATEGIES
    from colocate.planning.variants import SUFFIX

    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if (n[: -len(SUFFIX)] if n.endswith(SUFFIX) else n) not in STRATEGIES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown strategy name(s) {', '.join(map(repr, unknown)) or repr(text)}: give names "
            f"separated by commas among {', '.join(STRATEGIES)} (any may end in {SUFFIX!r} to also "
            "choose each member's backend variant)"
        )
    return names


def _device_to_run(spec: str) -> Any:
    """The device ``--device spec`` names, refused now if it cannot run models (a simulated GPU)."""
    from colocate import devices
    from colocate.errors import DeviceError

    device = devices.find_device(spec)
    if not device.can_execute:
        raise DeviceError(
            f"--device {spec}: '{device.name}' is a simulated GPU, which colocate can plan for but not "
            f"run on; give --device best, cpu, cuda or cuda:N here (to plan for it: colocate plan "
            f"--device {spec} --profiles FILE)"
        )
    return device


def _writable_folder(path: str | Path, what: str, fix: str = "give a folder you can write to") -> Path:
    """Make the folder ``path`` (parents too) now and check that a file can be written in it, so
    that a command fails before its measuring, not after. ``what`` names the path's origin (the
    flag) in the error, ``fix`` what to do."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise InvalidInputError(
            f"{what} {path}: is a file, not a folder; {fix} (a folder is made when missing), or move "
            "the file away"
        )
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as exc:
        raise InvalidInputError(f"{what} {path}: cannot write there ({os_error_reason(exc)}); {fix}") from exc
    return target


def _writable_file(path: str | None, what: str = "--out") -> None:
    """Check now that the file ``path`` can be written (its folder is made): a folder of that name
    or a file where a folder is needed fails here, before any measuring. None: nothing to check."""
    if not path:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise InvalidInputError(
            f"{what} {path}: is a folder; give a file path such as {Path(path) / 'result.json'}"
        )
    _writable_folder(target.parent, f"{what} {path}: its folder", "give a file path you can write to")
    if target.exists() and not os.access(target, os.W_OK):
        raise InvalidInputError(f"{what} {path}: the file is not writable; give another path")


def _check_cache_folder(root: str | None = None) -> None:
    """Check now that the profile cache can be written: ``--cache-dir`` when given, else the
    default one (``$COLOCATE_CACHE_DIR`` or ``~/.cache/colocate``)."""
    if root is not None:
        _writable_folder(root, "--cache-dir")
        return
    from colocate.config import cache_dir

    _writable_folder(
        cache_dir("profiles"), "the profile cache", "set COLOCATE_CACHE_DIR to a folder you can write to"
    )


def cmd_devices(args: argparse.Namespace) -> int:
    from colocate import devices

    found = devices.list_devices()
    if args.simulated:
        found.extend(devices.simulated_device(name) for name in devices.GPU_PRESETS)
    if args.json:
        print(json.dumps([serde.to_dict(d) for d in found], indent=2))
        return 0
    rows = devices.device_table_rows(found)
    columns = list(rows[0]) if rows else []
    _console().print(_table("Devices", columns, [list(r.values()) for r in rows]))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from colocate import demo

    if not args.quick:
        return _full_demo(args)
    device = _device_to_run(args.device)
    ensemble = demo.default_ensemble_for(device, args.scale, args.backend)
    console = _console(stderr=args.json)
    with console.status(f"loading {ensemble.name} on {device.name}...") as status:
        result = demo.run_demo(
            ensemble,
            device,
            batch_size=args.batch_size,
            repeats=args.repeats,
            on_member=lambda name: status.update(f"loading and timing member '{name}'..."),
        )
    if args.json:
        print(serde.dumps(result))
        return 0
    rows = [
        [
            t.member,
            t.backend,
            f"{t.load_time_s * 1e3:.1f}",
            f"{t.latency.median_s * 1e3:.2f}",
            f"{t.latency.p90_s * 1e3:.2f}" + (" (!)" if t.latency.high_variance else ""),
        ]
        for t in result.members
    ]
    console.print(
        _table(
            f"{result.ensemble} on {device.name}, batch {result.batch_size} (times in ms)",
            ["member", "backend", "load", "latency p50", "latency p90"],
            rows,
        )
    )
    shown = min(8, len(result.predicted_class))
    pairs = zip(result.predicted_class[:shown], result.confidence[:shown], strict=True)
    preds = ", ".join(f"{c} ({p:.2f})" for c, p in pairs)
    console.print(f"combined prediction (class (probability)) of the first {shown} samples: {preds}")
    console.print(
        f"one after another, the members take {result.sequential_latency_s * 1e3:.2f} ms per batch "
        f"({result.batch_size / result.sequential_latency_s:.0f} samples/s)"
    )
    return 0


def _full_demo(args: argparse.Namespace) -> int:
    """Profile the default ensemble, plan it with every strategy, run and compare the plans."""
    from colocate import demo
    from colocate.comparison import RunSettings, compare, dedupe_plans, save_report
    from colocate.planning import plan_all
    from colocate.profiling import profile_isolated
    from colocate.report import render_table

    device = _device_to_run(args.device)
    _writable_folder(args.out, "--out")
    _check_cache_folder()
    ensemble = demo.default_ensemble_for(device, args.scale, args.backend)
    console = _console()
    say = (lambda line: None) if args.json else (lambda line: console.print(f"[dim]{line}[/dim]"))
    say(f"1/3 profiling {ensemble.name} on {device.name} at batch {args.batch_size} (cached later)")
    profiles = profile_isolated(ensemble, device, (args.batch_size,))
    say("2/3 planning with every strategy")
    plans = plan_all(ensemble, device, profiles, batch_size=args.batch_size)
    unique = dedupe_plans(plans)
    say(f"3/3 running {len(unique)} distinct plans, {args.seconds:g} s each, {args.rounds} round(s)")
    report = compare(
        ensemble,
        device,
        list(unique),
        profiles=profiles,
        batch_size=args.batch_size,
        settings=RunSettings(seconds=args.seconds, repeats=args.rounds),
        progress=say,
    )
    written = save_report(report, args.out)
    code = _all_failed_code([report])
    if args.json:
        print(serde.dumps(report))
        return code
    console.print(render_table(report))
    best = report.best
    if best is not None and best.speedup is not None:
        console.print(f"best measured: '{best.name}', {best.speedup:.2f}x the sequential loop")
    console.print(
        f"report: {written['txt']}  plot: {written['png']}  data: {written['json']}, {written['csv']}"
    )
    _say_all_failed([report])
    return code


def _all_failed_code(reports: Sequence[Any]) -> int:
    """1 when not one plan of the reports ran (each failed or was rejected), else 0."""
    ran = any(r.status in ("ok", "errors") for report in reports for r in report.results)
    return 0 if ran else 1


def _say_all_failed(reports: Sequence[Any]) -> None:
    """On stderr, when no plan ran: say so, with the first reason."""
    if _all_failed_code(reports) == 0:
        return
    reasons = [r.reason for report in reports for r in report.results if r.reason]
    first = f": first reason: {reasons[0]}" if reasons else ""
    print(f"colocate: error: every plan failed or was rejected{first}", file=sys.stderr)


def _load_ensemble(args: argparse.Namespace, device: Any) -> Any:
    """The ensemble named by --ensemble (``module:function``, the module importable from the
    current folder or the PYTHONPATH) or the default one."""
    import importlib

    from colocate import demo
    from colocate.ensemble import Ensemble
    from colocate.errors import InvalidInputError

    if not getattr(args, "ensemble", None):
        return demo.default_ensemble_for(device, args.scale, args.backend)
    module_name, _, attr = args.ensemble.partition(":")
    if not attr:
        raise InvalidInputError(
            f"--ensemble {args.ensemble!r}: give module:function, e.g. mypkg.models:build_ensemble"
        )
    here = os.getcwd()
    if "" not in sys.path and here not in sys.path:
        # as `python -m` does: a module beside the user is found (worker processes inherit the path)
        sys.path.insert(0, here)
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InvalidInputError(
            f"--ensemble {args.ensemble!r}: cannot load it ({exc}); the module must be importable "
            f"from the current folder ({here}) or the PYTHONPATH"
        ) from exc
    try:
        ensemble = factory() if callable(factory) else factory
    except Exception as exc:
        raise InvalidInputError(
            f"--ensemble {args.ensemble!r}: calling it raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(ensemble, Ensemble):
        raise InvalidInputError(
            f"--ensemble {args.ensemble!r} gave {type(ensemble).__name__}, not a colocate.Ensemble"
        )
    return ensemble


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def profile_rows(profiles: Sequence[Any]) -> list[list[str]]:
    """Table rows for profiles (times in ms, memory in MiB)."""
    rows = []
    for p in profiles:
        if not p.ok:
            fit = f" (largest fit: {p.max_fitting_batch})" if p.max_fitting_batch else ""
            rows.append([p.member, str(p.batch_size), p.status + fit] + ["-"] * 8)
            continue
        lat, mem = p.latency, p.memory
        if p.kernels is not None:
            use = (
                f"{p.kernels.kernels_per_batch:.0f} kern, busy {p.kernels.busy_fraction:.0%}, "
                f"SM fill {p.kernels.sm_fill:.0%}"
            )
        elif p.cpu is not None:
            use = f"{p.cpu.threads} thr, busy {p.cpu.busy_share:.0%}"
        else:
            use = "-"
        rows.append(
            [
                p.member,
                str(p.batch_size),
                p.status,
                f"{lat.median_s * 1e3:.2f}",
                f"{lat.p99_s * 1e3:.2f}" + (" (!)" if lat.high_variance else ""),
                f"{p.throughput_sps:.0f}",
                _mib(mem.weights_bytes if mem else None),
                _mib(mem.peak_activation_bytes if mem else None),
                f"{p.load_time_s * 1e3:.0f}",
                "-" if p.host_share is None else f"{p.host_share:.0%}",
                use,
            ]
        )
    return rows


def cmd_profile(args: argparse.Namespace) -> int:

    from colocate import devices
    from colocate.profiling import ProfileCache, ProfileSettings, profile, profile_variants

    device = devices.find_device(args.device)
    _writable_file(args.out)
    if not args.no_cache:
        _check_cache_folder(args.cache_dir)
    ensemble = _load_ensemble(args, device)
    settings = ProfileSettings(
        warmup=args.warmup,
        repeats=args.repeats,
        kernels=not args.no_trace,
        thread_scaling=not args.no_thread_scaling,
    )
    cache: ProfileCache | bool = False if args.no_cache else ProfileCache(args.cache_dir)
    console = _console(stderr=args.json)
    with _progress_bar(console, "profiling", disable=args.json) as bar:
        task = bar.add_task(ensemble.name, total=len(ensemble.members) * len(args.batch_sizes))

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        variants = None
        if args.backends:
            variants = profile_variants(
                ensemble,
                device,
                args.batch_sizes,
                backends=args.backends,
                settings=settings,
                isolated=False,
                cache=cache,
                progress=progress,
            )
            result = variants.default_set
        else:
            result = profile(
                ensemble, device, args.batch_sizes, settings=settings, cache=cache, progress=progress
            )
    saved: Any = variants if variants is not None else result
    if args.out:
        serde.save(saved, args.out)
    if args.json:
        print(serde.dumps(saved))
        return 0
    columns = [
        "member",
        "batch",
        "status",
        "p50 ms",
        "p99 ms",
        "samples/s",
        "weights MiB",
        "peak act MiB",
        "load ms",
        "host",
        "device use",
    ]
    title = f"Profiles of {ensemble.name} on {device.name}"
    if variants is None:
        console.print(_table(title, columns, profile_rows(result.profiles)))
    else:
        for label, found in variants.sets.items():
            console.print(_table(f"{title}, backend {label}", columns, profile_rows(found.profiles)))
    if isinstance(cache, ProfileCache):
        console.print(f"cache {cache.root}: {cache.hits} hit(s), {cache.misses} miss(es)")
    if args.out:
        console.print(f"wrote {args.out}")
    return 0


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes must be integers like 1,8,32; got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive; got {text!r}")
    return sizes


def _backends_arg(text: str) -> str:
    """``--backends``: ``auto`` or comma-separated variant labels, checked now."""
    from colocate.variants import parse_backends

    try:
        parse_backends(text)
    except ColocateError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _add_backends_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backends",
        type=_backends_arg,
        default=None,
        help="choose each member's backend variant among these: auto (every usable one but "
        "torch+compile) or e.g. torch,torch+cudagraph,torch+compile,onnxruntime; profiles each "
        "variant (see docs/planning.md)",
    )


def _load_profiles(path: str) -> Any:
    """A profiles file: a ProfileSet, or VariantProfiles (from ``profile --backends``)."""
    from pathlib import Path

    from colocate.profiling import ProfileSet, VariantProfiles

    try:
        kind = json.loads(Path(path).read_text(encoding="utf-8")).get("type")
    except (OSError, ValueError, AttributeError):
        kind = None  # serde.load says what is wrong with the file
    return serde.load(VariantProfiles if kind == "VariantProfiles" else ProfileSet, path)


def _profiles_for(args: argparse.Namespace, ensemble: Any, device: Any, batch_sizes: Sequence[int]) -> Any:
    """Profiles from --profiles files, else measured now (cached) on the device or, for a
    simulated device, on the CPU (the planner then scales them and marks them estimated).
    With --backends: each member's profiles under each backend variant (VariantProfiles)."""
    from colocate import devices
    from colocate.profiling import ProfileSet, VariantProfiles, profile_isolated, profile_variants

    backends = getattr(args, "backends", None)
    if getattr(args, "profiles", None):
        files = [_load_profiles(path) for path in args.profiles]
        if any(isinstance(f, VariantProfiles) for f in files):
            if len(files) != 1:
                raise InvalidInputError(
                    "--profiles: give one file of variant profiles (from colocate profile --backends ... "
                    "--out FILE), not several"
                )
            _check_profiles_match(ensemble, files[0].default_set.profiles, args.profiles)
            return files[0] if backends else files[0].default_set
        if backends:
            raise InvalidInputError(
                "--backends needs each member's profiles under each backend variant: make them with "
                "colocate profile --backends ... --out FILE, or leave out --profiles to measure now"
            )
        loaded: list[Any] = []
        for found in files:
            loaded.extend(found.profiles)
        _check_profiles_match(ensemble, loaded, args.profiles)
        return ProfileSet(tuple(loaded))
    _check_cache_folder()  # the profiles land in the user cache: fail now, not after measuring
    where = device if device.can_execute else devices.cpu_device()
    if not device.can_execute:
        print(
            f"colocate: no --profiles given for {device.name}: profiling on the CPU; the plan "
            "scales those figures to the device and marks them estimated",
            file=sys.stderr,
        )
    # in a child process: this one may go on to run plans, which framework work done here slows
    if backends:
        return profile_variants(ensemble, where, batch_sizes, backends=backends)
    return profile_isolated(ensemble, where, batch_sizes)


def _check_profiles_match(ensemble: Any, profiles: Sequence[Any], paths: Sequence[str]) -> None:
    recorded = {p.member: p.model_hash for p in profiles if p.model_hash}
    files = ", ".join(paths)
    _check_models_match(ensemble, recorded, f"--profiles {files}", "profiles (colocate profile --out FILE)")


def cmd_plan(args: argparse.Namespace) -> int:
    from colocate import devices
    from colocate.planning import PLAN_COLUMNS, plan, plan_all, plan_rows, render_plan

    if args.all and args.out:
        raise InvalidInputError(
            "--out saves one plan, and --all makes one per strategy: leave out --all (and pick one "
            "with --strategy), or print them all with --all --json > FILE"
        )
    if args.objective == "throughput_under_latency" and args.latency_bound_ms is None:
        raise InvalidInputError(
            "--objective throughput_under_latency needs --latency-bound-ms (the most median latency "
            "a plan may have, in milliseconds), e.g. --latency-bound-ms 50"
        )
    device = devices.find_device(args.device)
    _writable_file(args.out)
    ensemble = _load_ensemble(args, device)
    sizes = [args.batch_size] if args.batch_size else [1, 8, 32]
    profiles = _profiles_for(args, ensemble, device, sizes)
    bound = args.latency_bound_ms / 1e3 if args.latency_bound_ms is not None else None
    common: dict[str, Any] = {
        "batch_size": args.batch_size,
        "objective": args.objective,
        "latency_bound_s": bound,
        "backends": args.backends,
    }
    if args.calibration:
        from colocate.comparison import check_calibration_fits, load_calibration

        calibration = load_calibration(args.calibration)
        if args.batch_size is None:  # plan where the calibration measured
            common["batch_size"] = calibration.batch_size
        check_calibration_fits(calibration, ensemble.name, common["batch_size"])
        common["measured_plans"] = calibration.measured_plans()
        common["model"] = calibration.model()  # the measured pairs and the time scale
    console = _console()
    if args.all:
        plans = plan_all(ensemble, device, profiles, **common)
        if args.json:
            print(json.dumps([serde.to_dict(p) for p in plans], indent=2))
            return 0
        console.print(_table(f"Plans for {ensemble.name} on {device.name}", PLAN_COLUMNS, plan_rows(plans)))
        for line in getattr(plans, "rejected", ()):
            console.print(f"rejected: {line}")
        return 0
    chosen = plan(ensemble, device, profiles, strategy=args.strategy, **common)
    if args.out:
        serde.save(chosen, args.out)
    if args.json:
        print(serde.dumps(chosen))
        return 0
    console.print(render_plan(chosen))
    if args.out:
        console.print(f"wrote {args.out} (run it with: colocate run --plan {args.out})")
    return 0


def _run_settings(args: argparse.Namespace) -> Any:
    from colocate.comparison import RunSettings

    seconds = args.seconds if args.requests is None else None
    return RunSettings(
        rates=tuple(getattr(args, "rates", ()) or ()),
        requests=args.requests,
        seconds=seconds,
        concurrency=args.concurrency,
        allow_mps_start=args.allow_mps_start,
        cuda_graphs=args.cuda_graphs,
        repeats=getattr(args, "repeats", 1),
        reply_wait=args.reply_wait,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from colocate.comparison import execute
    from colocate.planning import plan
    from colocate.planning.types import Plan

    _writable_file(args.out)
    if args.plan:
        chosen = serde.load(Plan, args.plan)
        if args.batch_size is not None and args.batch_size != chosen.batch_size:
            raise InvalidInputError(
                f"--batch-size {args.batch_size}: the plan {args.plan} is for batch size "
                f"{chosen.batch_size}, which its slots and predictions were made for; leave out "
                f"--batch-size, or make a plan for {args.batch_size} (colocate plan --batch-size "
                f"{args.batch_size} --out FILE)"
            )
        device = chosen.device
        if not device.can_execute:
            device = _device_to_run(args.device)
            _check_simulated_plan_runs_on(chosen, device, args.plan)
            chosen = dataclasses.replace(chosen, device=device)
    else:
        device = _device_to_run(args.device)
        args.batch_size = args.batch_size or 8
        ensemble_for_plan = _load_ensemble(args, device)
        profiles = _profiles_for(args, ensemble_for_plan, device, [args.batch_size])
        chosen = plan(
            ensemble_for_plan,
            device,
            profiles,
            strategy=args.strategy,
            batch_size=args.batch_size,
            backends=args.backends,
        )
    ensemble = _load_ensemble(args, device)
    if args.plan:
        _check_models_match(ensemble, dict(chosen.model_hashes), f"the plan {args.plan}", "a plan")
    settings = _run_settings(args)
    console = _console(stderr=args.json)  # with --json, stdout carries only the JSON
    from colocate.planning.render import backend_text

    def shown(member: str) -> str:
        return member if chosen.backend_of(member) is None else f"{member} ({backend_text(chosen, member)})"

    console.print(
        f"running plan '{chosen.strategy}' on {device.name}: "
        + "; ".join(f"{s.name} {s.kind}: {', '.join(map(shown, s.members))}" for s in chosen.slots)
    )
    with _progress_bar(console, "requests", disable=args.json) as bar:
        task = bar.add_task("run", total=settings.requests)
        result = execute(
            chosen,
            ensemble,
            settings,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        ).run
    if args.out:
        serde.save(result, args.out)
    if args.json:
        print(serde.dumps(result))
        return 0
    lat = result.latency
    console.print(
        f"{result.requests_completed} requests ({result.requests_failed} failed) in {result.wall_s:.2f} s: "
        f"{result.throughput_sps:,.0f} samples/s (predicted {chosen.prediction.throughput_sps:,.0f})"
    )
    if lat is not None:
        console.print(
            f"latency ms: p50 {lat.median_s * 1e3:.2f}  p90 {lat.p90_s * 1e3:.2f}  p99 {lat.p99_s * 1e3:.2f}"
            f"  (predicted p50 {chosen.prediction.latency_s * 1e3:.2f})"
        )
    overhead = result.overhead
    if lat is not None and overhead is not None:
        console.print(
            f"outside the members ms: p50 {overhead.median_s * 1e3:.2f} of the {lat.median_s * 1e3:.2f} "
            "(queueing behind other requests, hand-offs to and from the slots, bookkeeping)"
        )
    peak = result.peak_memory_bytes
    if peak is not None:
        console.print(
            f"peak memory {peak / 2**20:,.0f} MiB"
            + (f", GPU busy {result.utilization_pct:.0f}%" if result.utilization_pct is not None else "")
        )
    for error in result.errors:
        console.print(f"error: {error}")
    return 0 if result.status == "ok" else 1


def _check_simulated_plan_runs_on(chosen: Any, device: Any, path: str) -> None:
    """A plan made for a simulated GPU runs on a real GPU (its predictions are for the simulated
    one: said on stderr), never on the CPU, whose slots and memory it was not made for."""
    if device.kind != "cuda":
        raise InvalidInputError(
            f"--plan {path}: the plan is for '{chosen.device.name}', a simulated GPU, and this would "
            f"run it on {device.name} ({device.kind}), which it was not made for; make a plan for "
            f"this device (colocate plan --device {device.kind} --out FILE), or run it on a GPU"
        )
    print(
        f"colocate: the plan {path} was made for '{chosen.device.name}' (simulated): running it on "
        f"{device.name}; its predictions are the simulated GPU's",
        file=sys.stderr,
    )


def _check_models_match(ensemble: Any, recorded: dict[str, str], what: str, made: str) -> None:
    """Refuse ``what`` (profiles or a plan) when it was made for other models than the ensemble's
    (members whose model can be hashed without building it: the zoo's, model files)."""
    from colocate.profiling.cache import model_mismatches

    wrong = model_mismatches(ensemble.members, recorded)
    if wrong:
        raise InvalidInputError(
            f"{what} was made for other models than ensemble '{ensemble.name}': {'; '.join(wrong)}; "
            f"give the same --scale/--ensemble as when it was made, or make {made} for this ensemble"
        )


def cmd_compare(args: argparse.Namespace) -> int:
    from colocate.comparison import observing_runs, run_record

    device = _device_to_run(args.device)
    if args.out:
        _writable_folder(args.out, "--out")
    settings = _run_settings(args)
    ensemble = _load_ensemble(args, device)
    if args.calibration:  # before anything is measured: it must fit every batch size compared
        from colocate.comparison import check_calibration_fits, load_calibration

        for batch_size in args.batch_sizes:
            check_calibration_fits(load_calibration(args.calibration), ensemble.name, batch_size)
    console = _console()
    say = (lambda line: None) if args.json else (lambda line: console.print(f"[dim]{line}[/dim]"))
    profiles = _profiles_for(args, ensemble, device, args.batch_sizes)
    with contextlib.ExitStack() as stack:
        if args.out:
            # every plan run (calibration's too) as it ends: a comparison stopped early keeps them
            Path(args.out).mkdir(parents=True, exist_ok=True)
            log = stack.enter_context(open(Path(args.out) / "runs.jsonl", "w", encoding="utf-8"))

            def append(label: str, plan: Any, measured: Any, failure: str | None) -> None:
                ended = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
                log.write(json.dumps({**run_record(label, plan, measured, failure), "ended": ended}) + "\n")
                log.flush()

            stack.enter_context(observing_runs(append))
        return _compare_batches(args, ensemble, device, profiles, settings, console, say)


def _compare_batches(
    args: argparse.Namespace,
    ensemble: Any,
    device: Any,
    profiles: Any,
    settings: Any,
    console: Any,
    say: Any,
) -> int:
    from colocate.comparison import compare, load_calibration, regime_rows, save_report
    from colocate.report import rate_rows, render_table

    reports = []
    for batch_size in args.batch_sizes:
        calibration: Any = None if args.no_calibrate else "auto"
        if args.calibration:
            calibration = load_calibration(args.calibration)
        report = compare(
            ensemble,
            device,
            args.strategies,
            profiles=profiles,
            batch_size=batch_size,
            settings=settings,
            calibration=calibration,
            progress=say,
            backends=args.backends,
        )
        reports.append(report)
        if args.out:
            out = args.out if len(args.batch_sizes) == 1 else f"{args.out}/batch-{batch_size}"
            written = save_report(report, out)
            if report.calibrated and report.calibration is not None:
                serde.save(report.calibration, f"{out}/calibration.json")
            if not args.json:
                console.print(f"wrote {', '.join(str(p) for p in written.values())}")
        if not args.json:
            console.print(render_table(report))
            columns, rows = rate_rows(report)
            if rows:
                title = f"Latency p50 / p99 ms versus offered load, batch {report.batch_size}"
                console.print(_table(title, columns, rows))
            tied = report.tied_with_best()
            best = report.best
            if tied and best is not None and report.rounds > 1:
                console.print(
                    f"tied with the best ('{best.name}'): {', '.join(tied)}: their ranges over "
                    f"{report.rounds} rounds overlap; more --repeats or --seconds may separate them"
                )
            for note in report.notes:
                console.print(note)
            after, before = report.model_error(), report.model_error(calibrated=False)
            if after is not None:
                line = f"cost model median throughput error: {after:.0%}"
                console.print(line + (f" (before calibration {before:.0%})" if before is not None else ""))
    code = _all_failed_code(reports)
    if args.json:
        print(json.dumps([serde.to_dict(r) for r in reports], indent=2))
        return code
    if len(reports) > 1:
        console.print(
            _table(
                "Where each plan wins",
                ["batch", "best", "speed-up", "Pareto set (throughput, p99, memory)"],
                regime_rows(reports),
            )
        )
    _say_all_failed(reports)
    return code


def _add_ensemble_args(
    p: argparse.ArgumentParser, *, simulated: bool = True, ensemble: bool = True, profiles: bool = True
) -> None:
    """The arguments that choose the device and the ensemble (and, optionally, its profiles)."""
    where = "best (default), cpu, cuda, cuda:N"
    if simulated:
        where += ", or a simulated GPU: sim:h100, h100, spec.json"
    else:
        where += " (a device that runs models; a simulated GPU can only be planned for: colocate plan)"
    p.add_argument("--device", default="best", help=where)
    if ensemble:
        p.add_argument(
            "--ensemble",
            default=None,
            help="module:function returning a colocate.Ensemble, the module importable from the current "
            "folder or the PYTHONPATH (default: the embedded default ensemble)",
        )
    p.add_argument(
        "--scale",
        choices=("tiny", "small", "large"),
        default=None,
        help="default-ensemble model size (default: large on a GPU, small on the CPU)",
    )
    p.add_argument(
        "--backend", choices=("torch", "onnxruntime"), default="torch", help="default-ensemble backend"
    )
    if profiles:
        p.add_argument(
            "--profiles",
            nargs="*",
            default=None,
            help="profile JSON files (from colocate profile --out) instead of measuring now",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="colocate", description="Profile, plan and run an ensemble of models on one GPU."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("devices", help="list the devices of this machine")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--simulated", action="store_true", help="also list the simulated GPU presets")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("demo", help="profile, plan, run and compare the default ensemble")
    _add_ensemble_args(p, simulated=False, ensemble=False, profiles=False)
    p.add_argument("--batch-size", type=_whole(1, "samples"), default=8)
    p.add_argument("--repeats", type=_whole(1, "runs"), default=10, help="timed runs per member (--quick)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="only load each member and time it once, no planning or comparison",
    )
    p.add_argument("--seconds", type=_positive("seconds"), default=2.0, help="seconds each plan runs")
    p.add_argument(
        "--rounds",
        type=_whole(1, "rounds"),
        default=2,
        help="rounds of every plan, interleaved; the report gives medians and ranges (as compare --repeats)",
    )
    p.add_argument("--out", default="colocate-report", help="folder for the report and plot")
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON: the DemoResult (--quick) or the Report, wrapped as colocate.serde.dumps "
        "writes it (load it back with colocate.serde.loads)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("profile", help="profile each member per batch size (memory, latency, kernels)")
    _add_ensemble_args(p, simulated=False, profiles=False)
    p.add_argument("--batch-sizes", type=_batch_sizes, default=[1, 8, 32], help="e.g. 1,8,32")
    p.add_argument("--warmup", type=_whole(0, "runs"), default=3, help="untimed runs before timing")
    p.add_argument("--repeats", type=_whole(1, "runs"), default=20, help="timed runs per member and batch")
    p.add_argument("--no-trace", action="store_true", help="skip the kernel / operator trace")
    p.add_argument("--no-thread-scaling", action="store_true", help="skip the CPU thread sweep")
    p.add_argument("--no-cache", action="store_true", help="measure again, do not use the cache")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="profile cache directory (default: $COLOCATE_CACHE_DIR or ~/.cache/colocate)/profiles",
    )
    _add_backends_arg(p)
    p.add_argument("--out", default=None, help="also write the profiles to this JSON file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_profile)

    def add_run_args(p: argparse.ArgumentParser, seconds: float) -> None:
        from colocate.execution.front import REPLY_WAITS

        p.add_argument(
            "--requests", type=_whole(1, "requests"), default=None, help="requests per run (default: by time)"
        )
        p.add_argument("--seconds", type=_positive("seconds"), default=seconds, help="seconds per run")
        p.add_argument(
            "--concurrency",
            type=_whole(1, "requests"),
            default=None,
            help="requests in flight (default 2 per slot)",
        )
        p.add_argument(
            "--allow-mps-start",
            action="store_true",
            help="mps slots may start a private MPS control daemon (stopped afterwards)",
        )
        p.add_argument("--cuda-graphs", action="store_true", help="torch members replay CUDA graphs")
        p.add_argument(
            "--reply-wait",
            choices=REPLY_WAITS,
            default="auto",
            help="how a request waits for worker processes' replies at --concurrency 1: poll near the "
            "expected reply when a core is free (auto), poll throughout (spin), or sleep (block)",
        )

    from colocate.planning import OBJECTIVES, STRATEGIES

    p = sub.add_parser("plan", help="plan how to co-locate the members (and why)")
    _add_ensemble_args(p)
    p.add_argument("--strategy", choices=STRATEGIES, default="auto")
    p.add_argument("--all", action="store_true", help="one plan per strategy, side by side")
    p.add_argument("--batch-size", type=_whole(1, "samples"), default=None)
    p.add_argument("--objective", choices=OBJECTIVES, default="throughput")
    p.add_argument(
        "--latency-bound-ms",
        type=_positive("milliseconds"),
        default=None,
        help="the most median latency a plan may have (needed by --objective throughput_under_latency)",
    )
    _add_backends_arg(p)
    p.add_argument(
        "--calibration",
        default=None,
        help="a calibration JSON (colocate compare --out writes calibration.json): plan with its measured "
        "pair slowdowns, and let 'auto' settle a close call by its measured plans",
    )
    p.add_argument("--out", default=None, help="write the plan as JSON (for colocate run --plan)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the Plan as JSON (as colocate.serde.dumps writes it); with --all, a JSON list of "
        "plans, each as colocate.serde.to_dict gives it",
    )
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="run a plan for real and measure it")
    _add_ensemble_args(p, simulated=False)
    p.add_argument("--plan", default=None, help="a plan JSON file from colocate plan --out")
    p.add_argument("--strategy", choices=STRATEGIES, default="auto", help="plan with this if no --plan")
    p.add_argument(
        "--batch-size",
        type=_whole(1, "samples"),
        default=None,
        help="the request batch size (default 8; with --plan, the plan's, which a different value refuses)",
    )
    add_run_args(p, seconds=5.0)
    _add_backends_arg(p)
    p.add_argument("--out", default=None, help="write the RunResult as JSON")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the RunResult as JSON (as colocate.serde.dumps writes it) and only that on stdout",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="run several plans the same way and compare them")
    _add_ensemble_args(p, simulated=False)
    p.add_argument(
        "--strategies",
        type=_strategies,
        default=["sequential", "streams", "processes", "auto"],
        help=f"planner strategies separated by commas, among {', '.join(STRATEGIES)} (a name may end "
        "in +backends); default sequential,streams,processes,auto",
    )
    p.add_argument("--batch-sizes", type=_batch_sizes, default=[8], help="e.g. 1,8,64 for a regime map")
    add_run_args(p, seconds=3.0)
    p.add_argument(
        "--repeats",
        "--rounds",
        dest="repeats",
        type=_whole(1, "rounds"),
        default=1,
        help="run the plans in this many rounds, every plan once per round in a rotated order; the "
        "report gives each plan's median samples/s and its range (412 ±6%%) and marks plans tied with "
        "the best (~). One 2-3 s run varies by 15-30 %%: use 3 or more to compare close plans",
    )
    p.add_argument(
        "--rates",
        type=_rates,
        default=(),
        help="offered loads in requests/s for a latency sweep after each run, e.g. 5,20,50",
    )
    p.add_argument(
        "--no-calibrate",
        action="store_true",
        help="plan 'auto' from the model alone (default: measure a few member pairs first, in the slot "
        "kind of the plans that use them, then run briefly the best candidate plans (those predicted "
        "within 20%% of each other) and the plans made by hand (a loop, a thread or a process per "
        "member), so 'auto' picks the measured-best)",
    )
    p.add_argument("--calibration", default=None, help="reuse a saved calibration JSON")
    _add_backends_arg(p)
    p.add_argument("--out", default=None, help="folder for report.json/.csv/.txt/.png")
    p.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list, one Report per --batch-sizes entry, each as colocate.serde.to_dict "
        "gives it (no schema_version/type wrapper: load an item with "
        "colocate.serde.from_dict(colocate.report.Report, item)); --out also writes each report as "
        "a wrapped report.json",
    )
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``colocate`` command."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ColocateError as exc:
        print(f"colocate: error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
