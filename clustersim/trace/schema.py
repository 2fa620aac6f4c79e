"""The trace format: one Arrow schema, its version, its row kinds and op names.

A trace is one Arrow IPC file (``.arrow``). Every row has the same columns; which of them mean
something depends on the row's ``kind`` (see ``docs/trace-format.md``):

* ``compute``, ``comm``, ``comm_async``: one event of a lane (a TP group of one pipeline stage
  and one data-parallel replica) between ``start_s`` and ``end_s``;
* ``workload``: the sequence lengths of one micro-batch of one replica (``values``);
* ``route``: the routing outcome of one EP group, layer and micro-batch, one row per quantity;
* ``summary``: whole-run figures written last (iteration end, pipeline end, per-GPU expert
  idle time, and the batch index that lets readers stream the file in time order; with
  ``hardware.topology`` also the shared links: ``NETWORK_OPS``);
* ``request``: the lifecycle of one served request (serving traces, ``mode: inference``):
  ``prefill`` (arrival to first token), ``decode`` (first token to finish), ``request_done``
  (arrival to finish, exact engine times in ms); ``request_arrival`` stays reserved;
* ``serving``: timed rows of a serving run that are no one request's lifecycle
  (``SERVING_TIMELINE_OPS``: KV-cache use of a replica over an engine round, KV transfers).

Time is float64 **seconds** from the start of the iteration. Within each record batch, event
rows are sorted by :func:`event_sort_key` (start, asynchronous first, then recording order).
Codes of ``kind`` and ``op`` are dictionary-encoded strings: readers map them by name, so new
ops can be appended without breaking older readers of the same version.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import numpy as np
import pyarrow as pa

VERSION = 3
"""Trace format version; a reader refuses files with a larger one. Version 2 added the
checksums (``META_CHECKSUM``, ``BATCH_CHECKSUM``); version 1 files are still read, without.
Version 3 added the shared-link rows (``NETWORK_OPS``, summary rows of runs with
``hardware.topology``); version 1 and 2 files are read as runs without them."""

META_VERSION = b"clustersim.trace.version"
META_PLAN = b"clustersim.plan"
META_SEED = b"clustersim.seed"
META_RUN = b"clustersim.run"
META_CHECKSUM = b"clustersim.checksum"
"""Schema metadata (v2): CRC-32 of the other metadata entries (:func:`metadata_checksum`)."""
BATCH_CHECKSUM = b"clustersim.crc32"
"""Custom metadata of every record batch (v2): the CRC-32 of each column of the batch
(:func:`column_checksum`), in ``COLUMNS`` order, as comma-separated hex."""

KINDS = ("compute", "comm", "comm_async", "workload", "route", "summary", "request", "serving")
EVENT_KINDS = ("compute", "comm", "comm_async")

ENGINE_OPS = (
    "attn_fwd", "attn_bwd", "mlp_fwd", "mlp_bwd", "expert_fwd", "expert_bwd", "logits_fwd",
    "logits_bwd", "optimizer", "tp_comm", "a2a_dispatch", "a2a_combine", "etp_comm", "p2p_send",
    "grad_reduce", "expert_grad_reduce", "param_gather", "recompute", "cp_comm",
)  # fmt: skip
WORKLOAD_OPS = ("seq_lens",)
ROUTE_OPS = ("member_tokens", "a2a_tokens", "received_tokens", "active_experts",
             "expert_tokens", "dropped_tokens", "routed_tokens")  # fmt: skip
SUMMARY_OPS = ("iteration", "pipeline", "expert_idle", "batch_index")
REQUEST_OPS = ("request_arrival", "prefill", "decode", "request_done")  # request_arrival: reserved
SERVING_SUMMARY_OPS = ("serving_run", "serving_engine", "serving_replica")  # appended in v1
SERVING_BATCH_OPS = ("serving_batches",)  # appended later in v1 (older traces lack it)
NETWORK_OPS = ("contention", "link", "link_busy")  # appended in v3 (summary rows)
"""``contention``: ``value`` = comm_contention_ms, ``values`` = per collective kind (the run
metadata's ``network.kinds``); ``link``: one per link that carried bytes, ``group`` = its index
in ``network.links``, ``bytes``, ``value`` = contention ms, ``values`` = [busy ms];
``link_busy``: a busy interval (``start_s``, ``end_s``) of one of the most used links."""
SERVING_TIMELINE_OPS = ("kv_usage", "kv_transfer")  # appended in v3 (kind ``serving``)
"""``kv_usage``: the KV-cache blocks a replica holds over one engine round (a segment of
:mod:`clustersim.engine.serving.kv_usage`); ``kv_transfer``: one request's KV cache crossing
from a prefill to a decode replica (disaggregated runs). Older traces lack both."""
OPS = (
    ENGINE_OPS
    + WORKLOAD_OPS
    + ROUTE_OPS
    + SUMMARY_OPS
    + REQUEST_OPS
    + SERVING_SUMMARY_OPS
    + SERVING_BATCH_OPS
    + NETWORK_OPS
    + SERVING_TIMELINE_OPS
)

KIND_CODE = {name: i for i, name in enumerate(KINDS)}
OP_CODE = {name: i for i, name in enumerate(OPS)}

KIND_TYPE = pa.dictionary(pa.int8(), pa.string())
OP_TYPE = pa.dictionary(pa.int8(), pa.string())
KIND_DICTIONARY = pa.array(KINDS, pa.string())
OP_DICTIONARY = pa.array(OPS, pa.string())

FIELDS = (
    pa.field("kind", KIND_TYPE, nullable=False),
    pa.field("op", OP_TYPE, nullable=False),
    pa.field("lane", pa.int32(), nullable=False),
    pa.field("gpu", pa.int32(), nullable=False),
    pa.field("group", pa.int32(), nullable=False),
    pa.field("replica", pa.int32(), nullable=False),
    pa.field("layer", pa.int32(), nullable=False),
    pa.field("microbatch", pa.int32(), nullable=False),
    pa.field("start_s", pa.float64()),
    pa.field("end_s", pa.float64()),
    pa.field("bytes", pa.float64(), nullable=False),
    pa.field("value", pa.float64()),
    pa.field("values", pa.list_(pa.float64())),
)
COLUMNS = tuple(f.name for f in FIELDS)
INT_COLUMNS = ("lane", "gpu", "group", "replica", "layer", "microbatch")


def event_sort_key(start_s: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """uint64 keys that order event rows by ``start_s``, asynchronous communication first at
    equal starts (start times are >= 0). Every event batch of a trace is sorted by this key."""
    bits = np.ascontiguousarray(start_s, dtype=np.float64).view(np.uint64)
    return (bits << np.uint64(1)) | (kind != KIND_CODE["comm_async"]).astype(np.uint64)


def metadata_checksum(metadata: dict[bytes, bytes]) -> bytes:
    """CRC-32 (8 hex digits) of every metadata entry but ``META_CHECKSUM``, in key order."""
    crc = 0
    for key in sorted(k for k in metadata if k != META_CHECKSUM):
        crc = zlib.crc32(b"%d:%s%d:%s" % (len(key), key, len(metadata[key]), metadata[key]), crc)
    return b"%08x" % crc


def column_checksum(array: pa.Array) -> int:
    """CRC-32 of a column's content as a reader sees it: type, length, null count, validity,
    values (the data of all-null columns is not used and not covered), list offsets relative
    to the first, and dictionary words. Equal for a batch before writing and after reading."""
    header = f"{array.type}|{len(array)}|{array.null_count}".encode()
    return _content_crc(array, zlib.crc32(header))


def _content_crc(array: pa.Array, crc: int) -> int:
    n = len(array)
    if n == 0 or array.null_count == n:
        return crc
    if array.null_count:
        crc = zlib.crc32(array.is_null().to_numpy(zero_copy_only=False).tobytes(), crc)
    if pa.types.is_dictionary(array.type):
        crc = _content_crc(array.indices, crc)
        return zlib.crc32(b"%08x" % column_checksum(array.dictionary), crc)
    if pa.types.is_string(array.type) or pa.types.is_binary(array.type):
        _, offsets_buffer, data = array.buffers()
        offsets = np.frombuffer(offsets_buffer, np.int32)[array.offset : array.offset + n + 1]
        crc = zlib.crc32((offsets - offsets[0]).tobytes(), crc)
        return zlib.crc32(memoryview(data)[offsets[0] : offsets[-1]], crc) if data else crc
    if pa.types.is_list(array.type):
        offsets = array.offsets.to_numpy()
        crc = zlib.crc32((offsets - offsets[0]).astype(np.int32).tobytes(), crc)
        values = array.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        return zlib.crc32(b"%08x" % column_checksum(values), crc)
    width = array.type.bit_width // 8
    data = array.buffers()[1]
    if data is None or width == 0:
        raise TypeError(f"no checksum for arrays of type {array.type}")
    return zlib.crc32(memoryview(data)[array.offset * width : (array.offset + n) * width], crc)


def batch_checksums(batch: pa.RecordBatch) -> bytes:
    """``BATCH_CHECKSUM`` of a record batch of the trace schema."""
    return b",".join(b"%08x" % column_checksum(c) for c in batch.columns)


def schema(metadata: dict[bytes, bytes] | None = None) -> pa.Schema:
    """The trace schema, with ``metadata`` attached."""
    return pa.schema(FIELDS, metadata=metadata)


def encode_metadata(plan: dict[str, Any], seed: int, run: dict[str, Any]) -> dict[bytes, bytes]:
    """Schema metadata: format version, the resolved plan (JSON), the seed, run facts (JSON)
    (the writer adds ``META_CHECKSUM``)."""
    return {
        META_VERSION: str(VERSION).encode(),
        META_PLAN: json.dumps(plan, sort_keys=True).encode(),
        META_SEED: str(seed).encode(),
        META_RUN: json.dumps(run, sort_keys=True).encode(),
    }
