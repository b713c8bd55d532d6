#!/usr/bin/env python3
"""Serve the default ensemble with the planner's plan (the README's serving example).

python examples/serve.py [--scale tiny|small|large] [--batch-size 8]
"""

from __future__ import annotations

import argparse

from colocate import devices, zoo
from colocate.execution import Executor
from colocate.planning import plan, render_plan
from colocate.profiling import profile_isolated


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plan and serve the default ensemble.")
    parser.add_argument("--scale", default="small", choices=("tiny", "small", "large"))
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    device = devices.best_device()
    ensemble = zoo.default_ensemble(scale=args.scale)
    profiles = profile_isolated(ensemble, device, (args.batch_size,))  # in a child, cached
    chosen = plan(ensemble, device, profiles, batch_size=args.batch_size)
    print(render_plan(chosen))
    batch = ensemble.members[0].input.example(args.batch_size)
    with Executor(chosen, ensemble) as executor:
        probs = executor.predict(batch)  # combined prediction, (batch, classes)
        futures = [executor.submit(batch) for _ in range(8)]  # many requests in flight
        latencies = [f.result().latency_s for f in futures]
    print("predicted classes:", probs.argmax(axis=1).tolist())
    print(f"8 concurrent requests, median latency {sorted(latencies)[4] * 1e3:.1f} ms")


if __name__ == "__main__":  # workers are spawned: keep the work under this guard
    main()
