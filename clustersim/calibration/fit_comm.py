"""Fit the collective and DeepEP calibration (``collectives`` and ``moe.deepep_*``) per GPU
generation to published measurements (``measurements/README_comm.md``).

Model (``clustersim.costs.comm``): per link class, a collective of ``steps`` steps moving
``f · S`` bytes per GPU takes ``base + steps · alpha + f · S / (B · efficiency)``; a
send/receive ``base + alpha + S / (B · p2p_efficiency)``. With ``alpha``, ``1/B_eff``,
``base`` and ``1/B_p2p`` as unknowns the model is linear, so the fit is a non-negative least
squares on relative errors (every subset of active parameters is solved; the best feasible one
wins), deterministic and numpy-only. Efficiencies above 1 are clipped to 1 and the rest refit.

Inside a node every generation's ring collectives use NCCL's protocols
(``collectives.intra_node_protocols``, ``clustersim.costs.nccl``): a ring takes ``base`` plus
the time of the protocol NCCL's tuner picks (LL, LL128 or Simple, NCCL's own latencies, the
Simple protocol at ``B · efficiency``). The unknowns are then ``1/B_eff`` and ``base`` (and
the send/receive ones); each sample's protocol is fixed at the current ``B_eff``, the linear
fit solved, and the two repeated until no sample changes protocol. ``alpha`` is fitted on
send/receive rows alone (it no longer enters a ring inside a node). Across nodes a ring runs
one ring per GPU of a node on that GPU's NIC (``comm``'s rail ring).

Sources and derivations per generation (``B`` = the GPU preset's link bandwidth):

* ``a100`` intra-node: Vidur DGX-A100 all-reduce (2, 4, 8 GPUs) and send/recv, in one fit.
  Inter-node: *derived* from ``h100`` (same NCCL/InfiniBand transport; the preset's HDR NIC
  rate). Vidur's A100 multi-node rows (2 nodes) are not expressible (``not_expressible``):
  a node sends 4-12 GB/s for 1-8 GPUs per node, below one 100 Gb/s link and not rising with
  the node's GPUs, while the cluster's network is not stated (a DGX A100 has eight 200 Gb/s
  HDR NICs); sizes are bytes (Vidur records 2 x its fp16 element count) and times NCCL kernel
  medians, so the derivation is not what is off.
* ``h100`` intra-node: Vidur DGX-H100 all-reduce (2, 4, 8 GPUs) and send/recv. Inter-node:
  send/recv bandwidth and latency from Vidur's 2-node send/recv (one configuration: the step
  latency stays the link's, the rest is the base latency); collective efficiency from the NCCL
  maintainers' 46-48 GB/s bus bandwidth per NDR-400 NIC (comm.csv C0075, midpoint 47).
* ``h200`` intra-node: ml-engineering's 8 x H200 nccl-tests (comm.csv): the all-reduce sweep
  up to 64 MiB and the ring (NVLS off) all-reduce, all-gather and reduce-scatter rows; larger
  sweep rows and NVLSTree run NVLS (in-switch reduction, not in this model): not expressible
  here, modelled by the flows set (``comm_flows``). Send/recv
  efficiency: ``h100``'s (same NVLink4/NVSwitch fabric). Inter-node: ``h100``'s.
* ``h800``: *derived*. Intra-node efficiency from the one user report of 215 GB/s NVLS
  all-reduce bus bandwidth (C0076) divided by H200's NVLS/ring ratio (C0105/C0106), capped at 1;
  send/recv efficiency from DeepEP's intranode NVLink bandwidth (C0001/C0002); latencies and
  inter-node values ``h100``'s.
* ``b200`` intra-node: the 1-node torch all-reduce rows (C0116, C0118, C0120, C0122) and the
  latency-bound sizes of the same table (``comm_torch_floor.csv``: they set the torch
  harness's per-call cost, as in the flows set; fitted, never scored; step latency
  ``h100``'s); send/recv efficiency from DeepEP V2's NVLink bandwidth on SM100 (C0059/C0060).
  Inter-node: efficiency and base latency from the 4-node rows (C0117, ..., C0123) and the
  table's 4-node latency-bound sizes through NCCL's ring over the nodes (one per rail) with
  the intra-node fit fixed; send/recv ``h100``'s.
* DeepEP (``moe.deepep_*``), measured on H800 (DeepEP V1 README): NVLink bandwidth = mean of
  the intranode normal-kernel rows, RDMA bandwidth = median of the internode normal-kernel rows,
  latency = relative least squares over the low-latency rows (``t = L + bytes / B``, bytes =
  the table's bandwidth x time). Other generations scale the bandwidths by their links: RDMA by
  ``inter_node`` bandwidth / 50; NVLink by ``min(H800 ratio, B200 ratio)`` of the NVLink rate
  (DeepEP V2 on SM100 reaches 0.81 of 900 GB/s; H800's 160 GB/s link is nearly saturated).
  DeepEP needs SM90+: the ``a100`` values are a hypothetical extrapolation.

Vidur's harness (``harness_bound``): its all-reduce rows on 3 or more GPUs are what rank 0's
NCCL kernel records, at least the harness's per-call floor (``harness_ms``: the kernel waits
for the last rank's launch while the collective is shorter than the host's per-call time;
the rows' own min / median / max show both regimes at the same size). The floor is fitted per
generation on the model's kernel times (``fit_harness_floor_us``), the rows it hides are left
out of the kernel fit (``fit_link_class_at``), and both are refitted with each fold. It is a
property of the measurement, not of the GPU: not written to the data files.

Out of sample: leave one configuration (GPU count and collective) out, or, for the only
configuration of its kind (e.g. Vidur's one send/recv set), an interleaved 5-fold split
inside it; one row out for the small published sets. Rows that a generation derives rather
than fits are predicted the same way in and out of sample.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np

from clustersim.calibration import ErrorSummary, GroupErrors, read_measurements
from clustersim.costs import comm, nccl
from clustersim.spec.calibration_data import calibration_data
from clustersim.spec.presets import GPU_GENERATION, GPU_PRESETS
from clustersim.spec.schema import CalibrationSpec, HardwareSpec, LinkSpec

GENERATIONS = ("a100", "b200", "h100", "h200", "h800")
VIDUR_FILE = "comm_vidur.csv"
PUBLISHED_FILE = "comm_published.csv"
GPUS_PER_NODE = 8
DATASETS = ("vidur_all_reduce", "vidur_send_recv", "nccl_tests", "deepep")
FOLDS = 5
# The GPU whose figures each generation's data file is fitted against: the first of its
# generation in GPU_GENERATION, except A100 (the 80 GB card, as measured).
_PRESET = {gen: gpu for gpu, gen in reversed(GPU_GENERATION.items())} | {"a100": "A100-80GB"}


# ---- measurements -------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One collective timing: ``op`` all_reduce / all_gather / reduce_scatter / p2p over
    ``n`` GPUs, ``g`` per node, buffer ``size`` bytes, measured ``time_ms``."""

    dataset: str
    name: str
    gpu: str  # generation the sample was measured on
    op: str
    n: int
    g: int
    size: float
    time_ms: float
    group: str  # leave-one-group-out key

    @property
    def nodes(self) -> int:
        return self.n // self.g

    def ranks(self) -> list[int]:
        """Ranks of the sample's group on nodes of GPUS_PER_NODE GPUs."""
        return [node * GPUS_PER_NODE + i for node in range(self.nodes) for i in range(self.g)]


