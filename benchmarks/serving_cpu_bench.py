"""CPU time per request of the serving engine, and of ``clustersim capacity``.

Usage:
  python benchmarks/serving_cpu_bench.py [--repeat 5] [--only NAME ...]
  python benchmarks/serving_cpu_bench.py one NAME     # one run, JSON on stdout
  python benchmarks/serving_cpu_bench.py --engine reference ...   # the engine before
  python benchmarks/serving_cpu_bench.py --engine current reference ...   # alternating
  python benchmarks/serving_cpu_bench.py --engine compiled current ...   # compiled engine

``--engine reference`` runs the frozen copy of the serving engine as it was before its
bookkeeping was made faster (``tests/serving_reference``), on the same cost model: the
"before" of BENCHMARKS.md. ``--engine compiled`` runs the current engine with its compiled
loop forced on where it applies (one replica of one micro-batch:
``engine/serving/solo_kernel.py``), numba and the compiled loop loaded before the timed run
(a one-time cost per process, reported as ``load_cpu_s`` and not included in ``cpu_s``);
elsewhere it is the current engine. With several engines, each round runs every engine in turn (in
the same minutes, as a shared machine needs), and each row also gives the ratio of its
median CPU time to the last engine's.

Workloads (each run in a fresh process; medians of --repeat):

* ``vidur-1gpu``: the Vidur-shaped workload, 8,192 requests of 2,048 prompt + 512 output
  tokens, Poisson at 0.5 requests/s, Llama-2-7B on one H100;
* ``vidur-1gpu-busy``: the same requests at 2 requests/s (larger running batches);
* ``moe-16gpu``: the same requests on Mixtral-8x7B, TP 2 x PP 2 x DP 4, EP 8 (lockstep);
* ``vidur-2gpu``, ``vidur-1p1d``: the Vidur-shaped requests at 1 request/s on two H100s,
  colocated (DP 2) and disaggregated (one prefill + one decode GPU: one KV transfer event
  per request on top);
* ``capacity-moe-16gpu``: ``clustersim capacity`` of Mixtral-8x7B on 16 H100 (TP 2 x PP 2 x
  DP 4, EP 8) with 2,000 requests per probe (prompts 128-4,096, outputs 16-512 tokens,
  uniform; TTFT p99 <= 2 s, TPOT p99 <= 50 ms).

CPU time (``time.process_time``) is reported besides wall time because the machine is shared:
the serving rows time :class:`clustersim.engine.serving.sim.ServingSim` alone (the engine:
scheduling, step timing, SimPy events; not the audit, request generation or metrics), the
capacity row the whole search.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

FIXED = {
    "num": 8192,
    "arrival": "poisson",
    "rate_per_s": 0.5,
    "prompt_len": {"dist": "fixed", "value": 2048},
    "output_len": {"dist": "fixed", "value": 512},
}
MOE = {"tp": 2, "pp": 2, "dp": 4, "ep": 8, "etp": 1}
ONE_P_ONE_D = {"prefill": {"tp": 1, "pp": 1, "dp": 1}, "decode": {"tp": 1, "pp": 1, "dp": 1}}
CAPACITY_REQUESTS = {
    "num": 2000,
    "rate_per_s": 10.0,
    "prompt_len": {"dist": "uniform", "min": 128, "max": 4096},
    "output_len": {"dist": "uniform", "min": 16, "max": 512},
}


def make_plan(name: str):
    """The plan of workload ``name``."""
    from serving_bench import serving_plan  # this script's directory is on sys.path

    preset, parallel, requests, targets = {
        "vidur-1gpu": ("llama-2-7b", {"tp": 1, "pp": 1, "dp": 1}, FIXED, {}),
        "vidur-1gpu-busy": (
            "llama-2-7b",
            {"tp": 1, "pp": 1, "dp": 1},
            {**FIXED, "rate_per_s": 2.0},
            {},
        ),
        "moe-16gpu": ("mixtral-8x7b", MOE, FIXED, {}),
        "vidur-2gpu": ("llama-2-7b", {"tp": 1, "pp": 1, "dp": 2}, {**FIXED, "rate_per_s": 1.0}, {}),
        "vidur-1p1d": ("llama-2-7b", ONE_P_ONE_D, {**FIXED, "rate_per_s": 1.0}, {}),
        "capacity-moe-16gpu": (
            "mixtral-8x7b",
            MOE,
            CAPACITY_REQUESTS,
            {"ttft_ms_p99_max": 2000.0, "tpot_ms_p99_max": 50.0},
        ),
    }[name]
    return serving_plan(name, preset, parallel, requests, targets)


def run_one(name: str, engine: str = "current") -> dict:
    """One run: CPU and wall seconds, CPU microseconds per request, and headline metrics."""
    plan = make_plan(name)
    if name.startswith("capacity"):
        from clustersim.explore.capacity import find_capacity

        wall0, cpu0 = time.perf_counter(), time.process_time()
        result = find_capacity(plan)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        return {
            "name": name,
            "cpu_s": cpu,
            "wall_s": wall,
            "probes": len(result.probes),
            "capacity_req_per_s": result.capacity_req_per_s,
        }
    from clustersim.engine.serving.requests import make_requests
    from clustersim.metrics.serving import serving_metrics

    if engine == "reference":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from serving_reference.sim import ServingSim
    else:
        from clustersim.engine.serving.sim import ServingSim

    requests = make_requests(plan)
    load_cpu = None
    if plan.parallel.disaggregated:
        from clustersim.engine.serving.disagg import DisaggregatedSim

        sim = DisaggregatedSim(plan, requests)
        tables = [sim.prefill.table, sim.decode.table]
    else:
        sim = ServingSim(plan, requests)
        tables = [sim.table]
        if engine == "compiled" and sim.compiled_engine_eligible():
            # load numba and the compiled loop (one run of two requests), timed apart
            cpu0 = time.process_time()
            tiny = requests._replace(**{k: v[:2] for k, v in requests._asdict().items()})
            warm = ServingSim(plan, tiny, table=sim.table)
            warm.compiled_engine = True
            warm.run()
            load_cpu = time.process_time() - cpu0
            sim.compiled_engine = True
    for table in tables:  # build the routing tables before timing the engine
        if table is not None:
            table.lookup(1)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = sim.run()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    m = serving_metrics(plan, result)
    return {
        "name": name,
        "engine": engine,
        "requests": requests.num,
        "cpu_s": cpu,
        "wall_s": wall,
        "cpu_us_per_request": cpu / requests.num * 1e6,
        "events": result.events,
        "compiled_engine": engine != "reference" and sim.use_compiled_engine(),
        "load_cpu_s": load_cpu,
        "ttft_ms_p50": m["ttft_ms_p50"],
        "tpot_ms_p50": m["tpot_ms_p50"],
        "latency_ms_p99": m["latency_ms_p99"],
    }


NAMES = (
    "vidur-1gpu",
    "vidur-1gpu-busy",
    "moe-16gpu",
    "vidur-2gpu",
    "vidur-1p1d",
    "capacity-moe-16gpu",
)


def main() -> None:
    """Run the benchmarks (or one run) and print one JSON row per workload."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", nargs="?", default="all")
    parser.add_argument("name", nargs="?")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", nargs="*")
    parser.add_argument(
        "--engine", nargs="+", choices=("current", "compiled", "reference"), default=["current"]
    )
    args = parser.parse_args()
    if args.what == "one":
        print(json.dumps(run_one(args.name, args.engine[0])))
        return
    for name in args.only or NAMES:
        engines = ["current"] if name.startswith("capacity") else args.engine
        runs: dict[str, list[dict]] = {engine: [] for engine in engines}
        for _ in range(args.repeat):
            for engine in engines:  # alternating: one run of each engine per round
                cmd = [sys.executable, __file__, "one", name, "--engine", engine]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs[engine].append(json.loads(out.stdout))
        last = statistics.median(r["cpu_s"] for r in runs[engines[-1]])
        for engine in engines:
            row = dict(runs[engine][0])
            for key in ("cpu_s", "wall_s", "cpu_us_per_request"):
                if key in row:
                    row[key] = statistics.median(r[key] for r in runs[engine])
            row["cpu_s_all"] = [round(r["cpu_s"], 3) for r in runs[engine]]
            if len(engines) > 1:
                row[f"cpu_ratio_to_{engines[-1]}"] = round(row["cpu_s"] / last, 3)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
