"""Search speed: candidates simulated per minute for a 64-GPU MoE space, the fraction discarded
statically, and scaling from 1 to 2 workers (results in BENCHMARKS.md, "Search").

Base: configs/seeds/002_required.yaml (16 layers, 64 experts of FFN 1792, hidden 4096, top-2,
2,048-token sequences, H100-SXM) searched on 64 GPUs with the default space. The static phase
(enumerate + audit every candidate + recompute pruning) is timed whole; the simulation phase
runs the same evenly spaced sample of the candidates left to simulate with 1 worker (in
process) and with 2 worker processes (fork), so both measure the same work.

    .venv/bin/python benchmarks/search_bench.py [--sample 40] [--gpus 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from clustersim.explore.backends import run_tasks, simulate_candidate
from clustersim.explore.search import (
    PARAM_KEYS,
    SearchSpace,
    candidate_plan,
    cluster_plan,
    enumerate_candidates,
    prune_recompute,
    static_row,
)
from clustersim.spec import load_plan

BASE = Path(__file__).resolve().parent.parent / "configs" / "seeds" / "002_required.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=40)
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    base = cluster_plan(load_plan(BASE), args.gpus)
    t0 = time.perf_counter()
    params = enumerate_candidates(base, SearchSpace(gpus=args.gpus))
    rows = [static_row(base, p) for p in params]
    prune_recompute(rows)
    static_s = time.perf_counter() - t0
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    total = len(rows)
    discarded = counts.get("invalid", 0) + counts.get("oom", 0)
    print(f"{total} candidates on {args.gpus} GPUs: {counts}")
    print(
        f"static phase {static_s:.2f} s ({1e3 * static_s / total:.2f} ms per candidate); "
        f"discarded statically {discarded} ({100 * discarded / total:.1f}%), dominated "
        f"{counts.get('dominated', 0)} ({100 * counts.get('dominated', 0) / total:.1f}%), "
        f"left to simulate {counts.get('pending', 0)} "
        f"({100 * counts.get('pending', 0) / total:.1f}%)"
    )

    pending = [r for r in rows if r["status"] == "pending"]
    step = max(1, len(pending) // args.sample)
    sample = pending[::step][: args.sample]
    tasks = [
        (
            r["candidate_id"],
            candidate_plan(
                base, {**{k: r[k] for k in PARAM_KEYS}, "id": r["candidate_id"]}
            ).model_dump(mode="json"),
        )
        for r in sample
    ]
    simulate_candidate(tasks[0][1])  # warm the numba kernels (cached on disk) and imports
    results: dict[int, list[float]] = {1: [], 2: []}
    for _round in range(args.rounds):  # alternate, the machine is shared: medians
        for workers in (1, 2):
            t = time.perf_counter()
            out = dict(run_tasks(tasks, workers))
            results[workers].append(time.perf_counter() - t)
    events = sum(v.get("events") or 0 for v in out.values())
    for workers in (1, 2):
        results[workers] = statistics.median(results[workers])
        print(
            f"workers {workers}: {len(tasks)} candidates ({events} events) in median "
            f"{results[workers]:.2f} s = {60 * len(tasks) / results[workers]:.0f} per minute"
        )
    print(f"speed-up 1 -> 2 workers: {results[1] / results[2]:.2f}x")
    full_min = counts.get("pending", 0) / (60 * len(tasks) / results[2])
    print(
        f"the whole space ({counts.get('pending', 0)} simulations) at 2 workers: "
        f"~{full_min:.1f} min"
    )


if __name__ == "__main__":
    main()
