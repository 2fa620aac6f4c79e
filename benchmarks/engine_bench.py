"""Engine speed: simulated events per wall second, and scaling with GPUs x layers x micro-batches.

Usage:
  python benchmarks/engine_bench.py events            # 64-GPU MoE plan (TP1 EP8 PP4, 32 mb)
  python benchmarks/engine_bench.py scaling [--max-gpus 1024]
Each size runs in a fresh process so its peak memory (max RSS) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from clustersim.run.simulate import simulate
from clustersim.spec import plan_from_dict

# (GPUs, layers, micro-batches, PP): GPUs x layers x micro-batches grows 4x, 4x, 4x.
SIZES = [(64, 16, 16, 4), (128, 32, 32, 4), (256, 32, 64, 8), (1024, 64, 64, 8)]


def moe_plan(
    gpus: int,
    layers: int,
    microbatches: int,
    pp: int,
    routing: str = "sampled",
    topology: str | None = None,
):
    """A Mixtral-8x7B-class plan: TP 1, EP 8, the given PP, DP = the rest; sequences of
    128-4096 tokens (so every data-parallel replica differs and is simulated). ``topology``:
    a ``hardware.topology`` preset (shared links), or None (no contention)."""
    hardware = {"gpu": "H100-SXM", "num_nodes": gpus // 8, "gpus_per_node": 8}
    if topology:
        hardware["topology"] = topology
    return plan_from_dict(
        {
            "name": f"bench-{gpus}gpu",
            "model": {"preset": "mixtral-8x7b", "num_layers": layers, "moe": {"routing": routing}},
            "hardware": hardware,
            "parallel": {
                "tp": 1,
                "pp": pp,
                "dp": gpus // pp,
                "ep": 8,
                "num_microbatches": microbatches,
                "recompute": "selective",
                "distributed_optimizer": True,
            },
            "workload": {
                "mode": "training",
                "seq_len": {"dist": "uniform", "min": 128, "max": 4096},
            },
        },
        "benchmark",
    )


def run_one(
    gpus: int, layers: int, microbatches: int, pp: int, routing: str, topology: str | None = None
) -> dict:
    """Simulate one size; wall time, events, events/s, routing share, peak RSS."""
    plan = moe_plan(gpus, layers, microbatches, pp, routing, topology)
    start = time.perf_counter()
    report = simulate(plan)
    wall = time.perf_counter() - start
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "gpus": gpus,
        "layers": layers,
        "microbatches": microbatches,
        "pp": pp,
        "wall_s": wall,
        "events": report.events,
        "events_per_s": report.events / wall,
        "engine_s": report.wall_s,
        "routing_s": report.routing_s,
        "max_rss_gib": rss_gib,
        "iteration_time_ms": report.metrics["iteration_time_ms"],
        "comm_contention_ms": report.metrics["comm_contention_ms"],
    }


def main() -> None:
    """Run the chosen benchmark and print its rows."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["events", "scaling", "one"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-gpus", type=int, default=1024)
    parser.add_argument("--size", type=int, nargs=4)
    parser.add_argument("--routing", choices=["sampled", "even"], default="sampled")
    parser.add_argument("--topology", default=None, help="hardware.topology preset (shared links)")
    args = parser.parse_args()
    if args.what == "one":
        print(json.dumps(run_one(*args.size, args.routing, args.topology)))
        return
    sizes = [(64, 32, 32, 4)] if args.what == "events" else SIZES
    for size in sizes:
        if size[0] > args.max_gpus:
            continue
        runs = []
        for _ in range(args.repeat if args.what == "events" else 1):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "one",
                    "--size",
                    *map(str, size),
                    "--routing",
                    args.routing,
                    *(["--topology", args.topology] if args.topology else []),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(out.stdout))
        wall = statistics.median(r["wall_s"] for r in runs)
        eps = statistics.median(r["events_per_s"] for r in runs)
        share = statistics.median(100 * r["routing_s"] / r["wall_s"] for r in runs)
        work = size[0] * size[1] * size[2]
        print(
            f"GPUs {size[0]:5d} layers {size[1]:3d} mb {size[2]:3d} PP {size[3]}: "
            f"wall {wall:7.2f} s, events {runs[0]['events']:9d}, {eps / 1e3:7.1f} k events/s, "
            f"{1e6 * wall / work:6.2f} us per GPU-layer-mb, routing {share:4.1f}% of wall, "
            f"max RSS {max(r['max_rss_gib'] for r in runs):.2f} GiB",
            flush=True,
        )


if __name__ == "__main__":
    main()
