"""Wall time of `clustersim --help` and `clustersim check` (median of N fresh processes).

Usage: python benchmarks/startup.py [--repeat 15]
Prints one line per command: median and min wall time in ms. Results go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "clustersim --help": ["--help"],
    "clustersim check (default plan)": ["check"],
    "clustersim check --static configs/seeds/003_current.yaml": [
        "check",
        "--static",
        "configs/seeds/003_current.yaml",
    ],
    "clustersim check configs/seeds/003_current.yaml (+ serving sim)": [
        "check",
        "configs/seeds/003_current.yaml",
    ],
    "clustersim check --json (default plan)": ["check", "--json"],
}


def time_command(args: list[str], repeat: int) -> list[float]:
    """Wall times in ms of ``repeat`` fresh runs of the CLI with ``args``."""
    exe = [sys.executable, "-m", "clustersim.cli", *args]
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(exe, cwd=ROOT, capture_output=True, check=False)
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    """Time every command and print medians."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    for label, cli_args in COMMANDS.items():
        times = time_command(cli_args, args.repeat)
        print(f"{label:50s} median {statistics.median(times):7.1f} ms   min {min(times):7.1f} ms")


if __name__ == "__main__":
    main()
