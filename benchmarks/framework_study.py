#!/usr/bin/env python3
"""Framework and configuration study: each zoo model over backends, batch sizes, threads and precisions.

    python benchmarks/framework_study.py                       # the best device, its defaults
    python benchmarks/framework_study.py --device cpu --threads 1,2 --batch-sizes 1,8,32,64
    python benchmarks/framework_study.py --smoke --device cpu --out /tmp/study.json

For every zoo architecture and every configuration (backend, precision, intra-op threads)
it profiles the model alone at each batch size with ``colocate.profiling.profile``
(no cache, no kernel trace, no thread scaling, no energy) and records throughput,
latency p50/p95/p99, load time, memory (weights + peak activations) and the status (an
out-of-memory batch or a failing configuration is recorded and the study goes on).

Backends (``--backends``):

- ``torch``: eager PyTorch.
- ``torch-cudagraph``: PyTorch replaying a CUDA graph per batch (member option ``cuda_graph``);
  GPU only.
- ``torch-compile``: PyTorch through ``torch.compile`` (member option ``compile``; inductor
  needs a C++ compiler on the CPU, triton on a GPU, else skipped with the reason). Only when
  named in ``--backends``: every model compiles once per batch size (8-29 s each for the
  small zoo on a 2-core CPU), which the rows record as ``compile_s`` (the first call at that
  batch size, compiling included; the warm-up, not the timed runs).
- ``onnxruntime``: the model exported to ONNX (fp32) and run by ONNX Runtime: its CPU
  provider on the CPU; on a GPU only where onnxruntime has the CUDA provider (otherwise
  skipped with a note, as on a machine with the CPU build only).
- ``tensorrt``: the ONNX file built into a TensorRT engine; GPU only, and only where
  ``tensorrt`` imports (otherwise skipped with a note).

On the CPU the intra-op thread count is varied (``--threads``): ONNX Runtime gets it as the
member option ``intra_op_num_threads``, torch (eager or compiled) through
``torch.set_num_threads`` around the measurement (restored afterwards). On a GPU the
precision is varied (``--precisions fp32,fp16``; the ONNX export is fp32, so ONNX Runtime
runs fp32 only).

It prints one table per model and a winner table (the fastest configuration for each model
and batch size, with each backend's best beside it), writes JSON with the device, versions,
date and command (default ``benchmarks/results/<UTC stamp>-<device>-framework-study.json``),
and a PNG beside it: throughput against batch size per configuration, one panel per model.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import ROOT, device_tag, int_list, save_figure, word_list, write_result
from colocate import devices, serde, variants, zoo
from colocate._timing import percentile
from colocate.devices import Device
from colocate.ensemble import Member
from colocate.profiling import ProfileSettings, compile_seconds, profile

BACKENDS: tuple[str, ...] = ("torch", "torch-cudagraph", "torch-compile", "onnxruntime", "tensorrt")
DEFAULT_BACKENDS: tuple[str, ...] = tuple(b for b in BACKENDS if b != "torch-compile")
_TORCH_THREADED = ("torch", "torch-compile")  # torch.set_num_threads sets their intra-op threads
SMOKE_ARCHS: tuple[str, ...] = ("resnet", "mlp")
_MIB = float(1 << 20)


@dataclasses.dataclass(frozen=True)
class Config:
    """One way to run a model: backend, precision and intra-op threads (None: the library default)."""

    backend: str
    precision: str
    threads: int | None

    @property
    def label(self) -> str:
        threads = "" if self.threads is None else f" t{self.threads}"
        return f"{self.backend} {self.precision}{threads}"


def _onnxruntime_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _tensorrt_importable() -> str | None:
    """None when tensorrt imports, else why not."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"{type(exc).__name__}: {exc}"
    return None


