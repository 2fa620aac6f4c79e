"""Fine-grained MoE plans at frontier scale: wall time of ``simulate`` and its routing share.

Usage:
  python benchmarks/moe_scale_bench.py qwen3      # Qwen3-235B-A22B, 256 H100, TP2 EP8 PP32
  python benchmarks/moe_scale_bench.py deepseek   # DeepSeek-V3, 1,024 H800, EP64 PP16
  python benchmarks/moe_scale_bench.py all [--repeat 3]

Each run is a fresh process (``one``) so that numba compilation caches, not warm state, are
shared. Prints one JSON line per run: wall time and CPU time (user + system, this process) of
``simulate(plan)``, routing seconds (wall), events. On a shared machine the CPU time is the
figure to compare: it is what the run takes on a core of its own. Results go in BENCHMARKS.md
("Fine-grained MoE at scale").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from clustersim.run.simulate import simulate
from clustersim.spec import plan_from_dict


def qwen3_plan():
    """Qwen3-235B-A22B (128 experts, top-8, 94 layers) on 256 H100: TP2 EP8 PP32, DP4,
    512 micro-batches of one 4,096-token sequence."""
    return plan_from_dict(
        {
            "name": "qwen3-235b-256xh100",
            "model": {"preset": "qwen3-235b-a22b", "moe": {"router_skew": 0.3}},
            "hardware": {"gpu": "H100-SXM", "num_nodes": 32, "gpus_per_node": 8},
            "parallel": {
                "tp": 2,
                "pp": 32,
                "dp": 4,
                "ep": 8,
                "etp": 1,
                "num_microbatches": 512,
                "sequence_parallel": True,
                "recompute": "full",
                "distributed_optimizer": True,
            },
            "workload": {"mode": "training", "seq_len": {"dist": "fixed", "value": 4096}},
        },
        "benchmark",
    )


def deepseek_plan():
    """DeepSeek-V3 (256 experts, top-8, node-limited to 4 nodes, 61 layers) on 1,024 H800:
    TP1 EP64 PP16, DP64, 32 micro-batches of one 4,096-token sequence."""
    return plan_from_dict(
        {
            "name": "deepseek-v3-1024xh800",
            "model": {"preset": "deepseek-v3", "moe": {"router_skew": 0.3}},
            "hardware": {"gpu": "H800", "num_nodes": 128, "gpus_per_node": 8},
            "parallel": {
                "tp": 1,
                "pp": 16,
                "dp": 64,
                "ep": 64,
                "num_microbatches": 32,
                "recompute": "full",
                "distributed_optimizer": True,
            },
            "workload": {"mode": "training", "seq_len": {"dist": "fixed", "value": 4096}},
        },
        "benchmark",
    )


PLANS = {"qwen3": qwen3_plan, "deepseek": deepseek_plan}


def run_one(name: str) -> dict:
    """Simulate one plan in this process."""
    plan = PLANS[name]()
    start, cpu_start = time.perf_counter(), time.process_time()
    report = simulate(plan)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "plan": name,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "routing_s": round(report.routing_s, 3),
        "events": report.events,
        "iteration_ms": report.metrics.get("iteration_time_ms"),
    }


def main() -> None:
    """Run the chosen plans, each ``--repeat`` times in fresh processes; print medians."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("which", choices=[*PLANS, "all", "one"])
    parser.add_argument("name", nargs="?")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    if args.which == "one":
        print(json.dumps(run_one(args.name)))
        return
    names = list(PLANS) if args.which == "all" else [args.which]
    for name in names:
        runs = []
        for _ in range(args.repeat):
            cmd = [sys.executable, __file__, "one", name]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
        wall = statistics.median(r["wall_s"] for r in runs)
        cpu = statistics.median(r["cpu_s"] for r in runs)
        print(json.dumps({"plan": name, "median_wall_s": wall, "median_cpu_s": cpu,
                          "runs": len(runs)}))  # fmt: skip


if __name__ == "__main__":
    main()
