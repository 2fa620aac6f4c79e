"""Tokens routed per second: clustersim's sampled router against a vectorised numpy baseline.

Usage: python benchmarks/routing_bench.py [--tokens 1000000] [--repeat 3] [--skew 0.3]

For E in {8, 64, 256} and k in {1, 2, 8}, both route the same number of tokens with the same
popularity (``router_skew``) and count tokens per expert, dropless:

- clustersim: ``Router.route(mode="tokens")`` over an EP group of 8 ranks (T/8 tokens each):
  uniforms, the numba top-k sampler, counts per source rank and expert, the all-to-all matrix.
- baseline: explicit logits (T x E standard normal + log popularity), ``np.argpartition``
  top-k, ``np.bincount``; in chunks of 2^22 logits to bound memory.

Each is warmed up once, then timed ``--repeat`` times; the table shows medians. Extra rows
time the router with capacity and drops, with node-limited routing, and in its default
``mode="auto"``, which samples multinomial counts of k-subsets instead of tokens when cheaper.
Results go in BENCHMARKS.md ("Routing").
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from clustersim.routing import Router
from clustersim.routing.gating import expert_popularity
from clustersim.spec.schema import MoESpec

EP = 8
CHUNK_LOGITS = 1 << 22


def median_s(run: Callable[[], object], repeat: int) -> float:
    """Median wall time (s) of ``repeat`` calls after one warm-up call."""
    run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def numpy_baseline(popularity: np.ndarray, k: int, num_tokens: int, seed: int) -> np.ndarray:
    """Tokens per expert from explicit noisy logits and argpartition top-k."""
    rng = np.random.default_rng(seed)
    num_experts = popularity.size
    log_popularity = np.log(popularity)
    counts = np.zeros(num_experts, np.int64)
    chunk = max(1, CHUNK_LOGITS // num_experts)
    for lo in range(0, num_tokens, chunk):
        logits = rng.standard_normal((min(chunk, num_tokens - lo), num_experts)) + log_popularity
        top = np.argpartition(logits, num_experts - k, axis=1)[:, num_experts - k :]
        counts += np.bincount(top.ravel(), minlength=num_experts)
    return counts


def router_run(
    moe: MoESpec, num_tokens: int, gpus_per_node: int | None = None, mode: str = "tokens"
) -> Callable:
    """A closure routing ``num_tokens`` over EP ranks, a new micro-batch index per call."""
    router = Router(moe, EP, seed=0, gpus_per_node_in_ep=gpus_per_node, mode=mode)
    tokens = np.full(EP, num_tokens // EP)
    calls = iter(range(1_000_000))
    return lambda: router.route(0, next(calls), tokens)


def main() -> None:
    """Time every (E, k) pair and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skew", type=float, default=0.3)
    args = parser.parse_args()
    num_tokens = args.tokens // EP * EP
    print(f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(f"# T = {num_tokens} tokens, router_skew = {args.skew}, ep = {EP}, dropless")
    print("| E | k | clustersim (M tokens/s) | numpy baseline (M tokens/s) | ratio |")
    print("|---|---|---|---|---|")
    for num_experts in (8, 64, 256):
        popularity = expert_popularity(num_experts, args.skew, 0, 0)
        for k in (1, 2, 8):
            moe = MoESpec(num_experts=num_experts, top_k=k, router_skew=args.skew)
            ours = median_s(router_run(moe, num_tokens), args.repeat)
            base = median_s(partial(numpy_baseline, popularity, k, num_tokens, 0), args.repeat)
            ours_rate, base_rate = num_tokens / ours / 1e6, num_tokens / base / 1e6
            print(
                f"| {num_experts} | {k} | {ours_rate:.1f} | {base_rate:.2f} | "
                f"{ours_rate / base_rate:.0f}x |",
                flush=True,
            )
    print()
    print("| variant | E | k | clustersim (M tokens/s) |")
    print("|---|---|---|---|")
    variants = {
        "tokens, dropless": (64, {}, None, "tokens"),
        "tokens, capacity 1.25, drop policy probs": (64, {"capacity_factor": 1.25}, None, "tokens"),
        "tokens, capacity 1.25, drop policy position": (
            64,
            {"capacity_factor": 1.25, "drop_policy": "position"},
            None,
            "tokens",
        ),
        "tokens, node-limited, 2 of 4 nodes": (64, {"max_nodes_per_token": 2}, 2, "tokens"),
        "auto (counts), dropless": (64, {}, None, "auto"),
        "auto (counts), capacity 1.25": (64, {"capacity_factor": 1.25}, None, "auto"),
        "auto (counts), dropless, E = 8": (8, {}, None, "auto"),
    }
    for name, (num_experts, fields, gpus_per_node, mode) in variants.items():
        moe = MoESpec(num_experts=num_experts, top_k=2, router_skew=args.skew, **fields)
        seconds = median_s(router_run(moe, num_tokens, gpus_per_node, mode), args.repeat)
        print(f"| {name} | {num_experts} | 2 | {num_tokens / seconds / 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
