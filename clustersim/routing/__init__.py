"""Token routing to experts: sequence lengths, sampled top-k gating, capacity, dispatch counts.

The engine calls :class:`Router` once per (layer, micro-batch); :mod:`.gating` documents the
popularity law, :mod:`.kernels` the per-token sampler (numba, imported only when routing
runs), :mod:`.subsets` the equivalent count-level sampler, :mod:`.inclusion`,
:mod:`.projected` and :mod:`.node_limited` the count-level samplers for many experts,
:mod:`.dispatch` the validating kernel wrappers, :mod:`.lengths` the sequence-length
distributions and micro-batch packing.
"""

from clustersim.routing.lengths import pack_microbatches, sample_lengths
from clustersim.routing.metrics import dropped_tokens_pct, load_balance_pct, max_to_mean_load
from clustersim.routing.router import Router, RoutingOutcome, uniform_outcome

__all__ = [
    "Router",
    "RoutingOutcome",
    "dropped_tokens_pct",
    "load_balance_pct",
    "max_to_mean_load",
    "pack_microbatches",
    "sample_lengths",
    "uniform_outcome",
]