@cache
def vidur_samples() -> tuple[Sample, ...]:
    """The packaged Vidur NCCL timings (medians, ms)."""
    out = []
    for r in read_measurements(VIDUR_FILE):
        n, g, op = int(r["num_workers"]), int(r["devices_per_node"]), r["collective"]
        op = "p2p" if op == "send_recv" else op
        size = float(r["size_bytes"])
        group = f"{r['gpu']} {r['collective']} n={n} g={g}"
        out.append(
            Sample(
                f"vidur_{r['collective']}",
                f"{group} S={size:.0f}",
                r["gpu"],
                op,
                n,
                g,
                size,
                float(r["time_ms"]),
                group,
            )
        )
    return tuple(out)


@cache
def published_rows() -> dict[str, dict[str, str]]:
    """The packaged comm.csv subset, by row id."""
    return {r["row_id"]: r for r in read_measurements(PUBLISHED_FILE)}


def _nccl_sample(
    row_id: str, gen: str, op: str = "all_reduce", size: float | None = None
) -> Sample:
    """A comm.csv bus-bandwidth row as a timing: t = f(n) · S / busbw (nccl-tests' definition);
    ``size`` for rows that state none (large-message statements)."""
    r = published_rows()[row_id]
    n, g = int(r["num_gpus"]), int(r["gpus_per_node"])
    g = min(g, n)
    size = float(r["message_size_bytes"]) if size is None else size
    busbw = float(r["value"])
    time_ms = nccl.bus_factor(op, n) * size / (busbw * 1e6)
    name = f"{row_id} {r['gpu'][:24]} {op} n={n} S={size:.0f}"
    return Sample("nccl_tests", name, gen, op, n, g, size, time_ms, row_id)


H200_SWEEP = [f"C{i:04d}" for i in range(77, 97)]
H200_SWEEP_FIT_MAX_BYTES = 64 * 2**20
H200_RING = ["C0098", "C0100", "C0102", "C0104", "C0106", "C0108"]
H200_GATHER_SCATTER = {"C0109": "all_gather", "C0110": "reduce_scatter"}
H200_NVLS_ONLY = ["C0097", "C0099", "C0101", "C0103", "C0105", "C0107"]
H200_MULTI_NODE = ["C0114", "C0115"]
# NVLS (in-switch reduction) rows the alpha-beta model cannot express: the sweep above its fit
# range (C0089-C0096) and the forced NVLSTree row; the flows set (comm_flows) models them.
H200_NVLS_NOT_EXPRESSIBLE = [f"C{i:04d}" for i in range(89, 97)] + ["C0115"]
B200_ONE_NODE = ["C0116", "C0118", "C0120", "C0122"]
B200_FOUR_NODES = ["C0117", "C0119", "C0121", "C0123"]


# ---- linear non-negative least squares on relative error ----------------------------------

# unknowns: alpha (ms per step), 1/B_eff (ms per byte), base (ms), 1/B_p2p (ms per byte)
ALPHA, INV_B, BASE, INV_P2P = range(4)


def _design(sample: Sample) -> np.ndarray:
    """Row of the linear model for a sample inside one link class."""
    n, s = sample.n, sample.size
    if sample.op == "p2p":
        return np.array([1.0, 0.0, 1.0, s])
    steps = {"all_reduce": 2 * (n - 1)}.get(sample.op, n - 1)
    return np.array([steps, nccl.bus_factor(sample.op, n) * s, 1.0, 0.0])


def nnls_relative(
    x: np.ndarray,
    t: np.ndarray,
    fixed: dict[int, float],
    offset: np.ndarray | float = 0.0,
) -> np.ndarray:
    """argmin sum(((x @ p + offset) / t - 1)^2) over p >= 0 with ``fixed`` entries given
    (up to ``EXHAUSTIVE_MAX_FREE`` free columns: every subset solved, the best feasible one
    wins; more: Lawson and Hanson's active-set method, the same optimum)."""
    k = x.shape[1]
    p = np.zeros(k)
    for i, v in fixed.items():
        p[i] = v
    target = 1.0 - (offset + x @ p) / t
    free = [i for i in range(k) if i not in fixed and np.any(x[:, i] != 0)]
    a = x / t[:, None]
    if len(free) > EXHAUSTIVE_MAX_FREE:
        p[free] = _lawson_hanson(a[:, free], target)
        return p
    best, best_p = math.inf, p
    for mask in itertools.product((0, 1), repeat=len(free)):
        idx = [f for f, m in zip(free, mask, strict=True) if m]
        q = p.copy()
        if idx:
            sol = np.linalg.lstsq(a[:, idx], target, rcond=None)[0]
            if np.any(sol < 0):
                continue
            q[idx] = sol
        r = float(np.sum((a @ q + offset / t - 1.0) ** 2))
        if r < best - 1e-15:
            best, best_p = r, q
    return best_p


EXHAUSTIVE_MAX_FREE = 8


def _lawson_hanson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin |a q - b|^2 over q >= 0 (Lawson & Hanson 1974, NNLS active-set algorithm)."""
    n = a.shape[1]
    tol = 1e-12 * max(1.0, float(np.abs(a).max()) * float(np.abs(b).max()))
    active = np.zeros(n, dtype=bool)  # the passive set P: columns allowed above zero
    q = np.zeros(n)
    for _ in range(3 * n):
        w = a.T @ (b - a @ q)
        if active.all() or np.max(np.where(active, -np.inf, w)) <= tol:
            break
        active[int(np.argmax(np.where(active, -np.inf, w)))] = True
        for _ in range(n):  # at most n columns leave the passive set
            z = np.zeros(n)
            z[active] = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
            if np.all(z[active] > 0):
                q = z
                break
            drop = active & (z <= 0)
            step = float(np.min(q[drop] / np.maximum(q[drop] - z[drop], tol)))
            q = q + step * (z - q)
            active &= q > tol
    return q


@dataclass(frozen=True)
class ClassFit:
    """Fitted values of one link class; ``latency_us`` None = the link's own; ``protocols``:
    ring collectives with NCCL's protocols (``collectives.intra_node_protocols``)."""

    efficiency: float
    p2p_efficiency: float
    latency_us: float | None
    base_latency_us: float
    protocols: bool = False
    gpu_exponent: float = 0.0  # collectives.intra_node_efficiency_gpu_exponent
    step_scale: float = 1.0  # collectives.intra_node_step_latency_scale


