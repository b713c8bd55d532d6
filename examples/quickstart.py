#!/usr/bin/env python3
"""Quickstart: profile the default ensemble on the best device and print the key figures.

python examples/quickstart.py            # small models on the CPU, large on a GPU
python examples/quickstart.py --scale tiny --batch-sizes 1,4
"""

from __future__ import annotations

import argparse

from colocate import devices, zoo
from colocate.profiling import ProfileSettings, profile


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Profile the default ensemble.")
    parser.add_argument("--scale", default=None, choices=("tiny", "small", "large"))
    parser.add_argument("--batch-sizes", default="1,8,32")
    args = parser.parse_args(argv)

    device = devices.best_device()
    scale = args.scale or ("large" if device.kind == "cuda" else "small")
    ensemble = zoo.default_ensemble(scale=scale)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    result = profile(ensemble, device, sizes, settings=ProfileSettings(repeats=10), cache=False)

    print(f"{ensemble.name} on {device.name}")
    for p in result.profiles:
        assert p.latency is not None and p.memory is not None
        print(
            f"  {p.member:<12} batch {p.batch_size:<4} {p.latency.median_s * 1e3:8.2f} ms"
            f"  {p.throughput_sps:9.0f} samples/s  {p.memory.total_bytes / 2**20:8.1f} MiB"
        )


if __name__ == "__main__":
    main()
