"""Trace benchmarks: tracing overhead on the engine benchmark, analyze speed, trace size.

Usage:
  python benchmarks/trace_bench.py overhead [--repeat 3] [--size 256 32 64 8]  # default: 64 GPUs
  python benchmarks/trace_bench.py analyze [--repeat 3] [--rows 10000000]
  python benchmarks/trace_bench.py all

overhead: each run is a fresh process simulating the engine benchmark's 64-GPU plan (TP1 EP8
PP4, 32 layers, 32 micro-batches) without and with ``trace=``; overhead = (median traced wall -
median plain wall) / median plain wall (the traced wall includes importing pyarrow); then the
same alternating in one warm process; bytes per event = file size / event rows. ``--size``
takes another plan of ``engine_bench.py`` (GPUs, layers, micro-batches, PP).
analyze: ``analysis.analyze.analyze`` on the 64-GPU trace and on a tiled trace of ``--rows``
rows (``tests/trace_big.py``), after one warm-up run; rows/s = event rows / wall; CPU time is
that of the process (all threads: the kernels run on two worker threads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
SIZE = (64, 32, 32, 4)


def one(trace: str | None, size: tuple[int, ...] = SIZE) -> dict:
    """Simulate the plan of ``size`` (GPUs, layers, micro-batches, PP; default the 64-GPU
    plan) once, optionally traced, in this process."""
    from engine_bench import moe_plan

    from clustersim.run.simulate import simulate

    plan = moe_plan(*size)
    started, cpu = time.perf_counter(), time.process_time()
    report = simulate(plan, trace=Path(trace) if trace else None)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"wall_s": wall, "cpu_s": cpu, "events": report.events, "trace": report.trace}


def _fresh(trace: str | None, size: tuple[int, ...] = SIZE) -> dict:
    cmd = [sys.executable, __file__, "one", "--size", *map(str, size)]
    cmd += ["--trace", trace] if trace else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def overhead(repeat: int, keep: Path, size: tuple[int, ...] = SIZE) -> None:
    """Median wall without and with the trace, in alternating fresh processes."""
    plain, traced = [], []
    for _ in range(repeat):
        plain.append(_fresh(None, size))
        traced.append(_fresh(str(keep), size))
    p = statistics.median(r["wall_s"] for r in plain)
    t = statistics.median(r["wall_s"] for r in traced)
    pc = statistics.median(r["cpu_s"] for r in plain)
    tc = statistics.median(r["cpu_s"] for r in traced)
    info = traced[-1]["trace"]
    events = traced[-1]["events"]
    print(
        f"engine benchmark ({size[0]} GPUs, {events} events), fresh processes: wall plain "
        f"{p:.2f} s, "
        f"traced {t:.2f} s ({100 * (t - p) / p:+.1f}%); CPU plain {pc:.2f} s, traced "
        f"{tc:.2f} s ({100 * (tc - pc) / pc:+.1f}%) (goal <= 20%); trace "
        f"{info['bytes'] / 2**20:.1f} MiB, {info['rows']} rows, "
        f"{info['bytes'] / info['rows']:.1f} bytes per row, "
        f"{info['bytes'] / events:.1f} bytes per event",
        flush=True,
    )


def overhead_in_process(repeat: int, keep: Path, size: tuple[int, ...] = SIZE) -> None:
    """The same, alternating in one warm process (pyarrow and numba already loaded)."""
    one(None, size), one(str(keep), size)  # warm-up
    plain, traced = [], []
    for _ in range(repeat):
        plain.append(one(None, size)["cpu_s"])
        traced.append(one(str(keep), size)["cpu_s"])
    p, t = statistics.median(plain), statistics.median(traced)
    print(
        f"same, in one warm process: CPU plain {p:.2f} s, traced {t:.2f} s, overhead "
        f"{100 * (t - p) / p:+.1f}%",
        flush=True,
    )


def analyze_speed(repeat: int, trace: Path, rows: int) -> None:
    """Rows per second of analyze on the engine trace and on a large tiled trace."""
    from trace_big import tile_trace

    from clustersim.analyze import analyze

    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.arrow"
        started = time.perf_counter()
        written = tile_trace(trace, big, rows)
        build = time.perf_counter() - started
        for label, path in (("64-GPU engine trace", trace), ("tiled trace", big)):
            analyze(path)  # warm-up: numba kernels, page cache
            walls, cpus, events = [], [], 0
            for _ in range(repeat):
                started, cpu = time.perf_counter(), time.process_time()
                events = analyze(path).events
                walls.append(time.perf_counter() - started)
                cpus.append(time.process_time() - cpu)
            wall = statistics.median(walls)
            size = path.stat().st_size
            print(
                f"analyze {label}: {events} events, {size / 2**20:.0f} MiB, median "
                f"{wall:.2f} s of {repeat}, {events / wall / 1e6:.1f} M rows/s (goal >= 20), "
                f"best {events / min(walls) / 1e6:.1f} M rows/s; CPU time (all threads) "
                f"median {statistics.median(cpus):.2f} s",
                flush=True,
            )
        print(
            f"(tiled trace of {written} rows built in {build:.1f} s, "
            f"{written / build / 1e6:.1f} M rows/s written)"
        )


def main() -> None:
    """Run the chosen benchmark."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["overhead", "analyze", "all", "one"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--trace")
    parser.add_argument(
        "--size",
        type=int,
        nargs=4,
        default=list(SIZE),
        help="overhead plan: GPUs, layers, micro-batches, PP (engine_bench.py)",
    )
    args = parser.parse_args()
    size = tuple(args.size)
    if args.what == "one":
        print(json.dumps(one(args.trace, size)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "engine64.arrow"
        if args.what in ("overhead", "all"):
            overhead(args.repeat, trace, size)
            overhead_in_process(args.repeat, trace, size)
        if args.what in ("analyze", "all"):
            if not trace.exists() or size != SIZE:
                _fresh(str(trace))
            analyze_speed(args.repeat, trace, args.rows)


if __name__ == "__main__":
    main()
