"""Large traces built quickly for memory and speed checks: a recorded iteration tiled in time.

``tile_trace(src, dst, rows)`` copies the event rows of ``src`` again and again, each copy
shifted by one iteration, until ``dst`` holds at least ``rows`` event rows (the workload,
routing and metadata are those of ``src``; the summary covers the whole tiled span). The result
is a valid trace of back-to-back iterations, written with the ordinary streaming writer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clustersim.analyze.stream import EVENT_COLUMNS, _Codes, event_columns
from clustersim.trace import schema as S
from clustersim.trace.reader import TraceReader
from clustersim.trace.writer import TraceWriter


def _events(reader: TraceReader) -> dict[str, np.ndarray]:
    codes = _Codes(str(reader.path))
    parts = []
    for batch in reader.batches():
        kind = codes(batch.column("kind"), S.KINDS, "kind")
        mask = kind <= S.KIND_CODE["comm_async"]
        if mask.any():
            cols = event_columns(batch, codes)
            parts.append({n: c[mask] for n, c in cols.items()})
    return {n: np.concatenate([p[n] for p in parts]) for n in EVENT_COLUMNS}


def tile_trace(src: Path, dst: Path, rows: int, batch_rows: int = 1 << 16) -> int:
    """Write ``dst``; returns the number of event rows written."""
    with TraceReader(src) as reader:
        ev = _events(reader)
        meta = reader._reader.schema.metadata
        wall = float(reader.summary_rows("iteration")[0]["end_s"])
        idle = np.asarray(reader.summary_rows("expert_idle")[0]["values"])
        others = [
            b
            for b in reader.batches()
            if b.num_rows
            and b.column("kind").dictionary[b.column("kind").indices[0].as_py()].as_py()
            not in S.EVENT_KINDS
        ]
    per_block = max(1, batch_rows // len(ev["lane"]))
    block = {n: np.tile(c, per_block) for n, c in ev.items()}
    shift = np.repeat(np.arange(per_block) * wall, len(ev["lane"]))
    ints = ("lane", "group", "layer", "microbatch")
    copies = written = 0
    with TraceWriter(dst, meta) as writer:
        for batch in others:
            writer._write_batch(batch, float("nan"))
        while written < rows:
            offset = copies * wall
            writer.write_events(
                block["kind"],
                block["op"],
                block["start_s"] + shift + offset,
                block["end_s"] + shift + offset,
                {**{n: block[n] for n in ints}, "gpu": block["lane"], "replica": block["lane"] * 0},
                block["bytes"],
            )
            copies += per_block
            written += len(block["lane"])
        span = copies * wall
        writer.add_row("summary", "iteration", start_s=0.0, end_s=span)
        writer.add_row("summary", "pipeline", start_s=0.0, end_s=span)
        writer.add_row("summary", "expert_idle", values=idle * copies)
    return written
