#!/usr/bin/env python3
"""Profile the default ensemble on the best device and write the profiles as JSON.

    python benchmarks/profile_default_ensemble.py --out benchmarks/results/profiles.json

On a GPU it profiles the "large" ensemble (ResNet-34, MobileNetV2, EfficientNet-B0,
ViT-S/16, a 78M-parameter MLP at 224x224) with torch in each precision asked for;
on the CPU the "small" one. The output holds the device, versions, date and
command, the wall time of the profiling, and one ProfileSet per precision.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import write_result
from colocate import devices, serde, zoo
from colocate.ensemble import Ensemble
from colocate.profiling import ProfileSettings, profile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="best")
    parser.add_argument("--scale", default=None, help="default: large on a GPU, small on the CPU")
    parser.add_argument("--batch-sizes", default="1,8,32,128")
    parser.add_argument("--precisions", default="fp32,fp16", help="comma list of fp32, fp16, bf16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cuda-graph", action="store_true", help="torch members replay CUDA graphs")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--profiles-out",
        default=None,
        help="also write the first precision's ProfileSet alone (serde format)",
    )
    args = parser.parse_args()

    device = devices.find_device(args.device)
    scale = args.scale or ("large" if device.kind == "cuda" else "small")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    settings = ProfileSettings(repeats=args.repeats)
    runs = {}
    for precision in args.precisions.split(","):
        base = zoo.default_ensemble(scale=scale)
        options = {"cuda_graph": True} if args.cuda_graph else {}
        members = tuple(dataclasses.replace(m, precision=precision, options=options) for m in base.members)
        suffix = "-cudagraph" if args.cuda_graph else ""
        ensemble = Ensemble(members, name=f"{base.name}-{precision}{suffix}")
        start = time.perf_counter()
        result = profile(
            ensemble,
            device,
            sizes,
            settings=settings,
            cache=False,
            progress=lambda done, total, what: print(f"[{done}/{total}] {what}", flush=True),
        )
        wall = time.perf_counter() - start
        runs[precision] = {"wall_s": wall, "profile_set": serde.to_dict(result)}
        print(
            f"{precision}: profiled {len(result.profiles)} (member, batch) pairs in {wall:.1f}s", flush=True
        )
        if args.profiles_out and precision == args.precisions.split(",")[0]:
            serde.save(result, args.profiles_out)
    write_result(
        args.out,
        "profile-default-ensemble",
        device,
        {
            "scale": scale,
            "batch_sizes": sizes,
            "cuda_graph": args.cuda_graph,
            "settings": serde.to_dict(settings),
            "runs": runs,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
