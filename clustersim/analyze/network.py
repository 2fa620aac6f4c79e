"""The shared links of a training trace (format v3, runs with ``hardware.topology``): the
``links`` list of ``analyze --json``, contention per collective kind, busy intervals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clustersim.trace.reader import TraceError, TraceReader


@dataclass
class LinkFacts:
    """What a trace says about its links (empty for runs without a topology)."""

    contention_ms: float = 0.0
    by_kind_ms: dict[str, float] = field(default_factory=dict)
    links: list[dict[str, Any]] = field(default_factory=list)  # analyze --json ``links``
    busy: dict[str, np.ndarray] = field(default_factory=dict)  # link -> (k, 2) intervals, ms

    @property
    def present(self) -> bool:
        """Whether the run modelled shared links."""
        return bool(self.links) or bool(self.by_kind_ms)


def read_links(reader: TraceReader, iteration_ms: float) -> LinkFacts:
    """The network rows of the trace's summary batch."""
    network = reader.metadata["run"].get("network")
    if network is None:
        return LinkFacts()
    names = [str(n) for n, _ in network["links"]]
    kinds = [str(k) for _, k in network["links"]]
    summary = reader.summary
    ops = np.array(summary.column("op").to_pylist(), dtype=object)
    group = summary.column("group").to_numpy()
    out = LinkFacts()
    rows = np.flatnonzero(ops == "contention")
    if len(rows):
        i = int(rows[0])
        out.contention_ms = float(summary.column("value")[i].as_py() or 0.0)
        values = summary.column("values")[i].as_py() or []
        out.by_kind_ms = dict(zip(network["kinds"], map(float, values), strict=False))
    nbytes = summary.column("bytes").to_numpy(zero_copy_only=False)
    value = summary.column("value").to_pylist()
    values = summary.column("values").to_pylist()
    for i in np.flatnonzero(ops == "link").tolist():
        g = int(group[i])
        if not 0 <= g < len(names):
            raise TraceError(f"{reader.path}: damaged trace (link row {g} of {len(names)} links)")
        busy_ms = float((values[i] or [0.0])[0])
        out.links.append(
            {
                "link": names[g],
                "kind": kinds[g],
                "bytes": float(nbytes[i]),
                "busy_pct": 100.0 * busy_ms / iteration_ms if iteration_ms > 0 else 0.0,
                "contention_ms": float(value[i] or 0.0),
            }
        )
    out.links.sort(key=lambda d: (-d["contention_ms"], -d["busy_pct"], d["link"]))
    busy_rows = np.flatnonzero(ops == "link_busy")
    if len(busy_rows):
        start = summary.column("start_s").to_numpy(zero_copy_only=False)[busy_rows] * 1e3
        end = summary.column("end_s").to_numpy(zero_copy_only=False)[busy_rows] * 1e3
        for g in np.unique(group[busy_rows]).tolist():
            mine = group[busy_rows] == g
            out.busy[names[g]] = np.stack([start[mine], end[mine]], axis=1)
    return out
