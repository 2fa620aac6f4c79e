"""Sharded data parallelism (``parallel.dp_sharding``): shard sizes and per-layer units.

ZeRO-1 (``optimizer``, Megatron's distributed optimizer) shards the optimizer states over the
data-parallel group; ZeRO-2 (``gradients``) also the gradients, reduce-scattered layer by layer
in every micro-batch's backward; ZeRO-3 (``full``, PyTorch FSDP2 / Megatron FSDP) also the
parameters, all-gathered layer by layer in the forward and again in the backward of every
micro-batch (one layer prefetched ahead of the compute) and freed after use. HSDP
(``dp_shard_group``) shards over groups of that many DP ranks and replicates across the
``dp / dp_shard_group`` groups (their gradient shards are all-reduced across replicas).

Shard sizes: dense parameters shard over ``dp_shard_group x cp`` ranks (the distributed
optimizer's DP x CP group), expert parameters over the expert data-parallel group divided by
the replicas (all of EDP if the replicas do not divide it).

The unit of a per-layer gather or reduce-scatter is the layer's parameters on one GPU (TP- and
EP-sharded as the memory model holds them) plus an equal share of the stage's other parameters
(embedding, output layer, final norm), so the units of a stage add up to its parameters.

Link sharing: the sharded-DP collectives run on one stream per GPU (PyTorch FSDP's single
NCCL process group); when an EP all-to-all on the compute path crosses nodes while that
stream is busy across nodes, the two share the NICs fairly (:func:`fair_share_delay_ms`).

One hardware queue (:func:`one_hardware_queue`): Megatron-LM runs tensor or context
parallelism with ``CUDA_DEVICE_MAX_CONNECTIONS=1`` on GPUs before Blackwell (``validate_args``
asserted it in the 2024-2025 releases, FSDP or not: sequence parallelism's communication
must be dispatched before the GEMMs it overlaps). All streams then feed one in-order work
queue: a collective issued on the sharding stream while that stream is still busy waits at
the head of the queue for its predecessor, and every kernel issued after it, on any stream,
waits with it (Megatron-LM ``partition_buckets``: "having multiple back-to-back
communications will prevent the overlap of communication kernels with computation
kernels"; the Megatron-FSDP user guide unsets the variable "to ensure full parallelization
of FSDP communication and computation"). In the backward of ZeRO-3 the prefetched
all-gather of layer i-1 is issued after the reduce-scatter of layer i, so layer i-1's
backward cannot start before that reduce-scatter has finished.

Forward prefetch (:func:`forward_prefetch`): PyTorch FSDP issues a layer's all-gather in
that layer's pre-forward hook unless explicit forward prefetching is asked for (FSDP1
``forward_prefetch=False`` by default, FSDP2 ``set_modules_to_forward_prefetch`` unset;
Zhao et al. 2023, "PyTorch FSDP", VLDB, §3.3.2: the default relies on *implicit* forward
prefetching, the CPU thread issuing the next all-gather on its own stream while the GPU
still runs the current layer). With several hardware queues that gather overlaps the layer
before it; with one it is queued behind that layer's kernels and starts only when they are
done, so every forward gather is exposed. The backward prefetches explicitly (its gather
of layer i-1 is issued before layer i's backward) and overlaps in both cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clustersim.costs.params import ParamCounts
from clustersim.layout import Layout
from clustersim.spec.schema import Plan


@dataclass(frozen=True)
class LayerUnit:
    """Parameters one GPU gathers (ZeRO-3) and reduce-scatters (ZeRO-2/3) for one layer."""

    layer: int
    dense_params: float  # over the DP shard group
    expert_params: float  # over the expert shard group

    @property
    def params(self) -> float:
        """All parameters of the unit."""
        return self.dense_params + self.expert_params


def shard_sizes(plan: Plan, layout: Layout) -> tuple[int, int]:
    """(dense shard size, expert shard size): the ranks one parameter's shards are spread
    over (1, 1 without sharding)."""
    par = plan.parallel
    if par.sharding == "none":
        return 1, 1
    replicas = par.dp // par.shard_group
    edp = layout.edp or 1
    expert = edp // replicas if edp % replicas == 0 else edp
    return par.shard_group * par.cp, max(1, expert)


def layer_params_per_gpu(plan: Plan, layout: Layout, counts: ParamCounts, layer: int):
    """(dense, routed-expert) parameters one GPU holds of ``layer`` (memory.py's rule)."""
    model, t = plan.model, layout.tp
    sums = counts.layers([layer])
    kv_shards = min(t, model.kv_heads)
    sharded = sums.attention - sums.attention_kv + sums.dense_mlp + sums.shared_experts
    dense = sharded / t + sums.attention_kv / kv_shards + sums.norms + sums.router
    return dense, sums.routed_experts / (layout.etp * layout.ep)


def layer_units(
    plan: Plan,
    layout: Layout,
    counts: ParamCounts,
    layers,
    stage_params: tuple[float, float],
) -> list[LayerUnit]:
    """The per-layer units of a stage holding ``layers`` (0-based ids, any sequence) and
    ``stage_params`` = (dense,
    expert) parameters per GPU (module docstring)."""
    layers = [int(i) for i in layers]
    if not layers:
        return []
    per_layer = [layer_params_per_gpu(plan, layout, counts, i) for i in layers]
    other = max(0.0, stage_params[0] - sum(d for d, _ in per_layer)) / len(layers)
    return [LayerUnit(i, d + other, e) for i, (d, e) in zip(layers, per_layer, strict=True)]


def largest_unit(units: list[LayerUnit]) -> float:
    """Parameters of the largest unit (0 for a stage without layers)."""
    return max((u.params for u in units), default=0.0)


# GPU generations (calibration data files) from Blackwell on, where Megatron-LM no longer
# needs CUDA_DEVICE_MAX_CONNECTIONS=1 for tensor / context parallelism (validate_args:
# "requirement no longer exists since the Blackwell architecture").
BLACKWELL_GENERATIONS = ("b200", "b300", "gb200", "gb300")
CUDA_DEFAULT_CONNECTIONS = 8


def device_max_connections(plan: Plan) -> int:
    """The plan's ``parallel.device_max_connections``; default Megatron-LM's setting: 1 with
    TP or CP > 1 on a generation before Blackwell, else CUDA's default (8)."""
    par = plan.parallel
    if par.device_max_connections is not None:
        return par.device_max_connections
    generation = plan.hardware.calibration.generation.lower()
    model_parallel = par.tp > 1 or par.cp > 1
    if model_parallel and generation not in BLACKWELL_GENERATIONS:
        return 1
    return CUDA_DEFAULT_CONNECTIONS


def one_hardware_queue(plan: Plan) -> bool:
    """Whether all of a GPU's streams share one in-order hardware queue (module docstring)."""
    return device_max_connections(plan) == 1


def forward_prefetch(plan: Plan) -> bool:
    """Whether ZeRO-3's forward gathers the next layer while the current one computes
    (module docstring): with ``parallel.forward_prefetch`` (explicit prefetch), or without
    it through several hardware queues (implicit prefetch); not with one hardware queue."""
    return plan.parallel.forward_prefetch or not one_hardware_queue(plan)


def fair_share_delay_ms(alone_ms, backlog_ms):
    """Delay of each of two bandwidth-bound transfers that start together on one link and
    share it fairly: the one needing ``alone_ms`` on its own and one with ``backlog_ms`` of
    work left. The shorter finishes at ``2 min(d, r)``, the longer at ``d + r``: each ends
    ``min(d, r)`` later than alone (numpy arrays or floats; negative backlog counts as 0)."""
    return np.minimum(alone_ms, np.maximum(backlog_ms, 0.0))