GPU_EXPONENT_GRID = np.round(np.arange(-0.5, 1.0 + 1e-9, 0.01), 2)
STEP_SCALE_GRID = np.round(np.arange(0.0, 2.0 + 1e-9, 0.01), 2)
GRID_COARSE = 5  # coarse pass: every 5th grid point, then the fine points around the best
SEARCH_ROUNDS = 4  # exponent, then step scale, alternately, until neither moves


def _grid_min(cost: Callable[[float], float], grid: np.ndarray) -> float:
    """The point of ``grid`` of least ``cost``: every ``GRID_COARSE``-th point, then the fine
    points around the best of them (ties: the first)."""
    best, best_x = math.inf, float(grid[0])
    for x in grid[::GRID_COARSE]:
        c = cost(float(x))
        if c < best - 1e-15:
            best, best_x = c, float(x)
    near = np.abs(grid - best_x)
    for x in grid[(near > 0) & (near < GRID_COARSE * (grid[1] - grid[0]) - 1e-9)]:
        c = cost(float(x))
        if c < best - 1e-15:
            best, best_x = c, float(x)
    return best_x


def fit_link_class(
    samples: list[Sample],
    link_gbps: float,
    *,
    latency_us: float | None = None,
    p2p_efficiency: float | None = None,
    generation: str | None = None,
    efficiency: float | None = None,
    gpu_exponent: float | None = None,
    step_scale: float | None = None,
) -> ClassFit:
    """:func:`fit_link_class_at`, and with a full-node ``efficiency`` given (NCCL's protocols,
    ``generation``) and ring samples over at least two GPU counts the GPU-count exponent of
    the efficiency (``collectives.intra_node_efficiency_gpu_exponent``) and the factor on
    NCCL's per-step latency (``collectives.intra_node_step_latency_scale``): ``gpu_exponent``
    / ``step_scale`` if given, else the points of ``GPU_EXPONENT_GRID`` / ``STEP_SCALE_GRID``
    of least squared relative error (searched in turn, from NCCL's own latency, until neither
    moves). Without a full-node efficiency they are the given values or 0 / 1: fitted
    together with it, the efficiency and the exponent trade against each other on small
    messages (H100: the 8-GPU efficiency runs to its bound 1)."""
    kwargs = {
        "latency_us": latency_us,
        "p2p_efficiency": p2p_efficiency,
        "generation": generation,
        "efficiency": efficiency,
    }
    counts = {s.n for s in samples if s.op != "p2p"}
    searched = efficiency is not None and generation is not None and len(counts) >= 2
    gamma = gpu_exponent if gpu_exponent is not None else 0.0
    scale = step_scale if step_scale is not None else 1.0
    if not searched or (gpu_exponent is not None and step_scale is not None):
        return fit_link_class_at(samples, link_gbps, gpu_exponent=gamma, step_scale=scale, **kwargs)
    assert generation is not None
    fits: dict[tuple[float, float], tuple[float, ClassFit]] = {}

    def cost(g: float, m: float) -> float:
        if (g, m) not in fits:
            got = fit_link_class_at(samples, link_gbps, gpu_exponent=g, step_scale=m, **kwargs)
            fits[g, m] = (_squared_relative_error(samples, got, link_gbps, generation), got)
        return fits[g, m][0]

    for _ in range(SEARCH_ROUNDS):
        before = (gamma, scale)
        if gpu_exponent is None:
            gamma = _grid_min(lambda g, m=scale: cost(g, m), GPU_EXPONENT_GRID)
        if step_scale is None:
            scale = _grid_min(lambda m, g=gamma: cost(g, m), STEP_SCALE_GRID)
        if (gamma, scale) == before:
            break
    cost(gamma, scale)
    return fits[gamma, scale][1]


def _squared_relative_error(
    samples: list[Sample], got: ClassFit, link_gbps: float, generation: str
) -> float:
    """Sum of squared relative errors of ``got`` on ``samples`` inside one node, Vidur's
    harness floor (:func:`harness_ms`) fitted on ``got``'s kernel times."""
    kernel = _class_kernel_ms(samples, got, link_gbps, generation)
    floor = fit_harness_floor_us(samples, kernel)
    t = np.array([s.time_ms for s in samples])
    recorded = np.array([harness_ms(s, k, floor) for s, k in zip(samples, kernel, strict=True)])
    return float(np.sum((recorded / t - 1.0) ** 2))


def _class_kernel_ms(
    samples: list[Sample], got: ClassFit, link_gbps: float, generation: str | None
) -> np.ndarray:
    """Modelled kernel times (ms) of ``samples`` inside one node under ``got``."""
    out = []
    for s in samples:
        if s.op == "p2p":
            alpha_ms = (got.latency_us or 0.0) * 1e-3
            p2p_ms = s.size / (link_gbps * got.p2p_efficiency * 1e6)
            t = got.base_latency_us * 1e-3 + alpha_ms + p2p_ms
        elif generation is None:  # the alpha-beta ring: _design's row
            inv_b = 1.0 / (link_gbps * got.efficiency * 1e6)
            alpha_ms = (got.latency_us or 0.0) * 1e-3
            t = float(_design(s) @ [alpha_ms, inv_b, got.base_latency_us * 1e-3, 0.0])
        else:
            eff = min(1.0, got.efficiency * comm.efficiency_gpu_scale(s.n, got.gpu_exponent))
            bus = link_gbps * eff
            ring = nccl.ring_time_us(s.op, s.size, s.n, bus, generation, got.step_scale)
            t = got.base_latency_us * 1e-3 + ring.time_us * 1e-3
        out.append(t)
    return np.array(out)


HARNESS_ITERATIONS = 6


def fit_link_class_at(
    samples: list[Sample],
    link_gbps: float,
    *,
    latency_us: float | None = None,
    p2p_efficiency: float | None = None,
    generation: str | None = None,
    efficiency: float | None = None,
    gpu_exponent: float = 0.0,
    step_scale: float = 1.0,
) -> ClassFit:
    """:func:`fit_kernel_class_at` on the samples Vidur's harness floor does not hide: fitted
    on every sample, then the floor fitted on its kernel times (:func:`fit_harness_floor_us`)
    and the fit repeated without the :func:`harness_bound` samples whose modelled kernel is
    below it (their recorded time is the floor whatever the kernel), until that set settles."""
    kwargs = {
        "latency_us": latency_us,
        "p2p_efficiency": p2p_efficiency,
        "generation": generation,
        "efficiency": efficiency,
        "gpu_exponent": gpu_exponent,
        "step_scale": step_scale,
    }
    got = fit_kernel_class_at(samples, link_gbps, **kwargs)
    if not any(harness_bound(s) for s in samples):
        return got
    hidden: set[int] | None = None
    for _ in range(HARNESS_ITERATIONS):
        kernel = _class_kernel_ms(samples, got, link_gbps, generation)
        floor_ms = fit_harness_floor_us(samples, kernel) * 1e-3
        now = {i for i, s in enumerate(samples) if harness_bound(s) and kernel[i] < floor_ms}
        if now == hidden:
            break
        hidden = now
        got = fit_kernel_class_at(
            [s for i, s in enumerate(samples) if i not in hidden], link_gbps, **kwargs
        )
    return got


