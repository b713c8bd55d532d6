"""The ``colocate`` command line: a thin layer over the public functions.

Subcommands: ``devices`` and ``demo`` (more arrive with the profiler, planner
and executor). Every subcommand takes ``--json`` for machine-readable output.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from colocate import serde
from colocate.errors import ColocateError


def _console() -> Any:
    from rich.console import Console

    # Piped output (logs, CI) gets a wide table instead of rich's 80-column default.
    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table


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
    from colocate import demo, devices

    device = devices.find_device(args.device)
    ensemble = demo.default_ensemble_for(device, args.scale, args.backend)
    console = _console()
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


def _load_ensemble(args: argparse.Namespace, device: Any) -> Any:
    """The ensemble named by --ensemble (``module:function``) or the default one."""
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
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InvalidInputError(f"--ensemble {args.ensemble!r}: cannot load it ({exc})") from exc
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from colocate import devices
    from colocate.profiling import ProfileCache, ProfileSettings, profile

    device = devices.find_device(args.device)
    ensemble = _load_ensemble(args, device)
    settings = ProfileSettings(
        warmup=args.warmup, repeats=args.repeats, kernels=not args.no_trace,
        thread_scaling=not args.no_thread_scaling,
    )
    cache: ProfileCache | bool = False if args.no_cache else ProfileCache(args.cache_dir)
    console = _console()
    with Progress(
        TextColumn("[bold]profiling[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=args.json,
    ) as bar:
        task = bar.add_task(ensemble.name, total=len(ensemble.members) * len(args.batch_sizes))
        result = profile(
            ensemble,
            device,
            args.batch_sizes,
            settings=settings,
            cache=cache,
            progress=lambda done, total, what: bar.update(task, completed=done, description=what),
        )
    if args.out:
        serde.save(result, args.out)
    if args.json:
        print(serde.dumps(result))
        return 0
    columns = [
        "member", "batch", "status", "p50 ms", "p99 ms", "samples/s", "weights MiB",
        "peak act MiB", "load ms", "host", "device use",
    ]
    title = f"Profiles of {ensemble.name} on {device.name}"
    console.print(_table(title, columns, profile_rows(result.profiles)))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="colocate", description="Profile, plan and run an ensemble of models on one GPU."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("devices", help="list the devices of this machine")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--simulated", action="store_true", help="also list the simulated GPU presets")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("demo", help="run the default ensemble once on the best device")
    p.add_argument("--device", default="best", help="best (default), cpu, cuda, cuda:N")
    p.add_argument(
        "--scale", choices=("tiny", "small", "large"), default=None,
        help="model size (default: large on a GPU, small on the CPU)",
    )
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10, help="timed runs per member")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("profile", help="profile each member per batch size (memory, latency, kernels)")
    p.add_argument("--device", default="best", help="best (default), cpu, cuda, cuda:N")
    p.add_argument("--ensemble", default=None, help="module:function returning a colocate.Ensemble "
                   "(default: the embedded default ensemble)")
    p.add_argument("--scale", choices=("tiny", "small", "large"), default=None,
                   help="default-ensemble model size (default: large on a GPU, small on the CPU)")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                   help="default-ensemble backend")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=[1, 8, 32], help="e.g. 1,8,32")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-trace", action="store_true", help="skip the kernel / operator trace")
    p.add_argument("--no-thread-scaling", action="store_true", help="skip the CPU thread sweep")
    p.add_argument("--no-cache", action="store_true", help="measure again, do not use the cache")
    p.add_argument("--cache-dir", default=None, help="profile cache directory "
                   "(default: $COLOCATE_CACHE_DIR or ~/.cache/colocate)/profiles")
    p.add_argument("--out", default=None, help="also write the profiles to this JSON file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_profile)
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
