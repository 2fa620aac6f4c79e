"""The replica scheduler's bookkeeping: batching, chunked prefill, KV blocks, preemption."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from clustersim.engine.serving.scheduler import ReplicaScheduler, RequestBook


def make(prompts, outputs, blocks=1000, block_size=16, seqs=64, budget=8192, chunked=True):
    book = RequestBook(np.array(prompts), np.array(outputs))
    sched = ReplicaScheduler(book, blocks, block_size, seqs, budget, chunked)
    for rid in range(len(prompts)):
        sched.add(rid)
    return book, sched


def drain(sched, runs=True, limit=10_000):
    """Step until idle; returns the log of (ids, new tokens) per step and the step count."""
    log, clock = [], 0
    while (step := sched.schedule()) is not None:
        k = sched.run_length(step, limit) if runs else 1
        clock += k
        log.append((list(step.ids), list(step.new_tokens), k))
        sched.commit(step, k, float(clock))
    return log, clock


def test_one_request_prefill_then_one_run_of_decodes():
    book, sched = make([100], [5])
    log, clock = drain(sched)
    assert log == [([0], [100], 1), ([0], [1], 4)]
    assert book.first_token_ms == [1.0] and book.finish_ms == [5.0]
    assert sched.free_blocks == sched.num_blocks and book.blocks == [0]


def test_chunked_prefill_splits_a_long_prompt_over_the_budget():
    book, sched = make([10, 3], [2, 2], budget=4)
    log, _ = drain(sched, runs=False)
    # step 1: chunk of 4 of request 0; step 2: 4 more; step 3: the last 2 of request 0 and
    # 2 of request 1 (budget 4); step 4: request 0 decodes, request 1's last prompt token
    assert log[:4] == [([0], [4], 1), ([0], [4], 1), ([0, 1], [2, 2], 1), ([0, 1], [1, 1], 1)]
    assert book.first_token_ms == [3.0, 4.0]


def test_without_chunking_prefill_steps_take_priority():
    book, sched = make([8, 8], [3, 3], budget=8, chunked=False)
    sched.waiting.pop()  # request 1 arrives later
    log = []
    step = sched.schedule()
    sched.commit(step, 1, 1.0)
    log.append(step.ids)
    sched.add(1)
    step = sched.schedule()  # a prefill-only step: request 0 does not decode
    sched.commit(step, 1, 2.0)
    log.append((step.ids, step.new_tokens))
    assert log == [[0], ([1], [8])]
    assert book.generated == [1, 1]


def test_last_prompt_token_is_not_a_decode():
    """A prompt's last token alone (q = 1) yields the first token: no run may skip it."""
    book, sched = make([1, 8], [1, 2], budget=8)
    log, _ = drain(sched)
    assert log == [([0, 1], [1, 7], 1), ([1], [1], 1), ([1], [1], 1)]
    assert book.first_token_ms == [1.0, 2.0] and book.finish_ms == [1.0, 3.0]


def test_max_batch_size_bounds_the_running_requests():
    _, sched = make([4] * 5, [3] * 5, seqs=2)
    step = sched.schedule()
    assert step.ids == [0, 1] and len(sched.waiting) == 3


def test_decode_run_stops_at_the_first_completion():
    _, sched = make([16, 16], [10, 4])
    step = sched.schedule()
    sched.commit(step, 1, 1.0)
    step = sched.schedule()
    assert step.decode_only and sched.run_length(step, 1000) == 3  # request 1 has 3 left


def test_decode_run_stops_where_the_cache_runs_out():
    # 2 requests of 16-token prompts, blocks of 4: 4 blocks each after the prefill, 2 free
    book, sched = make([16, 16], [50, 50], blocks=10, block_size=4)
    step = sched.schedule()
    sched.commit(step, 1, 1.0)
    assert sched.free_blocks == 2
    step = sched.schedule()  # first decode: both need a 5th block
    assert sched.free_blocks == 0
    k = sched.run_length(step, 1000)
    assert k == 4  # tokens 17..20 fit in the 5th block; token 21 needs a 6th
    sched.commit(step, k, 5.0)
    assert book.computed == [20, 20]
    step = sched.schedule()  # no block left: the latest request is preempted
    assert step.preempted == 1 and step.ids == [0]
    assert book.computed[1] == 0 and list(sched.waiting) == [1]


def test_preempted_request_recomputes_prompt_and_generated_tokens():
    book, sched = make([16, 16], [20, 20], blocks=10, block_size=4)
    log, _ = drain(sched)
    readmitted = [new[ids.index(1)] for ids, new, _ in log[2:] if 1 in ids]
    assert readmitted[0] == 16 + 5  # the prompt and the 5 tokens it had generated
    assert book.preemptions == [0, 1] and book.generated == [20, 20]


@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(st.integers(1, 200), min_size=1, max_size=12),
    outputs=st.data(),
    blocks=st.integers(20, 80),
    budget=st.integers(8, 300),
    seqs=st.integers(1, 6),
    chunked=st.booleans(),
)
def test_runs_equal_single_steps_and_tokens_are_conserved(
    prompts, outputs, blocks, budget, seqs, chunked
):
    outs = outputs.draw(st.lists(st.integers(1, 60), min_size=len(prompts), max_size=len(prompts)))
    block_size = 4
    fits = [p + o - 1 <= blocks * block_size for p, o in zip(prompts, outs, strict=True)]
    prompts = [p for p, ok in zip(prompts, fits, strict=True) if ok] or [1]
    outs = [o for o, ok in zip(outs, fits, strict=True) if ok] or [1]
    if not chunked:
        budget = max(budget, max(prompts) + max(outs))
    results = []
    for runs in (True, False):
        book, sched = make(prompts, outs, blocks, block_size, seqs, budget, chunked)
        _, clock = drain(sched, runs=runs)
        assert book.generated == outs  # every output token exactly once
        assert sched.free_blocks == blocks and not sched.running and not sched.waiting
        results.append((clock, book.first_token_ms, book.finish_ms, book.preemptions))
    assert results[0] == results[1]