def fit_kernel_class_at(
    samples: list[Sample],
    link_gbps: float,
    *,
    latency_us: float | None = None,
    p2p_efficiency: float | None = None,
    generation: str | None = None,
    efficiency: float | None = None,
    gpu_exponent: float = 0.0,
    step_scale: float = 1.0,
) -> ClassFit:
    """Fit one link class to samples inside it. ``latency_us`` / ``p2p_efficiency`` given:
    held fixed. Send/receive efficiency defaults to the collective one without p2p samples.

    ``generation`` given: ring collectives with NCCL's protocols (``costs.nccl``): their
    latencies are NCCL's, the unknowns the Simple protocol's bus bandwidth and the per-call
    base; each sample's protocol is the one NCCL's tuner picks at the current bandwidth,
    iterated until no sample changes protocol. The per-step latency is then fitted on the
    send/receive samples only (None without them: the link's own). ``efficiency`` given: the
    full-node (8-GPU) collective efficiency held fixed; ``gpu_exponent``: a ring over ``n``
    GPUs runs at that efficiency x ``comm.efficiency_gpu_scale(n, gpu_exponent)``;
    ``step_scale``: NCCL's per-step latency times that factor."""
    t = np.array([s.time_ms for s in samples])
    fixed: dict[int, float] = {}
    if latency_us is not None:
        fixed[ALPHA] = latency_us * 1e-3
    if p2p_efficiency is not None:
        fixed[INV_P2P] = 1.0 / (link_gbps * p2p_efficiency * 1e6)
    floor = 1.0 / (link_gbps * 1e6)  # efficiency <= 1: 1/B_eff >= 1/B
    inv_b = floor / PROTOCOL_START_EFFICIENCY
    if efficiency is not None:
        inv_b = floor / efficiency
        fixed[INV_B] = inv_b
    chosen: list[str] | None = None
    for _ in range(PROTOCOL_ITERATIONS if generation else 1):
        rows = [_protocol_design(s, inv_b, generation, gpu_exponent, step_scale) for s in samples]
        protocols = [r[2] for r in rows]
        if protocols == chosen:
            break
        chosen = protocols
        x = np.array([r[0] for r in rows])
        offset = np.array([r[1] for r in rows])
        fit_fixed = dict(fixed)
        p = nnls_relative(x, t, fit_fixed, offset)
        for index in (INV_B, INV_P2P):
            if np.any(x[:, index] != 0) and index not in fit_fixed and p[index] < floor:
                fit_fixed[index] = floor
                p = nnls_relative(x, t, fit_fixed, offset)
        inv_b = p[INV_B] if p[INV_B] > 0 else inv_b
    eff = _efficiency(inv_b if generation else p[INV_B], link_gbps)
    p2p = _efficiency(p[INV_P2P], link_gbps) if np.any(x[:, INV_P2P] != 0) else eff
    if p2p_efficiency is not None:
        p2p = p2p_efficiency
    alpha: float | None = latency_us if latency_us is not None else p[ALPHA] * 1e3
    if latency_us is None and not np.any(x[:, ALPHA] != 0):
        alpha = None
    protocols = generation is not None
    return ClassFit(
        eff,
        p2p,
        alpha,
        p[BASE] * 1e3,
        protocols,
        gpu_exponent if protocols else 0.0,
        step_scale if protocols else 1.0,
    )


PROTOCOL_START_EFFICIENCY = 0.8
PROTOCOL_ITERATIONS = 12


def _protocol_design(
    sample: Sample,
    inv_b: float,
    generation: str | None,
    gpu_exponent: float = 0.0,
    step_scale: float = 1.0,
) -> tuple[np.ndarray, float, str]:
    """(design row, known offset ms, protocol) of a sample: the alpha-beta row without
    ``generation``; with it, a ring collective at the protocol NCCL's tuner picks for a Simple
    bus bandwidth of 1 / ``inv_b``: NCCL's latency as the offset and the protocol's share of
    the bandwidth in the 1/B column (LL at its cap: all offset); ``gpu_exponent``: the ring's
    GPU count scales the bandwidth (``comm.efficiency_gpu_scale``), ``step_scale`` NCCL's
    per-step latency."""
    if generation is None or sample.op == "p2p":
        return _design(sample), 0.0, ""
    op, n, size = sample.op, sample.n, sample.size
    scale = comm.efficiency_gpu_scale(n, gpu_exponent)  # this GPU count's share of 1 / inv_b
    bus_gbps = scale / (inv_b * 1e6)
    protocol = nccl.ring_time_us(op, size, n, bus_gbps, generation, step_scale).protocol
    steps = nccl.ring_steps(op, n)[0] * step_scale
    latency_ms = (nccl.RING_BASE_US[protocol] + steps * nccl.RING_NVLINK_STEP_US[protocol]) * 1e-3
    volume = nccl.bus_factor(op, n) * size
    share = nccl.protocol_bus_gbps(protocol, bus_gbps, generation) / bus_gbps
    if protocol == "LL" and share < nccl.LL_BANDWIDTH_SHARE - 1e-12:  # at llMaxBw
        cap = nccl.protocol_bus_gbps(protocol, bus_gbps, generation)
        return np.array([0.0, 0.0, 1.0, 0.0]), latency_ms + volume / (cap * 1e6), protocol
    return np.array([0.0, volume / (share * scale), 1.0, 0.0]), latency_ms, protocol


def _efficiency(inv_b: float, link_gbps: float) -> float:
    if inv_b <= 0:
        return 1.0
    return float(min(1.0, 1.0 / (inv_b * link_gbps * 1e6)))


# ---- hardware and predictions -------------------------------------------------------------


def hardware(generation: str, sections: dict[str, dict] | None = None) -> HardwareSpec:
    """A 2-node cluster of the generation's preset GPU with ``sections`` (collectives, moe)
    merged into the packaged calibration (the packaged one if None)."""
    data = calibration_data(generation)
    if data is None:
        raise ValueError(f"unknown generation {generation!r}; valid: {', '.join(GENERATIONS)}")
    for name, values in (sections or {}).items():
        data[name] = {**data.get(name, {}), **values}
    preset = GPU_PRESETS[_PRESET[generation]]
    return HardwareSpec(
        gpu=_PRESET[generation],
        num_nodes=4,
        gpus_per_node=GPUS_PER_NODE,
        memory_gib=preset["memory_gib"],
        peak_tflops=preset["peak_tflops"],
        hbm_bandwidth_gbps=preset["hbm_bandwidth_gbps"],
        intra_node=LinkSpec(**preset["intra_node"]),
        inter_node=LinkSpec(**preset["inter_node"]),
        calibration=CalibrationSpec.model_validate(data),
    )


