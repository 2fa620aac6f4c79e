"""A trace of more than 10 M rows (a recorded iteration tiled in time, ~600 MB) is analysed
with bounded memory: peak RSS grows by far less than the file's size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from clustersim.run.simulate import simulate
from clustersim.spec import load_plan

sys.path.insert(0, str(Path(__file__).parent))
from trace_big import tile_trace  # noqa: E402

ROWS = 10_000_000
RSS_GROWTH_LIMIT_MB = 250


def test_ten_million_rows_in_bounded_memory(tmp_path):
    small, big = tmp_path / "small.arrow", tmp_path / "big.arrow"
    simulate(load_plan(None), trace=small)
    written = tile_trace(small, big, ROWS)
    assert written >= ROWS
    size_mb = big.stat().st_size / 2**20
    assert size_mb > RSS_GROWTH_LIMIT_MB  # holding the rows would exceed the limit
    script = textwrap.dedent(f"""
        import json, resource, time
        from clustersim.analyze import analyze
        analyze({str(small)!r})  # imports, numba kernels loaded: the baseline
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        result = analyze({str(big)!r})
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"events": result.events, "growth_mb": (after - before) / 1024,
                          "wall_s": wall, "length_ms": result.critical_path["length_ms"]}}))
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=600
    )
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["events"] == written
    assert stats["growth_mb"] < RSS_GROWTH_LIMIT_MB, stats
    big.unlink()
