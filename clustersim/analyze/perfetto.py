"""Export a trace as Chrome trace-event JSON, which the Perfetto UI (ui.perfetto.dev) and
``chrome://tracing`` open.

Layout: one process per node (``node N``), inside it one thread (track) per GPU stream:
``GPU g compute`` (compute and blocking collectives, which never overlap), ``GPU g comm``
(asynchronous collectives: gradient reductions, parameter gathers) and ``GPU g p2p`` (pipeline
sends). Overlapping asynchronous events go to extra tracks (``comm 2``, ...) so that every
track nests properly. A lane's events are drawn on each of its GPUs (its TP ranks work in
lockstep). In replica-symmetric runs only the simulated replica's GPUs get tracks (the others
mirror them). Times are microseconds, as the format wants. The file is written
through a temporary file renamed when complete (``spec.outputs.atomic_output``; never over the
trace read); memory stays bounded (rows stream through).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from clustersim.analyze.network import LinkFacts, read_links
from clustersim.analyze.serving import analyze_serving, in_system_steps, is_serving_trace
from clustersim.analyze.stream import time_ordered
from clustersim.analyze.training import RunFacts
from clustersim.spec.outputs import atomic_output, check_output
from clustersim.trace import schema as S
from clustersim.trace.reader import TraceReader

STREAMS = ("compute", "comm", "p2p")
MAX_SUBTRACKS = 8  # tracks per asynchronous stream and GPU
_TID_STRIDE = 1 + 2 * MAX_SUBTRACKS


def _stream(kind: int, op: int) -> int:
    if op == S.OP_CODE["p2p_send"]:
        return 2
    return 1 if kind == S.KIND_CODE["comm_async"] else 0


def export_perfetto(
    path: str | Path, out: str | Path, window_ms: tuple[float, float] | None = None
) -> int:
    """Write ``out``; returns the number of trace events written (one per row and GPU; for a
    serving trace, one per request phase and counter sample)."""
    check_output(out, inputs=(path,))
    if is_serving_trace(path):
        return export_serving_perfetto(path, out, window_ms)
    written = 0
    with (
        atomic_output(out, inputs=(path,)) as tmp,
        TraceReader(path) as reader,
        open(tmp, "w", encoding="utf-8") as f,
    ):
        facts = RunFacts(reader)
        f.write('{"displayTimeUnit": "ms", "traceEvents": [\n')
        f.write(",\n".join(_metadata_events(facts)))
        ends: dict[tuple[int, int], list[float]] = {}
        for chunk in time_ordered(reader):
            lines = _event_lines(chunk, facts, ends, window_ms)
            if lines:
                f.write(",\n" + ",\n".join(lines))
                written += len(lines)
        lines = _link_lines(read_links(reader, 0.0), window_ms)
        if lines:
            f.write(",\n" + ",\n".join(lines))
            written += len(lines)
        f.write("\n]}\n")
    return written


LINK_PID = -2
"""Perfetto process of the link tracks (one thread per link with busy intervals)."""


def _link_lines(links: LinkFacts, window_ms: tuple[float, float] | None) -> list[str]:
    """Busy intervals of the trace's most used links, one track per link (format v3)."""
    if not links.busy:
        return []
    name = {"ph": "M", "name": "process_name", "pid": LINK_PID, "args": {"name": "network links"}}
    lines = [json.dumps(name)]
    for tid, (link, intervals) in enumerate(sorted(links.busy.items())):
        lines.append(json.dumps({"ph": "M", "name": "thread_name", "pid": LINK_PID, "tid": tid,
                                 "args": {"name": link}}))  # fmt: skip
        for start_ms, end_ms in intervals.tolist():
            if window_ms and (end_ms < window_ms[0] or start_ms > window_ms[1]):
                continue
            lines.append(json.dumps({"ph": "X", "name": "busy", "cat": "link", "pid": LINK_PID,
                                     "tid": tid, "ts": start_ms * 1e3,
                                     "dur": (end_ms - start_ms) * 1e3}))  # fmt: skip
    return lines