def predict_ms(sample: Sample, hw: HardwareSpec) -> float:
    """The simulator's time for a sample: ring inside a node, NCCL-like ``auto`` across nodes
    (ring, tree or hierarchical, whichever is fastest), p2p between GPU 0 and the next GPU on
    the same node or the next node."""
    if sample.op == "p2p":
        dst = 1 if sample.g == sample.n else GPUS_PER_NODE
        return comm.collective_time_ms("p2p", sample.size, [0, dst], GPUS_PER_NODE, hw)
    algorithm = "ring" if sample.nodes == 1 else "auto"
    return comm.collective_time_ms(
        sample.op, sample.size, sample.ranks(), GPUS_PER_NODE, hw, algorithm
    )


def _section(intra: ClassFit, inter: ClassFit) -> dict[str, float | None]:
    return {
        "intra_node_efficiency": _round(intra.efficiency),
        "inter_node_efficiency": _round(inter.efficiency),
        "intra_node_latency_us": _round(intra.latency_us),
        "inter_node_latency_us": _round(inter.latency_us),
        "intra_node_base_latency_us": _round(intra.base_latency_us),
        "inter_node_base_latency_us": _round(inter.base_latency_us),
        "intra_node_p2p_efficiency": _round(intra.p2p_efficiency),
        "inter_node_p2p_efficiency": _round(inter.p2p_efficiency),
        "intra_node_protocols": intra.protocols,
        "intra_node_efficiency_gpu_exponent": _round(intra.gpu_exponent),
        "intra_node_step_latency_scale": _round(intra.step_scale),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.4g}")


def _link(generation: str, inter: bool) -> tuple[float, float]:
    preset = GPU_PRESETS[_PRESET[generation]]["inter_node" if inter else "intra_node"]
    return float(preset["bandwidth_gbps"]), float(preset["latency_us"])


# ---- per-generation fits ------------------------------------------------------------------


def _vidur(gpu: str, *, intra: bool) -> list[Sample]:
    return [s for s in vidur_samples() if s.gpu == gpu and (s.g == s.n) == intra]


# Hopper (NVLink4 via NVSwitch) 8-GPU ring rows at large messages (1-16 GiB): the H100
# maintainer statement (C0072, ~370 GB/s) and ml-engineering's H200 ring rows (NVLS off).
HOPPER_FULL_NODE_RING = ("C0072", *H200_RING, *H200_GATHER_SCATTER)
FULL_NODE_GPU = {"C0072": "h100"}


def full_node_efficiency(row_ids: tuple[str, ...] = HOPPER_FULL_NODE_RING) -> float:
    """The 8-GPU ring's Simple-protocol bus efficiency at large messages: the mean of the
    rows' bus bandwidth / the GPU preset's NVLink bandwidth (at 1-16 GiB NCCL's latencies are
    under 0.5 % of the time, so the bus bandwidth is the protocol's)."""
    rows = published_rows()
    ratios = [
        float(rows[r]["value"]) / _link(FULL_NODE_GPU.get(r, "h200"), False)[0] for r in row_ids
    ]
    return float(min(1.0, np.mean(ratios)))


def _h100_intra(
    samples: list[Sample] | None = None, full_node_rows: tuple[str, ...] = HOPPER_FULL_NODE_RING
) -> ClassFit:
    """Vidur's DGX-H100 rows with the 8-GPU efficiency fixed at the Hopper nccl-tests
    large-message ring rows' (``full_node_rows``, :func:`full_node_efficiency`): the per-call
    base, send/receive values and the GPU-count exponent fitted."""
    if samples is None:
        return _h100_intra_rows(full_node_rows)
    return fit_link_class(
        samples,
        _link("h100", False)[0],
        latency_us=SEND_STEP_LATENCY_US,
        generation="h100",
        efficiency=full_node_efficiency(full_node_rows),
    )


# The send/receive per-step latency inside a node, held at 0: a send's fixed cost is the
# per-call base. Fitted free on Vidur's sends it takes ~2 µs of that cost, which the model
# charges (n - 1) times per all-to-all, a pattern none of these rows measures.
SEND_STEP_LATENCY_US = 0.0


@cache
def _h100_intra_rows(full_node_rows: tuple[str, ...]) -> ClassFit:
    return _h100_intra(_vidur("h100", intra=True), full_node_rows)


def _h100_inter(samples: list[Sample] | None = None) -> ClassFit:
    bw, lat = _link("h100", True)
    p2p = fit_link_class(samples or _vidur("h100", intra=False), bw, latency_us=lat)
    maintainer = float(np.mean([46.0, 48.0])) / bw  # C0075: "46-48 GB/s" per NDR-400 NIC
    return ClassFit(min(1.0, maintainer), p2p.p2p_efficiency, None, p2p.base_latency_us)


def _h200_fit_samples() -> list[Sample]:
    sweep = [_nccl_sample(r, "h200") for r in H200_SWEEP]
    out = [s for s in sweep if s.size <= H200_SWEEP_FIT_MAX_BYTES]
    out += [_nccl_sample(r, "h200") for r in H200_RING]
    out += [_nccl_sample(r, "h200", op) for r, op in H200_GATHER_SCATTER.items()]
    return out


def _deepep_rows() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    rows = [
        r
        for r in published_rows().values()
        if r["dispatcher_kernel"].startswith("DeepEP V1")
        and "superseded" not in r["reliability"]
        and r["gpu"] == "H800"
    ]
    normal = [r for r in rows if "normal" in r["dispatcher_kernel"]]
    low = [r for r in rows if "low-latency" in r["dispatcher_kernel"]]
    return normal, low


def _deepep_normal_bytes(r: dict[str, str]) -> float:
    """Bytes per GPU of a normal-kernel row: tokens x top-k x hidden, FP8 dispatch (1 byte)
    or BF16 combine (2 bytes), without de-duplication."""
    elem = 1.0 if r["operation"] == "dispatch" else 2.0
    return float(r["tokens_per_batch"]) * float(r["topk"]) * float(r["hidden"]) * elem


def _deepep_low_latency(low: list[dict[str, str]]) -> list[tuple[str, int, float, float]]:
    """(row id, EP size, bytes, time ms) of the low-latency rows: bytes = bandwidth x time."""
    by_key: dict[tuple[int, str], dict[str, float | str]] = {}
    for r in low:
        entry = by_key.setdefault((int(r["ep"]), r["operation"]), {})
        entry[r["metric"]] = float(r["value"])
        if r["metric"] == "latency":
            entry["id"] = r["row_id"]
    out = []
    for (ep, _op), e in sorted(by_key.items()):
        t_ms = float(e["latency"]) * 1e-3
        out.append((str(e["id"]), ep, float(e["rdma_bandwidth"]) * 1e6 * t_ms, t_ms))
    return out


def _fit_deepep_latency(ll: list[tuple[str, int, float, float]], intra: float, inter: float):
    c = np.array([b / ((intra if ep <= GPUS_PER_NODE else inter) * 1e6) for _, ep, b, _ in ll])
    t = np.array([t for *_, t in ll])
    latency_ms = float(np.sum((t - c) / t**2) / np.sum(1 / t**2))
    return max(0.0, latency_ms) * 1e3


