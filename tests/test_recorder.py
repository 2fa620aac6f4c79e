"""The engine's row buffer: single rows and blocks of rows, in recording order."""

from __future__ import annotations

import numpy as np

from clustersim.engine.recorder import Kind, Op, Recorder


def test_blocks_and_rows_keep_recording_order_and_values():
    chunks = []
    rec = Recorder(world_size=4, chunk_rows=4, sink=chunks.append)  # small chunks: several freezes
    rec.add(0, Kind.COMPUTE, Op.ATTN_FWD, 0.0, 1.0, 3, 7)
    lanes = np.array([1, 2, 3], dtype=np.int32)
    rec.add_block(
        lanes,
        Kind.COMM,
        Op.A2A_DISPATCH,
        np.array([1.0, 1.5, 2.0]),
        np.full(3, 2.5),
        3,
        7,
        np.array([10.0, 20.0, 30.0]),
    )
    rec.add(2, Kind.COMM_ASYNC, Op.GRAD_REDUCE, 4.0, 6.0, nbytes=5.0)
    rec.add_block(lanes, Kind.COMPUTE, Op.EXPERT_FWD, np.zeros(3), np.ones(3), 4, 0)
    assert rec.size == 8
    cols = rec.columns()
    assert cols["lane"].tolist() == [0, 1, 2, 3, 2, 1, 2, 3]
    assert (
        cols["op"].tolist()
        == [Op.ATTN_FWD] + [Op.A2A_DISPATCH] * 3 + [Op.GRAD_REDUCE] + [Op.EXPERT_FWD] * 3
    )
    assert cols["kind"].tolist() == [0, 1, 1, 1, 2, 0, 0, 0]
    assert cols["start_ms"].tolist() == [0.0, 1.0, 1.5, 2.0, 4.0, 0.0, 0.0, 0.0]
    assert cols["end_ms"].tolist() == [1.0, 2.5, 2.5, 2.5, 6.0, 1.0, 1.0, 1.0]
    assert cols["layer"].tolist() == [3, 3, 3, 3, -1, 4, 4, 4]
    assert cols["microbatch"].tolist() == [7, 7, 7, 7, -1, 0, 0, 0]
    assert cols["bytes"].tolist() == [0.0, 10.0, 20.0, 30.0, 5.0, 0.0, 0.0, 0.0]
    # the sink saw every row once, in the same order
    seen = np.concatenate([c["start_ms"] for c in chunks])
    assert seen.tolist() == cols["start_ms"].tolist()
    assert {name: col.dtype for name, col in cols.items()} == {
        "lane": np.int32,
        "kind": np.int8,
        "op": np.int16,
        "start_ms": np.float64,
        "end_ms": np.float64,
        "layer": np.int32,
        "microbatch": np.int32,
        "bytes": np.float64,
    }


def test_empty_recorder_has_typed_empty_columns():
    cols = Recorder(world_size=1).columns()
    assert all(len(c) == 0 for c in cols.values())
    assert cols["start_ms"].dtype == np.float64
