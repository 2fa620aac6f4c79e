"""The README's "seed plans, as computed" table, from ``clustersim check --json`` of each plan.

Usage: python benchmarks/readme_plans_table.py [--write] [PLAN ...]   (default:
configs/seeds/*.yaml and the other plans in configs/). Prints the Markdown table; with
``--write`` it replaces the table under README.md's "The seed plans, as computed" heading, so
after a change to the cost model the README shows what the shipped model says.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def default_plans() -> list[Path]:
    """Every seed plan, then every other plan in ``configs/``."""
    seeds = sorted((ROOT / "configs" / "seeds").glob("*.yaml"))
    others = sorted((ROOT / "configs").glob("*.yaml"))
    return seeds + others


def summary(metrics: dict) -> str:
    """The figures a reader compares: training or serving, as the plan is."""
    if metrics.get("ttft_ms_p50") is not None:
        return (
            f"serving: TTFT p50 {metrics['ttft_ms_p50']:.0f} ms, "
            f"TPOT p50 {metrics['tpot_ms_p50']:.2f} ms, "
            f"{metrics['throughput_tokens_per_ms']:.1f} tokens/ms "
            f"(roofline bound {metrics['roofline_throughput_tokens_per_ms']:,.0f})"
        )
    parts = [
        f"iteration {metrics['iteration_time_ms']:.0f} ms",
        f"{metrics['throughput_tokens_per_ms']:.1f} tokens/ms",
        f"MFU {metrics['mfu_pct']:.1f} %",
        f"comm {metrics['comm_overhead_pct']:.1f} %",
    ]
    if metrics.get("bubble_pct"):
        parts.append(f"bubble {metrics['bubble_pct']:.1f} %")
    if metrics.get("load_balance_pct") is not None:
        parts.append(f"load balance {metrics['load_balance_pct']:.1f} %")
    return ", ".join(parts)


def row(plan: Path) -> str:
    """One table row: the plan, what it simulates to, its error count and how it was run."""
    out = subprocess.run(
        [sys.executable, "-m", "clustersim.cli", "check", str(plan), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    report = json.loads(out.stdout)
    note = report.get("simulation_note") or "as written"
    return f"| `{plan.stem}` | {summary(report['metrics'])} | {report['errors']} | {note} |"


HEADER = ["| plan | simulated | errors | simulated as |", "|---|---|---:|---|"]
SECTION = "## The seed plans, as computed"


def write_readme(readme: Path, table: list[str]) -> None:
    """Replace the first table after ``SECTION`` in ``readme`` with ``table``."""
    lines = readme.read_text().splitlines()
    start = lines.index(HEADER[0], lines.index(SECTION))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[start:end] = table
    readme.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plans", nargs="*", type=Path)
    parser.add_argument("--write", action="store_true", help="rewrite README.md's table")
    args = parser.parse_args()
    table = list(HEADER)
    for plan in args.plans or default_plans():
        table.append(row(plan))
        print(table[-1], flush=True)
    if args.write:
        write_readme(ROOT / "README.md", table)


if __name__ == "__main__":
    main()
