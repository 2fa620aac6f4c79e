"""The overlapped parameter all-gather of the distributed optimizer (ZeRO-1/2), as
Megatron-Core runs it (``overlap_param_gather``; ``distributed/param_and_grad_buffer.py``
and ``distributed_data_parallel.py`` of core_v0.12.0, the release of the MoE Parallel Folding
runs).

After the optimizer step every DP rank holds only its shard of the updated parameters. The
next iteration gathers them bucket by bucket: the forward pre-hook of the first module of a
bucket dispatches that bucket's all-gather if it is not yet in flight and waits for it
(``finish_param_sync``), then dispatches the next bucket's. The gathers therefore run back to
back on the communication stream from the first forward of the chunk on, and a layer's first
forward waits until the bucket holding its weights has arrived: the first bucket is always
exposed, and the rest are exposed where the chain of gathers is slower than the forward.

Buckets are the gradient buckets (the same buffers), formed in backward order (last layer
first). Megatron-Core buckets only the first model chunk of the first pipeline stage: a stage
with ``pp_rank > 0`` and every model chunk after the first hold one bucket each
(``bucket_size = None``, ``disable_bucketing``), so their whole gather is waited for at their
first forward. Under the interleaved schedule (``align_param_gather``) the schedule dispatches
the first two chunks' gathers when it starts and chunk k+1's when chunk k runs its first
micro-batch; without interleaving the pre-hook dispatches them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def forward_buckets(
    layer_bytes: Sequence[tuple[int, float, float]], threshold_bytes: float, bucketed: bool
) -> list[list[int]]:
    """The gradient (= gather) buckets of a model chunk, in forward order.

    ``layer_bytes``: (layer, dense bytes, expert bytes) in forward order. Walking the layers
    backward, a bucket closes once it holds at least ``threshold_bytes`` (dense and expert
    together, as the engine's gradient buckets); the rest form the last bucket (the chunk's
    first layers). ``bucketed`` False: the whole chunk is one bucket."""
    layers = [layer for layer, _, _ in layer_bytes]
    if not bucketed or not layers:
        return [layers] if layers else []
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0.0
    for layer, dense, expert in reversed(layer_bytes):
        current.append(layer)
        size += dense + expert
        if size >= threshold_bytes:
            buckets.append(current[::-1])
            current, size = [], 0.0
    if current:
        buckets.append(current[::-1])
    return buckets[::-1]


@dataclass
class GatherBucket:
    """One dispatched bucket gather of a cohort: per lane its start and end (moved on in
    place while all-to-alls share its NICs), the bytes one GPU gathers, and whether its
    rows are recorded (when its first layer's forward reaches it: :func:`split_at`)."""

    start_ms: np.ndarray
    end_ms: np.ndarray
    nbytes: float
    recorded: bool = False

    def push(self, after_ms: np.ndarray, delay_ms: np.ndarray) -> None:
        """Delay the gather by ``delay_ms`` where it was still running at ``after_ms``
        (per lane): its end moves, and its start too if it had not started."""
        self.start_ms = np.where(self.start_ms > after_ms, self.start_ms + delay_ms, self.start_ms)
        self.end_ms = np.where(self.end_ms > after_ms, self.end_ms + delay_ms, self.end_ms)


def split_at(bucket: GatherBucket, wait_from_ms: np.ndarray) -> np.ndarray:
    """Where a bucket's gather stops being hidden: the lanes reach the layer at
    ``wait_from_ms``; before it the gather ran under earlier work (asynchronous), from it to
    the gather's end the layer waits (exposed). Clipped to the gather's span."""
    return np.clip(wait_from_ms, bucket.start_ms, bucket.end_ms)
