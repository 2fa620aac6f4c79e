"""A small decode batch reads the weights of the experts its tokens touch, no more: with E
experts, top-k routing without skew and B tokens, E (1 - (1 - k/E)^B) distinct experts on
average (each expert is missed by a token with probability 1 - k/E, independently)."""

from __future__ import annotations

import numpy as np
import pytest

from clustersim.routing.router import Router
from clustersim.spec.schema import MoESpec

DRAWS = 200


@pytest.mark.parametrize(("experts", "top_k"), [(64, 6), (8, 2), (160, 6)])
@pytest.mark.parametrize("tokens", [1, 2, 5, 16, 64])
def test_distinct_experts_touched_by_a_decode_batch(experts, top_k, tokens):
    moe = MoESpec(num_experts=experts, top_k=top_k, router_skew=0.0)
    router = Router(moe, 1, seed=7)
    touched = np.array(
        [
            np.count_nonzero(router.route(0, d, np.array([tokens])).tokens_per_expert)
            for d in range(DRAWS)
        ]
    )
    want = experts * (1 - (1 - top_k / experts) ** tokens)
    # mean of DRAWS draws within 4 standard errors (a draw's count varies by at most E)
    spread = max(float(touched.std()), 0.5)
    assert abs(touched.mean() - want) <= 4 * spread / np.sqrt(DRAWS)
    assert touched.min() >= min(top_k, experts) and touched.max() <= min(experts, tokens * top_k)