def plan_configs(
    device: Device, backends: list[str], precisions: list[str], threads: list[int]
) -> tuple[list[Config], list[dict[str, str]]]:
    """The configurations to run on ``device``, and the skipped ones with the reason."""
    gpu = device.kind == "cuda"
    configs: list[Config] = []
    skipped: list[dict[str, str]] = []

    def skip(backend: str, precision: str, reason: str) -> None:
        skipped.append({"backend": backend, "precision": precision, "reason": reason})

    thread_choices: list[int | None] = list(threads) if not gpu and threads else [None]
    for backend in backends:
        if backend not in BACKENDS:
            raise SystemExit(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        for precision in precisions:
            if backend == "torch-cudagraph" and not gpu:
                skip(backend, precision, "CUDA graphs need a GPU")
                continue
            if backend == "torch-compile":
                why = variants.device_problem("torch+compile", device)
                if why is not None:
                    skip(backend, precision, why)
                    continue
            if backend == "onnxruntime":
                if gpu and not _onnxruntime_cuda():
                    skip(backend, precision, "onnxruntime has no CUDAExecutionProvider here (CPU build only)")
                    continue
                if precision != "fp32":
                    skip(
                        backend,
                        precision,
                        "the ONNX export is fp32; ONNX Runtime runs the exported precision",
                    )
                    continue
            if backend == "tensorrt":
                if not gpu:
                    skip(backend, precision, "TensorRT needs a GPU")
                    continue
                why = _tensorrt_importable()
                if why is not None:
                    skip(backend, precision, f"tensorrt does not import ({why})")
                    continue
            choices = thread_choices if backend in (*_TORCH_THREADED, "onnxruntime") else [None]
            configs.extend(Config(backend, precision, t) for t in choices)
    return configs, skipped


def member_for(arch: str, scale: Any, config: Config, onnx_path: Path | None) -> Member:
    """The zoo member of ``arch`` for ``config`` (ONNX-based backends load ``onnx_path``)."""
    base = zoo.member(arch, scale=scale, precision=config.precision)
    if config.backend == "torch":
        return base
    if config.backend == "torch-cudagraph":
        return dataclasses.replace(base, options={"cuda_graph": True})
    if config.backend == "torch-compile":
        return dataclasses.replace(base, options={"compile": True})
    if onnx_path is None:
        raise RuntimeError(f"no ONNX file for {arch}")
    options: dict[str, Any] = {}
    if config.backend == "onnxruntime" and config.threads is not None:
        options["intra_op_num_threads"] = config.threads
    return dataclasses.replace(base, backend=config.backend, source=onnx_path, options=options)


def _row(arch: str, config: Config, batch: int, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "arch": arch,
        "backend": config.backend,
        "precision": config.precision,
        "threads": config.threads,
        "threads_via": (
            None
            if config.threads is None
            else ("intra_op_num_threads" if config.backend == "onnxruntime" else "torch.set_num_threads")
        ),
        "config": config.label,
        "batch_size": batch,
        "status": "ok",
        "error": None,
        "throughput_sps": 0.0,
        "latency_p50_s": None,
        "latency_p95_s": None,
        "latency_p99_s": None,
        "latency_mean_s": None,
        "latency_samples": 0,
        "high_variance": None,
        "load_time_s": None,
        "compile_s": None,
        "weights_bytes": None,
        "peak_activation_bytes": None,
        "memory_total_bytes": None,
        "memory_source": None,
    }
    row.update(fields)
    return row


def run_config(
    arch: str,
    config: Config,
    member: Member,
    device: Device,
    sizes: list[int],
    settings: ProfileSettings,
) -> list[dict[str, Any]]:
    """Profile one (arch, config) at every batch size: one row per batch size, never raising."""
    torch_threads_before: int | None = None
    try:
        if config.threads is not None and config.backend in _TORCH_THREADED:
            import torch

            torch_threads_before = int(torch.get_num_threads())
            torch.set_num_threads(config.threads)
        result = profile(member, device, sizes, settings=settings, cache=False)
    except Exception as exc:  # a failing configuration is recorded; the study goes on
        error = f"{type(exc).__name__}: {exc}"
        return [_row(arch, config, b, status="failed", error=error) for b in sizes]
    finally:
        if torch_threads_before is not None:
            import torch

            torch.set_num_threads(torch_threads_before)
    rows = []
    for b in sizes:
        p = result.get(member.name, b)
        if p is None:
            rows.append(_row(arch, config, b, status="failed", error="no profile returned"))
            continue
        fields: dict[str, Any] = {
            "status": p.status,
            "error": p.error,
            "load_time_s": p.load_time_s,
            "compile_s": compile_seconds(p),
        }
        if p.memory is not None:
            fields.update(
                weights_bytes=p.memory.weights_bytes,
                peak_activation_bytes=p.memory.peak_activation_bytes,
                memory_total_bytes=p.memory.total_bytes,
                memory_source=p.memory.source,
            )
        if p.latency is not None:
            ordered = sorted(p.latency.samples_s)
            fields.update(
                throughput_sps=p.throughput_sps,
                latency_p50_s=p.latency.median_s,
                latency_p95_s=percentile(ordered, 95),
                latency_p99_s=p.latency.p99_s,
                latency_mean_s=p.latency.mean_s,
                latency_samples=len(ordered),
                high_variance=p.latency.high_variance,
            )
        rows.append(_row(arch, config, b, **fields))
    return rows


def winners(rows: list[dict[str, Any]], archs: list[str], sizes: list[int]) -> list[dict[str, Any]]:
    """For each arch and batch size: the fastest configuration, and each backend's best."""
    table = []
    for arch in archs:
        for b in sizes:
            ok = [r for r in rows if r["arch"] == arch and r["batch_size"] == b and r["status"] == "ok"]
            if not ok:
                table.append(
                    {"arch": arch, "batch_size": b, "winner": None, "throughput_sps": 0.0, "by_backend": {}}
                )
                continue
            best = max(ok, key=lambda r: r["throughput_sps"])
            by_backend: dict[str, dict[str, Any]] = {}
            for r in ok:
                known = by_backend.get(r["backend"])
                if known is None or r["throughput_sps"] > known["throughput_sps"]:
                    by_backend[r["backend"]] = {"config": r["config"], "throughput_sps": r["throughput_sps"]}
            table.append(
                {
                    "arch": arch,
                    "batch_size": b,
                    "winner": best["config"],
                    "winner_backend": best["backend"],
                    "throughput_sps": best["throughput_sps"],
                    "latency_p50_s": best["latency_p50_s"],
                    "by_backend": by_backend,
                }
            )
    return table


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.2f}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / _MIB:.1f}"