def fit_deepep(generation: str) -> dict[str, float]:
    """DeepEP bandwidths and latency of ``generation`` (module docstring)."""
    normal, low = _deepep_rows()
    intra_rows = [float(r["value"]) for r in normal if int(r["num_nodes"]) == 1]
    inter_rows = [float(r["value"]) for r in normal if int(r["num_nodes"]) > 1]
    h800_intra, h800_inter = float(np.mean(intra_rows)), float(np.median(inter_rows))
    latency = _fit_deepep_latency(_deepep_low_latency(low), h800_intra, h800_inter)
    nvlink_h800 = _link("h800", False)[0]
    v2 = [float(published_rows()[r]["value"]) for r in ("C0059", "C0060")]
    b200_ratio = float(np.mean(v2)) / _link("b200", False)[0]
    ratio = min(h800_intra / nvlink_h800, b200_ratio)
    intra = h800_intra if generation == "h800" else ratio * _link(generation, False)[0]
    inter = h800_inter * _link(generation, True)[0] / _link("h800", True)[0]
    return {
        "deepep_intra_node_gbps": _round(intra),
        "deepep_inter_node_gbps": _round(inter),
        "deepep_latency_us": _round(latency),
    }


def _h800_intra() -> ClassFit:
    rows = published_rows()
    nvls_over_ring = float(rows["C0105"]["value"]) / float(rows["C0106"]["value"])
    eff = min(1.0, float(rows["C0076"]["value"]) / nvls_over_ring / _link("h800", False)[0])
    deepep = np.mean([float(rows[r]["value"]) for r in ("C0001", "C0002")])
    p2p = min(1.0, float(deepep) / _link("h800", False)[0])
    h100 = _h100_intra()
    return ClassFit(
        eff,
        p2p,
        h100.latency_us,
        h100.base_latency_us,
        h100.protocols,
        h100.gpu_exponent,
        h100.step_scale,
    )


def _b200_intra(samples: list[Sample] | None = None) -> ClassFit:
    rows = published_rows()
    samples = samples or _b200_one_node_samples()
    nvlink = _link("b200", False)[0]
    p2p = min(1.0, float(np.mean([float(rows[r]["value"]) for r in ("C0059", "C0060")])) / nvlink)
    return fit_link_class(
        samples,
        nvlink,
        latency_us=_h100_intra().latency_us,
        p2p_efficiency=p2p,
        generation="b200",
    )


def _b200_inter(intra: ClassFit, samples: list[Sample] | None = None) -> ClassFit:
    """Inter-node efficiency and base latency through NCCL's ring over the nodes (one ring
    per GPU of a node, each on its GPU's NIC: ``comm``'s rail ring, bus bandwidth ``g`` x the
    NIC's at the fitted efficiency), the intra-node fit fixed; the four-node rows and the
    four-node latency-bound sizes of the same torch table (``comm_torch_floor.csv``), which
    set the harness's per-call cost."""
    samples = samples or _b200_four_node_samples()
    (bw_intra, _), (bw_inter, lat_inter) = _link("b200", False), _link("b200", True)
    x, rest = [], []
    for s in samples:
        g, k = s.g, s.nodes
        intra_steps, inter_steps = nccl.ring_steps(s.op, s.n, k)
        steps_ms = (intra_steps * (intra.latency_us or 0.0) + inter_steps * lat_inter) * 1e-3
        x.append([nccl.bus_factor(s.op, s.n) * s.size / g, 1.0])
        rest.append(steps_ms)
    xa, ta = np.array(x), np.array([s.time_ms for s in samples])
    # relative residual (x @ p + rest) / t - 1, linear in p: solve as target = 1 - rest / t
    a = xa / ta[:, None]
    target = 1.0 - np.array(rest) / ta
    best, best_p = math.inf, np.zeros(2)
    for idx in ([0], [0, 1]):
        sol = np.linalg.lstsq(a[:, idx], target, rcond=None)[0]
        if np.any(sol < 0):
            continue
        p = np.zeros(2)
        p[idx] = sol
        p[0] = max(p[0], 1.0 / (bw_inter * 1e6), 1.0 / (bw_intra * intra.efficiency * 1e6))
        r = float(np.sum((a @ p - target) ** 2))
        if r < best:
            best, best_p = r, p
    h100 = _h100_inter()
    return ClassFit(_efficiency(best_p[0], bw_inter), h100.p2p_efficiency, None, best_p[1] * 1e3)


TORCH_FLOOR_FILE = "comm_torch_floor.csv"


@cache
def torch_floor_samples(nodes: int) -> tuple[Sample, ...]:
    """The latency-bound sizes of the B200 torch all_reduce_bench tables on ``nodes`` nodes
    (``comm_torch_floor.csv``; the flows set fits its harness cost on the same rows): fitted
    with the published rows of the same table, never scored."""
    out = []
    for r in read_measurements(TORCH_FLOOR_FILE):
        if int(r["num_nodes"]) != nodes:
            continue
        n, g, size = int(r["num_gpus"]), int(r["gpus_per_node"]), float(r["message_size_bytes"])
        time_ms = nccl.bus_factor("all_reduce", n) * size / (float(r["busbw_gbps"]) * 1e6)
        name = f"{r['row_id']} B200 torch floor all_reduce n={n} S={size:.0f}"
        out.append(Sample("torch_floor", name, "b200", "all_reduce", n, g, size, time_ms, name))
    return tuple(out)


def _b200_one_node_samples() -> list[Sample]:
    return [_nccl_sample(r, "b200") for r in B200_ONE_NODE] + list(torch_floor_samples(1))


def _b200_four_node_samples() -> list[Sample]:
    return [_nccl_sample(r, "b200") for r in B200_FOUR_NODES] + list(torch_floor_samples(4))


def _intra_stage_ms(size: float, g: int, bus_gbps: float, intra: ClassFit) -> float:
    """One intra-node reduce-scatter stage of a hierarchical all-reduce (``comm``'s
    ``intra_ring_ms``): NCCL's fastest protocol, or the alpha-beta ring."""
    if intra.protocols:
        return nccl.ring_time_us("reduce_scatter", size, g, bus_gbps, "b200").time_us * 1e-3
    return (g - 1) / g * size / (bus_gbps * 1e6) + (g - 1) * (intra.latency_us or 0.0) * 1e-3


@cache
def _fit_classes(generation: str) -> tuple[ClassFit, ClassFit]:
    if generation not in GENERATIONS:
        raise ValueError(f"unknown generation {generation!r}; valid: {', '.join(GENERATIONS)}")
    if generation == "a100":
        a100 = fit_link_class(
            _vidur("a100", intra=True), _link("a100", False)[0], generation="a100"
        )
        return a100, _h100_inter()
    if generation == "h100":
        return _h100_intra(), _h100_inter()
    if generation == "h200":
        h100 = _h100_intra()
        intra = fit_link_class(
            _h200_fit_samples(),
            _link("h200", False)[0],
            latency_us=h100.latency_us,
            p2p_efficiency=h100.p2p_efficiency,
            generation="h200",
            gpu_exponent=h100.gpu_exponent,
            step_scale=h100.step_scale,
        )
        return intra, _h100_inter()
    if generation == "h800":
        return _h800_intra(), _h100_inter()
    intra = _b200_intra()
    return intra, _b200_inter(intra)


