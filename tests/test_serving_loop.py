"""The serving event loop's order (engine/serving/loop.py), on hand-built cases."""

from clustersim.engine.serving.loop import URGENT, EventLoop


def test_entries_run_by_time_then_priority_then_order():
    loop, seen = EventLoop(), []
    loop.call_later(2.0, lambda: seen.append("b"))
    loop.call_later(1.0, lambda: seen.append("a"))
    loop.call_later(2.0, lambda: seen.append("c"))
    loop.call_later(2.0, lambda: seen.append("urgent"), URGENT)
    loop.run()
    assert seen == ["a", "urgent", "b", "c"]
    assert loop.now == 2.0


def test_advance_if_next_moves_time_only_when_nothing_is_due_by_then():
    loop = EventLoop()
    assert loop.advance_if_next(3.0)  # empty: the entry would be the next one
    assert loop.now == 3.0
    loop.call_later(2.0, lambda: None)  # due at 5.0
    assert loop.advance_if_next(1.5)  # 4.5 < 5.0
    assert loop.now == 4.5
    assert not loop.advance_if_next(0.5)  # 5.0: the entry already due then runs first
    assert not loop.advance_if_next(1.0)
    assert loop.now == 4.5


def test_advance_if_next_uses_the_heaps_sum():
    """The time it moves to is ``now + delay``, as an entry's due time would be."""
    loop = EventLoop()
    loop.now = 0.1
    assert loop.advance_if_next(0.2)
    assert loop.now == 0.1 + 0.2  # 0.30000000000000004, not 0.3
