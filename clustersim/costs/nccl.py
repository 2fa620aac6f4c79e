"""NCCL's own cost model of a ring collective per protocol (``src/graph/tuning.cc``), shared by
the alpha-beta collectives (:mod:`clustersim.costs.comm`), serving's low-latency all-reduce and
the flows set (``clustersim.calibration.comm_flows``).

NCCL runs every collective with one of three protocols and its tuner picks, per call, the one
its model says is fastest for the message:

* **LL** (low latency): 8-byte stores of 4 data bytes and a 4-byte flag; the lowest latency,
  half the bus bandwidth, capped at ``llMaxBw`` (GB/s, per GPU generation, one node).
* **LL128**: 128-byte lines of 120 data bytes and a flag; 0.92 of the bus bandwidth.
* **Simple**: plain copies with a fence per step; the full bus bandwidth, the highest latency.

Time of a ring (``S`` = buffer bytes, ``n`` GPUs, ``f`` = 2(n-1)/n for all-reduce, (n-1)/n for
reduce-scatter and all-gather, ``steps`` = 2(n-1) or n-1, the NVLink bus bandwidth ``B`` of
the Simple protocol)::

    time_us(p) = baseLat[Ring][p] + steps * hwLat[NVLink][Ring][p] + f * S / busBw(p)

with, from NCCL 2.19+ ``tuning.cc``: baseLat Ring LL / LL128 / Simple = 6.6 / 14.0 / 8.4 µs;
hwLat NVLink Ring = 0.6 / 1.9 / 3.4 µs per step; busBw(LL) = min(llMaxBw, B / 2), busBw(LL128)
= 0.92 B, busBw(Simple) = B; llMaxBw for one node: Ampere 87.7, Hopper 141, Blackwell 282 GB/s.
The tuner's choice is the protocol of least time (:func:`ring_time_us`).
"""

from __future__ import annotations

from typing import NamedTuple

PROTOCOLS = ("LL", "LL128", "Simple")
RING_BASE_US = {"LL": 6.6, "LL128": 14.0, "Simple": 8.4}
RING_NVLINK_STEP_US = {"LL": 0.6, "LL128": 1.9, "Simple": 3.4}
LL_BANDWIDTH_SHARE = 0.5
LL128_BANDWIDTH_SHARE = 0.92
# llMaxBws, one node (N1 column): Ampere, Hopper (H100 / H200 / H800), Blackwell (2 x Hopper).
LL_MAX_BUS_GBPS = {"a100": 87.7, "h100": 141.0, "h200": 141.0, "h800": 141.0, "b200": 282.0}
RING_OPS = ("all_reduce", "reduce_scatter", "all_gather")


def ring_steps(op: str, n: int, nodes: int = 1) -> tuple[int, int]:
    """(steps inside nodes, steps crossing nodes) of a ring over ``n`` GPUs on ``nodes`` nodes,
    as NCCL's latency model counts them: all-reduce 2(n-1) steps of which 2(N-1) cross nodes,
    reduce-scatter and all-gather n-1 and N-1."""
    if op not in RING_OPS:
        raise ValueError(f"unknown ring collective {op!r}; valid: {', '.join(RING_OPS)}")
    factor = 2 if op == "all_reduce" else 1
    inter = factor * (nodes - 1) if nodes > 1 else 0
    return factor * (n - 1) - inter, inter


def bus_factor(op: str, n: int) -> float:
    """Bytes each GPU sends per buffer byte: 2(n-1)/n for all-reduce, (n-1)/n otherwise
    (nccl-tests' bus-bandwidth factor)."""
    return (2 if op == "all_reduce" else 1) * (n - 1) / n


def protocol_bus_gbps(protocol: str, simple_bus_gbps: float, generation: str) -> float:
    """Bus bandwidth (GB/s) of ``protocol`` when the Simple protocol reaches ``simple_bus_gbps``."""
    if protocol == "LL":
        cap = LL_MAX_BUS_GBPS.get(generation, float("inf"))
        return min(cap, simple_bus_gbps * LL_BANDWIDTH_SHARE)
    if protocol == "LL128":
        return simple_bus_gbps * LL128_BANDWIDTH_SHARE
    if protocol == "Simple":
        return simple_bus_gbps
    raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")


class ProtocolTime(NamedTuple):
    """A ring collective's time (µs) with the protocol NCCL's tuner picks."""

    time_us: float
    protocol: str


def ring_protocol_us(
    protocol: str,
    op: str,
    size_bytes: float,
    n: int,
    simple_bus_gbps: float,
    generation: str,
    step_scale: float = 1.0,
) -> float:
    """NCCL's modelled time (µs) of a ring ``op`` over ``n`` GPUs of one node with ``protocol``
    (module docstring), the per-step NVLink latency times ``step_scale``; 0 for n <= 1."""
    if n <= 1:
        return 0.0
    steps = ring_steps(op, n)[0]
    bus = protocol_bus_gbps(protocol, simple_bus_gbps, generation)
    latency_us = RING_BASE_US[protocol] + steps * RING_NVLINK_STEP_US[protocol] * step_scale
    return latency_us + bus_factor(op, n) * size_bytes / (bus * 1e3)


def ring_time_us(
    op: str,
    size_bytes: float,
    n: int,
    simple_bus_gbps: float,
    generation: str,
    step_scale: float = 1.0,
) -> ProtocolTime:
    """The fastest protocol's time (µs) of a ring ``op`` inside one node (NCCL's tuner; the
    per-step latency times ``step_scale``)."""
    times = [
        ProtocolTime(
            ring_protocol_us(p, op, size_bytes, n, simple_bus_gbps, generation, step_scale), p
        )
        for p in PROTOCOLS
    ]
    return min(times, key=lambda t: t.time_us)
