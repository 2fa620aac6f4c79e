"""The training workload: sequence lengths of every micro-batch of every data-parallel replica."""

from __future__ import annotations

import numpy as np

from clustersim.spec.schema import Plan


def microbatch_lengths(plan: Plan, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """``lengths[d][i]``: the sequence lengths of micro-batch ``i`` of replica ``d``.

    Each micro-batch holds ``micro_batch_size`` sequences drawn from ``workload.seq_len``.
    """
    par, spec = plan.parallel, plan.workload.seq_len
    count = par.dp * par.num_microbatches * par.micro_batch_size
    if spec.dist == "fixed":
        flat = np.full(count, spec.value, dtype=np.int64)
    else:
        from clustersim.routing.lengths import sample_lengths

        flat = sample_lengths(spec, count, rng)
    shaped = flat.reshape(par.dp, par.num_microbatches, par.micro_batch_size)
    return [list(replica) for replica in shaped]
