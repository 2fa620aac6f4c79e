"""Serving simulation speed: simulated requests per wall second, and peak memory.

Usage:
  python benchmarks/serving_bench.py [--repeat 3] [--only NAME ...]
  python benchmarks/serving_bench.py one NAME        # one run, JSON on stdout

Workloads (each run in a fresh process, so its peak memory is its own; medians of --repeat):

* ``dense-1gpu``: 8,192 requests of 2,048 prompt + 512 output tokens, Poisson at 0.5
  requests/s, Llama-2-7B on one H100 (the workload Vidur's event loop takes ~134 s on);
* ``moe-16gpu``: the same requests, Mixtral-8x7B on 2 x 8 H100 with the default plan's
  layout (TP 2 x PP 2 x DP 4, EP 8 x ETP 1: the EP group spans the 4 replicas, which step in
  lockstep);
* ``moe-16gpu-ep2``: the same on TP 2 x DP 8, EP 2 inside each replica (8 independent ones);
* ``trace-16gpu``, ``trace-16gpu-ep2``: the whole ``splitwise_conv.csv`` trace (19,366
  requests, 3,502 s; read from ``traces/``, or ``--trace``) on the two MoE layouts.

Wall time is that of :func:`clustersim.run.serving.simulate_serving` (audit, requests,
routing table, simulation, metrics); the import of the package is not counted.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from clustersim.run.serving import simulate_serving
from clustersim.spec import plan_from_dict

TRACE = Path(__file__).resolve().parents[1] / "traces" / "splitwise_conv.csv"
FIXED = {
    "num": 8192,
    "arrival": "poisson",
    "rate_per_s": 0.5,
    "prompt_len": {"dist": "fixed", "value": 2048},
    "output_len": {"dist": "fixed", "value": 512},
}
MOE_DEFAULT = {"tp": 2, "pp": 2, "dp": 4, "ep": 8, "etp": 1}
MOE_EP2 = {"tp": 2, "pp": 1, "dp": 8, "ep": 2, "etp": 1}


def workloads(trace: Path) -> dict[str, tuple[str, dict, dict]]:
    """name -> (model preset, parallel degrees, requests)."""
    from_trace = {"arrival": "trace", "trace": str(trace)}
    return {
        "dense-1gpu": ("llama-2-7b", {"tp": 1, "pp": 1, "dp": 1}, FIXED),
        "moe-16gpu": ("mixtral-8x7b", MOE_DEFAULT, FIXED),
        "moe-16gpu-ep2": ("mixtral-8x7b", MOE_EP2, FIXED),
        "trace-16gpu": ("mixtral-8x7b", MOE_DEFAULT, from_trace),
        "trace-16gpu-ep2": ("mixtral-8x7b", MOE_EP2, from_trace),
    }


def serving_plan(
    name: str, preset: str, parallel: dict, requests: dict, targets: dict | None = None
):
    """A serving benchmark plan: ``preset`` on H100-SXM nodes of up to 8 GPUs (also used by
    serving_cpu_bench.py)."""
    pools = [parallel[k] for k in ("prefill", "decode") if k in parallel] or [parallel]
    gpus = sum(p["tp"] * p["pp"] * p["dp"] for p in pools)  # disaggregated: both pools
    raw = {
        "name": f"bench-{name}",
        "model": {"preset": preset},
        "hardware": {
            "gpu": "H100-SXM",
            "num_nodes": max(1, gpus // 8),
            "gpus_per_node": min(gpus, 8),
        },
        "parallel": parallel,
        "workload": {"mode": "inference", "requests": requests},
    }
    if targets:
        raw["targets"] = targets
    return plan_from_dict(raw, "benchmark")


def make_plan(name: str, trace: Path):
    """The plan of workload ``name``."""
    preset, parallel, requests = workloads(trace)[name]
    return serving_plan(name, preset, parallel, requests)


def run_one(name: str, trace: Path) -> dict:
    """Simulate one workload: wall time, requests per wall second, events, peak RSS, and the
    headline metrics (to see that the runs agree)."""
    plan = make_plan(name, trace)
    start = time.perf_counter()
    report = simulate_serving(plan)
    wall = time.perf_counter() - start
    m = report.metrics
    requests = m["completed_requests"] + m["rejected_requests"]
    return {
        "name": name,
        "requests": requests,
        "wall_s": wall,
        "requests_per_s": requests / wall,
        "events": report.events,
        "steps": report.to_dict()["simulation"]["steps"],
        "routing_s": report.routing_s,
        "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "ttft_ms_p50": m["ttft_ms_p50"],
        "tpot_ms_p50": m["tpot_ms_p50"],
        "throughput_tokens_per_ms": m["throughput_tokens_per_ms"],
    }


def main() -> None:
    """Run the benchmarks (or one run) and print one JSON row per workload."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", nargs="?", default="all")
    parser.add_argument("name", nargs="?")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--trace", type=Path, default=TRACE)
    args = parser.parse_args()
    if args.what == "one":
        print(json.dumps(run_one(args.name, args.trace)))
        return
    for name in args.only or list(workloads(args.trace)):
        if name.startswith("trace") and not args.trace.is_file():
            print(json.dumps({"name": name, "skipped": f"no trace at {args.trace}"}))
            continue
        runs = []
        for _ in range(args.repeat):
            cmd = [sys.executable, __file__, "one", name, "--trace", str(args.trace)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout))
        row = dict(runs[0])
        for key in ("wall_s", "requests_per_s", "max_rss_gib", "routing_s"):
            row[key] = statistics.median(r[key] for r in runs)
        row["wall_s_all"] = [round(r["wall_s"], 2) for r in runs]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