def fit(generation: str) -> dict[str, dict]:
    """The fitted ``collectives`` section and ``moe`` DeepEP fields of ``generation``."""
    intra, inter = _fit_classes(generation)
    return {"collectives": _section(intra, inter), "moe": fit_deepep(generation)}


# ---- errors -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommRow:
    """One measurement against the fitted model (times in ms)."""

    dataset: str
    name: str
    measured: float
    predicted_in_sample: float
    predicted_oos: float
    fitted: bool  # whether the row entered this generation's fit

    @property
    def error_in_sample(self) -> float:
        return self.predicted_in_sample / self.measured - 1

    @property
    def error_oos(self) -> float:
        return self.predicted_oos / self.measured - 1


# ---- Vidur's harness: rank 0's kernel waits for the last rank's launch ----------------------

HARNESS_MIN_GPUS = 3
HARNESS_FLOOR_GRID_US = np.round(np.arange(0.0, 100.0 + 1e-9, 0.5), 1)


def harness_bound(sample: Sample) -> bool:
    """Whether ``sample`` is timed by Vidur's collective harness with its per-call floor: an
    all-reduce inside one node over at least ``HARNESS_MIN_GPUS`` GPUs.

    Vidur times the NCCL kernel on rank 0 (Kineto, 11 back-to-back calls, no barrier). A
    collective's kernel ends only when every rank has launched it, so while the kernel is
    shorter than the harness's per-call host time, rank 0's kernel lasts until the last
    rank's launch: the host period, not the kernel. Rank 0 escapes it only when it is itself
    the last rank to launch; over 3 or more GPUs its sub-MiB rows sit at the floor (H100:
    3 and 1 of 128 rows below 20 µs on 4 and 8 GPUs), over 2 GPUs both regimes are common
    (H100: 26 of 128) and a floor fitted there comes out 0."""
    return (
        sample.dataset == "vidur_all_reduce"
        and sample.n == sample.g
        and sample.n >= HARNESS_MIN_GPUS
    )


def fit_harness_floor_us(samples: list[Sample], kernel_ms: np.ndarray) -> float:
    """The harness's per-call floor (µs): the point of ``HARNESS_FLOOR_GRID_US`` of least
    squared relative error of ``max(kernel, floor)`` over the :func:`harness_bound` samples,
    given each sample's modelled kernel time ``kernel_ms`` (0 without such samples)."""
    bound = [i for i, s in enumerate(samples) if harness_bound(s)]
    if not bound:
        return 0.0
    measured = np.array([samples[i].time_ms for i in bound])
    kernel = np.asarray(kernel_ms, dtype=float)[bound]
    floors_ms = HARNESS_FLOOR_GRID_US[:, None] * 1e-3
    cost = np.sum((np.maximum(kernel[None, :], floors_ms) / measured - 1.0) ** 2, axis=1)
    return float(HARNESS_FLOOR_GRID_US[int(np.argmin(cost))])


def harness_ms(sample: Sample, kernel_ms: float, floor_us: float) -> float:
    """The time Vidur's harness records for ``sample`` whose kernel takes ``kernel_ms``:
    at least the per-call floor for :func:`harness_bound` samples, the kernel otherwise."""
    return max(kernel_ms, floor_us * 1e-3) if harness_bound(sample) else kernel_ms


@cache
def harness_floor_us(generation: str) -> float:
    """The per-call floor of Vidur's harness fitted on ``generation``'s rows (0 without
    Vidur rows): the packaged collective model's kernel times, then the floor."""
    samples = _vidur(generation, intra=True) if generation in ("a100", "h100") else []
    if not samples:
        return 0.0
    hw = hardware(generation, fit(generation))
    return fit_harness_floor_us(samples, np.array([predict_ms(s, hw) for s in samples]))


def _class_rows(
    samples: list[Sample], generation: str, refit: Callable[[list[Sample]], dict[str, dict]]
) -> list[CommRow]:
    """Rows of ``samples`` (fitted) with leave-one-group-out predictions from ``refit``;
    Vidur's harness floor (:func:`harness_ms`) refitted with each fold."""
    hw = hardware(generation, fit(generation))
    kernel_in = np.array([predict_ms(s, hw) for s in samples])
    floor_in = fit_harness_floor_us(samples, kernel_in)
    ops = {s.group: s.op for s in samples}
    folds = []  # (held-out indices, hardware refit without them)
    for group, op in sorted(ops.items()):
        held = [i for i, s in enumerate(samples) if s.group == group]
        if sum(o == op for o in ops.values()) == 1 and len(held) >= FOLDS:
            # the only configuration of its kind: interleaved k-fold inside it
            folds += [held[k::FOLDS] for k in range(FOLDS)]
        else:
            folds.append(held)
    oos = np.empty(len(samples))
    for held in folds:
        out = set(held)
        rest = [s for i, s in enumerate(samples) if i not in out]
        fold_hw = hardware(generation, refit(rest)) if rest else hw
        floor = fit_harness_floor_us(rest, np.array([predict_ms(s, fold_hw) for s in rest]))
        oos[held] = [harness_ms(samples[i], predict_ms(samples[i], fold_hw), floor) for i in held]
    return [
        CommRow(s.dataset, s.name, s.time_ms, harness_ms(s, k, floor_in), float(o), True)
        for s, k, o in zip(samples, kernel_in, oos, strict=True)
    ]


def _derived_rows(samples: list[Sample], generation: str) -> list[CommRow]:
    hw = hardware(generation, fit(generation))
    return [
        CommRow(s.dataset, s.name, s.time_ms, p, p, False)
        for s in samples
        for p in [predict_ms(s, hw)]
    ]


def _with(generation: str, intra: ClassFit | None = None, inter: ClassFit | None = None):
    base_intra, base_inter = _fit_classes(generation)
    return {"collectives": _section(intra or base_intra, inter or base_inter)}


def comm_rows(generation: str) -> list[CommRow]:
    """Every measurement relevant to ``generation`` with in-sample and out-of-sample
    predictions (leave one Vidur configuration or one published row out)."""
    return list(_comm_rows(generation))