def _metadata_events(facts: RunFacts) -> list[str]:
    gpn = facts.plan.hardware.gpus_per_node
    gpus = sorted({g for ranks in facts.lane_ranks for g in ranks})
    events = []
    for node in sorted({g // gpn for g in gpus}):
        events.append(
            json.dumps(
                {"ph": "M", "name": "process_name", "pid": node, "args": {"name": f"node {node}"}}
            )
        )
        events.append(
            json.dumps(
                {"ph": "M", "name": "process_sort_index", "pid": node, "args": {"sort_index": node}}
            )
        )
    for g in gpus:
        for stream, name in enumerate(STREAMS):
            for sub in range(1 if stream == 0 else MAX_SUBTRACKS):
                tid = _tid(g, stream, sub)
                label = f"GPU {g} {name}" + (f" {sub + 1}" if sub else "")
                events.append(
                    json.dumps(
                        {
                            "ph": "M",
                            "name": "thread_name",
                            "pid": g // gpn,
                            "tid": tid,
                            "args": {"name": label},
                        }
                    )
                )
                events.append(
                    json.dumps(
                        {
                            "ph": "M",
                            "name": "thread_sort_index",
                            "pid": g // gpn,
                            "tid": tid,
                            "args": {"sort_index": tid},
                        }
                    )
                )
    return events


def _tid(gpu: int, stream: int, sub: int) -> int:
    return gpu * _TID_STRIDE + (0 if stream == 0 else 1 + (stream - 1) * MAX_SUBTRACKS + sub)


def _event_lines(chunk, facts: RunFacts, ends, window_ms) -> list[str]:
    start, end = chunk["start_s"], chunk["end_s"]
    keep = np.ones(start.size, dtype=bool)
    if window_ms is not None:
        keep = (start < window_ms[1] / 1e3) & (end > window_ms[0] / 1e3)
    gpn = facts.plan.hardware.gpus_per_node
    lines = []
    cols = {
        n: chunk[n][keep].tolist()
        for n in ("kind", "op", "lane", "group", "layer", "microbatch", "start_s", "end_s", "bytes")
    }
    for kind, op, lane, group, layer, mb, s, e, nbytes in zip(*cols.values(), strict=True):
        stream = _stream(kind, op)
        sub = 0
        if stream:
            tracks = ends.setdefault((lane, stream), [])
            sub = next((i for i, t in enumerate(tracks) if t <= s), len(tracks))
            sub = min(sub, MAX_SUBTRACKS - 1)
            if sub == len(tracks):
                tracks.append(e)
            else:
                tracks[sub] = e
        args = f'{{"layer": {layer}, "microbatch": {mb}, "group": {group}, "bytes": {nbytes:.0f}}}'
        ts, te = round(s * 1e6, 3), round(e * 1e6, 3)  # rounded ends: no artificial overlaps
        head = (
            f'{{"name": "{S.OPS[op]}", "cat": "{S.KINDS[kind]}", "ph": "X", '
            f'"ts": {ts:.3f}, "dur": {te - ts:.3f}, '
        )
        for g in facts.lane_ranks[lane]:
            tid = _tid(g, stream, sub)
            lines.append(f'{head}"pid": {g // gpn}, "tid": {tid}, "args": {args}}}')
    return lines


def export_serving_perfetto(
    path: str | Path, out: str | Path, window_ms: tuple[float, float] | None = None
) -> int:
    """A serving trace as trace-event JSON: one process per replica, each request's ``prefill``
    (arrival to first token, waiting included) and ``decode`` (first token to finish) slices on
    the first free track of its replica, and counters of the requests in prefill and in decode
    (the continuous batch) over time."""
    cols = analyze_serving(path).requests
    lo, hi = window_ms or (-np.inf, np.inf)
    check_output(out, inputs=(path,))
    events: list[str] = []
    done = np.flatnonzero(~cols["rejected"])
    free: dict[int, list[float]] = {}  # replica -> end time of each track
    for rid in done[np.argsort(cols["arrival_ms"][done], kind="stable")]:
        arrival, first = float(cols["arrival_ms"][rid]), float(cols["first_token_ms"][rid])
        finish, replica = float(cols["finish_ms"][rid]), int(cols["replica"][rid])
        tracks = free.setdefault(replica, [])
        tid = next((i for i, end in enumerate(tracks) if end <= arrival), len(tracks))
        tracks[tid : tid + 1] = [finish]
        if finish < lo or arrival > hi:
            continue
        for name, a, b in (("prefill", arrival, first), ("decode", first, finish)):
            events.append(
                json.dumps(
                    {
                        "name": name,
                        "ph": "X",
                        "pid": replica,
                        "tid": tid,
                        "ts": a * 1e3,
                        "dur": max(b - a, 0.0) * 1e3,
                        "args": {"request": int(rid)},
                    }
                )
            )
    times, prefill, decode = in_system_steps(cols)
    for t, p, d in zip(times, prefill, decode, strict=True):
        if lo <= t <= hi:
            events.append(
                json.dumps(
                    {
                        "name": "requests",
                        "ph": "C",
                        "pid": -1,
                        "ts": float(t) * 1e3,
                        "args": {"prefill": int(p), "decode": int(d)},
                    }
                )
            )
    names = [
        json.dumps({"ph": "M", "name": "process_name", "pid": r, "args": {"name": f"replica {r}"}})
        for r in sorted(free)
    ]
    names.append(
        json.dumps({"ph": "M", "name": "process_name", "pid": -1, "args": {"name": "batch"}})
    )
    with atomic_output(out, inputs=(path,)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write('{"displayTimeUnit": "ms", "traceEvents": [\n')
        f.write(",\n".join(names + events))
        f.write("\n]}\n")
    return len(events)