def print_tables(rows: list[dict[str, Any]], archs: list[str], table: list[dict[str, Any]]) -> None:
    header = (
        f"{'config':<24} {'batch':>5} {'samples/s':>10} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} "
        f"{'load s':>7} {'weights MiB':>11} {'peak MiB':>9}  status (load +N: N s compiling)"
    )
    for arch in archs:
        print(f"\n== {arch}")
        print(header)
        for r in (r for r in rows if r["arch"] == arch):
            load = "-" if r["load_time_s"] is None else f"{r['load_time_s']:.2f}"
            if r["compile_s"] is not None:
                load += f" +{r['compile_s']:.1f}"
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {(r['error'] or '')[:60]}"
            print(
                f"{r['config']:<24} {r['batch_size']:>5} {r['throughput_sps']:>10.1f} "
                f"{_ms(r['latency_p50_s']):>9} {_ms(r['latency_p95_s']):>9} {_ms(r['latency_p99_s']):>9} "
                f"{load:>7} {_mib(r['weights_bytes']):>11} {_mib(r['peak_activation_bytes']):>9}  {status}"
            )
    backends = sorted({b for w in table for b in w["by_backend"]})
    print("\n== winners (fastest configuration per model and batch size; each backend's best beside it)")
    print(
        f"{'model':<13} {'batch':>5} {'winner':<24} {'samples/s':>10}  "
        + "  ".join(f"{b:>20}" for b in backends)
    )
    for w in table:
        cells = []
        for b in backends:
            entry = w["by_backend"].get(b)
            if entry is None:
                cells.append(f"{'-':>20}")
            else:
                share = entry["throughput_sps"] / w["throughput_sps"] if w["throughput_sps"] else 0.0
                cells.append(f"{entry['throughput_sps']:.1f} ({share:.2f}x)".rjust(20))
        print(
            f"{w['arch']:<13} {w['batch_size']:>5} {w['winner'] or 'none ran':<24} "
            f"{w['throughput_sps']:>10.1f}  " + "  ".join(cells)
        )
    wins: dict[str, int] = {}
    for w in table:
        if w["winner"]:
            wins[w["winner_backend"]] = wins.get(w["winner_backend"], 0) + 1
    print("wins by backend: " + (", ".join(f"{b} {n}" for b, n in sorted(wins.items())) or "none"))