@cache
def _comm_rows(generation: str) -> tuple[CommRow, ...]:
    """:func:`comm_rows`, computed once per process (the refits take minutes for h100)."""
    rows: list[CommRow] = []
    if generation in ("a100", "h100"):
        intra_samples = _vidur(generation, intra=True)
        link = _link(generation, False)[0]
        rows += _class_rows(
            intra_samples,
            generation,
            lambda rest: _with(
                generation,
                intra=_h100_intra(rest)
                if generation == "h100"
                else fit_link_class(rest, link, generation=generation),
            ),
        )
    if generation == "h100":
        rows += _class_rows(
            _vidur("h100", intra=False), "h100", lambda rest: _with("h100", inter=_h100_inter(rest))
        )
    if generation == "h200":
        h100 = _h100_intra()
        link = _link("h200", False)[0]
        rows += _class_rows(
            _h200_fit_samples(),
            "h200",
            lambda rest: _with(
                "h200",
                intra=fit_link_class(
                    rest,
                    link,
                    latency_us=h100.latency_us,
                    p2p_efficiency=h100.p2p_efficiency,
                    generation="h200",
                    gpu_exponent=h100.gpu_exponent,
                    step_scale=h100.step_scale,
                ),
            ),
        )
        fitted = {s.name for s in _h200_fit_samples()}
        others = [_nccl_sample(r, "h200") for r in H200_SWEEP + H200_MULTI_NODE]
        expressible = [s for s in others if s.group not in H200_NVLS_NOT_EXPRESSIBLE]
        rows += _derived_rows([s for s in expressible if s.name not in fitted], "h200")
    if generation == "b200":
        one = [_nccl_sample(r, "b200") for r in B200_ONE_NODE]
        four = [_nccl_sample(r, "b200") for r in B200_FOUR_NODES]
        floor1, floor4 = list(torch_floor_samples(1)), list(torch_floor_samples(4))
        rows += _class_rows(
            one, "b200", lambda rest: _with("b200", intra=_b200_intra(rest + floor1))
        )
        rows += _class_rows(
            four,
            "b200",
            lambda rest: _with("b200", inter=_b200_inter(_fit_classes("b200")[0], rest + floor4)),
        )
    if generation == "h100":  # "~370 GB/s effective" ring bus bandwidth, at 1 GiB here
        rows += _full_node_rows()
    rows += deepep_rows(generation)
    return tuple(rows)


def _full_node_rows() -> list[CommRow]:
    """C0072 (H100, 8 GPUs, ~370 GB/s ring bus bandwidth, at 1 GiB here): it sets the 8-GPU
    efficiency with the H200 ring rows (``full_node_efficiency``); out of sample from the H200
    rows alone (H100 refitted without it)."""
    sample = _nccl_sample("C0072", "h100", size=2.0**30)
    rest = tuple(r for r in HOPPER_FULL_NODE_RING if r != "C0072")
    oos_hw = hardware("h100", _with("h100", intra=_h100_intra(full_node_rows=rest)))
    in_sample = predict_ms(sample, hardware("h100", fit("h100")))
    oos = predict_ms(sample, oos_hw)
    return [CommRow(sample.dataset, sample.name, sample.time_ms, in_sample, oos, True)]


def not_expressible(generation: str) -> list[tuple[str, str, str]]:
    """(id, label, why) of the generation's measurements the alpha-beta model cannot express:
    Vidur's A100 two-node configurations (the cluster's network is not stated and their rates
    fit no NIC count and rate) and H200's NVLS rows (no in-switch reduction here)."""
    out = []
    if generation == "a100":
        samples = _vidur("a100", intra=False)
        rates = {}
        for group in dict.fromkeys(s.group for s in samples):
            large = [_node_network_gbps(s) for s in samples if s.group == group and s.size >= MIB32]
            rates[group] = float(np.median(large))
        low, high = min(rates.values()), max(rates.values())
        for group, rate in rates.items():
            n = sum(s.group == group for s in samples)
            why = (
                f"Vidur's 'a100_dgx' across two nodes: a node sends {rate:.1f} GB/s (median, "
                f"32-64 MiB); its five two-node configurations {low:.1f}-{high:.1f} GB/s, "
                "below one 100 Gb/s link and not rising with the node's GPUs, where a DGX "
                "A100 has eight 200 Gb/s HDR NICs: the network is not stated and no NIC "
                "count and rate expresses them"
            )
            out.append((f"vidur {group}", f"{group} ({n} sizes)", why))
    if generation == "h200":
        why = (
            "NVLS / NVLSTree (NVLink SHARP, in-switch reduction): the alpha-beta collectives "
            "have no such algorithm; the flows set (comm_flows) expresses the row"
        )
        for rid in H200_NVLS_NOT_EXPRESSIBLE:
            out.append((rid, _nccl_sample(rid, "h200").name, why))
    return out


MIB32 = 32 * 2**20


def _node_network_gbps(sample: Sample) -> float:
    """Bytes a node sends to the other node(s) per second (GB/s) in a two-node sample: a ring
    all-reduce's 2(N-1)/N x S, a send's S."""
    nodes = sample.nodes
    sent = sample.size if sample.op == "p2p" else 2 * (nodes - 1) / nodes * sample.size
    return sent / (sample.time_ms * 1e6)


def deepep_rows(generation: str) -> list[CommRow]:
    """DeepEP rows (H800 measurements): normal kernels by bandwidth-implied time, low-latency
    kernels by time; in sample for h800, derived for the others (predicted on H800 links)."""
    if generation != "h800":
        return []
    normal, low = _deepep_rows()
    params = fit_deepep("h800")
    lat = params["deepep_latency_us"] * 1e-3
    intra, inter = params["deepep_intra_node_gbps"], params["deepep_inter_node_gbps"]
    out = []
    for r in normal:
        b = _deepep_normal_bytes(r)
        bw = intra if int(r["num_nodes"]) == 1 else inter
        measured = b / (float(r["value"]) * 1e6)
        name = f"{r['row_id']} normal {r['operation']} EP{r['ep']}"
        rest = [
            x
            for x in normal
            if x is not r and (int(x["num_nodes"]) == 1) == (int(r["num_nodes"]) == 1)
        ]
        pool = np.mean if int(r["num_nodes"]) == 1 else np.median
        oos_bw = float(pool([float(x["value"]) for x in rest])) if rest else bw
        out.append(
            CommRow("deepep", name, measured, lat + b / (bw * 1e6), lat + b / (oos_bw * 1e6), True)
        )
    ll = _deepep_low_latency(low)
    for i, (rid, ep, b, t) in enumerate(ll):
        bw = intra if ep <= GPUS_PER_NODE else inter
        oos_lat = _fit_deepep_latency(ll[:i] + ll[i + 1 :], intra, inter) * 1e-3
        out.append(
            CommRow(
                "deepep",
                f"{rid} low-latency EP{ep}",
                t,
                lat + b / (bw * 1e6),
                oos_lat + b / (bw * 1e6),
                True,
            )
        )
    return out


def comm_errors(generation: str) -> list[GroupErrors]:
    """In-sample and out-of-sample error summaries per data set (and fitted / derived)."""
    rows = comm_rows(generation)
    out = []
    for dataset in DATASETS:
        for fitted in (True, False):
            sel = [r for r in rows if r.dataset == dataset and r.fitted == fitted]
            if sel:
                name = f"{dataset} ({'fitted' if fitted else 'derived'})"
                out.append(
                    GroupErrors(
                        name,
                        ErrorSummary.of(np.array([r.error_in_sample for r in sel])),
                        ErrorSummary.of(np.array([r.error_oos for r in sel])),
                    )
                )
    return out