def plot(rows: list[dict[str, Any]], archs: list[str], title: str, path: Path) -> Path:
    """Throughput against batch size, one line per configuration, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(archs))
    nrows = math.ceil(len(archs) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.0 * cols, 3.8 * nrows), squeeze=False)
    configs = list(dict.fromkeys(r["config"] for r in rows))
    for i, arch in enumerate(archs):
        ax = axes[i // cols][i % cols]
        for config in configs:
            points = [
                (r["batch_size"], r["throughput_sps"])
                for r in rows
                if r["arch"] == arch and r["config"] == config and r["status"] == "ok"
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=config)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(arch)
        ax.set_xlabel("batch size")
        ax.set_ylabel("samples / s")
        ax.grid(True, which="both", alpha=0.3)
    for j in range(len(archs), nrows * cols):
        axes[j // cols][j % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    return save_figure(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="best")
    parser.add_argument("--scale", default=None, help="zoo scale (default: large on a GPU, small on the CPU)")
    parser.add_argument("--archs", default=None, help=f"comma list of {', '.join(zoo.ARCHITECTURES)}")
    parser.add_argument(
        "--batch-sizes", default=None, help="default 1,8,32,128,256 on a GPU; 1,8,32,64 on the CPU"
    )
    parser.add_argument(
        "--threads", default=None, help="CPU only: intra-op thread counts (default 1,2,4.. cores)"
    )
    parser.add_argument("--precisions", default=None, help="default fp32,fp16 on a GPU; fp32 on the CPU")
    parser.add_argument(
        "--backends",
        default=",".join(DEFAULT_BACKENDS),
        help=f"comma list of {', '.join(BACKENDS)} (default: all but torch-compile)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per batch size (default 20)")
    parser.add_argument("--max-time", type=float, default=None, help="most timed seconds per batch size")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny scale, batch 1,2, two models, 3 repetitions"
    )
    parser.add_argument("--out", default=None, help="result JSON (the PNG goes beside it)")
    args = parser.parse_args()

    device = devices.find_device(args.device)
    gpu = device.kind == "cuda"
    if not device.can_execute:
        raise SystemExit(f"device {device.name} cannot run models; use the CPU or a real GPU")
    if args.smoke:
        scale: Any = args.scale or "tiny"
        sizes = int_list(args.batch_sizes or "1,2")
        archs = word_list(args.archs) if args.archs else list(SMOKE_ARCHS)
        repeats = args.repeats or 3
        max_time = args.max_time if args.max_time is not None else 0.5
        warmup = 1
    else:
        scale = args.scale or ("large" if gpu else "small")
        sizes = int_list(args.batch_sizes or ("1,8,32,128,256" if gpu else "1,8,32,64"))
        archs = word_list(args.archs) if args.archs else list(zoo.ARCHITECTURES)
        repeats = args.repeats or 20
        max_time = args.max_time if args.max_time is not None else 2.0
        warmup = 3
    with contextlib.suppress(ValueError):
        scale = float(scale)
    from colocate.profiling.profiler import thread_counts

    default_threads = [] if gpu else list(thread_counts(device.cpu_cores))
    threads = int_list(args.threads) if args.threads else default_threads
    precisions = word_list(args.precisions or ("fp32,fp16" if gpu else "fp32"))
    notes: list[str] = []
    if gpu and args.threads:
        notes.append("--threads is for the CPU only; on a GPU each library uses its default")
    configs, skipped = plan_configs(device, word_list(args.backends), precisions, threads)
    notes.append(
        "torch.compile: not a colocate backend option (members take cuda_graph, channels_last); not measured"
    )
    settings = ProfileSettings(
        warmup=warmup, repeats=repeats, max_time_s=max_time, kernels=False, thread_scaling=False, energy=False
    )
    for s in skipped:
        print(f"skipped {s['backend']} {s['precision']}: {s['reason']}", flush=True)

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M")
    out = (
        Path(args.out)
        if args.out
        else ROOT / "benchmarks" / "results" / f"{stamp}-{device_tag(device)}-framework-study.json"
    )
    load_before = os.getloadavg()
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    exports: dict[str, dict[str, Any]] = {}
    needs_onnx = any(c.backend in ("onnxruntime", "tensorrt") for c in configs)
    total = len(archs) * len(configs)
    done = 0
    with tempfile.TemporaryDirectory(prefix="colocate-study-") as onnx_dir:
        for arch in archs:
            onnx_path: Path | None = None
            if needs_onnx:
                t0 = time.perf_counter()
                try:
                    onnx_path = zoo.member(
                        arch, scale=scale, backend="onnxruntime", onnx_dir=onnx_dir
                    ).source_path
                    exports[arch] = {
                        "seconds": time.perf_counter() - t0,
                        "bytes": onnx_path.stat().st_size if onnx_path else None,
                        "error": None,
                    }
                except Exception as exc:
                    exports[arch] = {
                        "seconds": time.perf_counter() - t0,
                        "bytes": None,
                        "error": f"{type(exc).__name__}: {exc}",
                    }
                    print(f"{arch}: ONNX export failed: {exports[arch]['error']}", flush=True)
            for config in configs:
                t0 = time.perf_counter()
                try:
                    member = member_for(arch, scale, config, onnx_path)
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    got = [_row(arch, config, b, status="failed", error=error) for b in sizes]
                else:
                    got = run_config(arch, config, member, device, sizes, settings)
                rows.extend(got)
                done += 1
                summary = ", ".join(
                    f"b{r['batch_size']} {r['throughput_sps']:.0f}/s"
                    if r["status"] == "ok"
                    else f"b{r['batch_size']} {r['status']}"
                    for r in got
                )
                print(
                    f"[{done}/{total}] {arch} {config.label}: {summary} ({time.perf_counter() - t0:.1f}s)",
                    flush=True,
                )
    wall = time.perf_counter() - start
    table = winners(rows, archs, sizes)
    print_tables(rows, archs, table)
    scale_name = scale if isinstance(scale, str) else f"x{scale:g}"
    png = plot(
        rows,
        archs,
        f"zoo '{scale_name}' on {device.name}: throughput by configuration",
        out.with_suffix(".png"),
    )
    write_result(
        out,
        "framework-study",
        device,
        {
            "smoke": args.smoke,
            "scale": scale,
            "archs": archs,
            "batch_sizes": sizes,
            "threads": threads,
            "precisions": precisions,
            "backends_requested": word_list(args.backends),
            "configs": [c.label for c in configs],
            "skipped": skipped,
            "notes": notes,
            "settings": serde.to_dict(settings),
            "latency_note": "per-batch latency of the member alone; p95 from the raw samples",
            "onnx_exports": exports,
            "wall_s": wall,
            "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
            "results": rows,
            "winners": table,
            "plot": png.name,
        },
    )
    print(f"wrote {out} and {png.name} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
