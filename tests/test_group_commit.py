"""GroupCommit: batching, ordering, errors, hand-over of the lead, and cancellation."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from shared.store.group_commit import GroupCommit


class Writer:
    """A write that records its batches; when gated, batch ``n`` waits for ``release(n)``."""

    def __init__(self, *, gated: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.gated = gated
        self.gates: defaultdict[int, trio.Event] = defaultdict(trio.Event)
        self.fail_on: set[int] = set()

    def release(self, n: int) -> None:
        self.gates[n].set()

    async def __call__(self, items: Sequence[int]) -> list[int]:
        n = len(self.batches)
        self.batches.append(list(items))
        if self.gated:
            await self.gates[n].wait()
        if self.fail_on & set(items):
            raise RuntimeError(f"write failed for {sorted(self.fail_on & set(items))}")
        return [item * 10 for item in items]


settle = trio.testing.wait_all_tasks_blocked


async def submit_within(
    scope: trio.CancelScope, commit: GroupCommit[int, int], item: int, out: dict[int, object]
) -> None:
    """Submit ``item`` inside ``scope`` (which the test cancels); record a result if any."""
    with scope:
        out[item] = await commit.submit(item)


async def start_in_order(
    nursery: trio.Nursery, commit: GroupCommit[int, int], items: range, out: dict[int, object]
) -> None:
    """Submit ``items`` one after the other (each is queued before the next starts)."""
    for item in items:
        nursery.start_soon(submit_into, commit, item, out)
        await settle()


async def submit_into(commit: GroupCommit[int, int], item: int, out: dict[int, object]) -> None:
    try:
        out[item] = await commit.submit(item)
    except RuntimeError as exc:
        out[item] = exc


async def test_a_lone_submit_is_written_at_once() -> None:
    writer = Writer()
    commit: GroupCommit[int, int] = GroupCommit(writer)
    assert await commit.submit(1) == 10
    assert await commit.submit(2) == 20
    assert writer.batches == [[1], [2]]
    assert commit.waiting == 0


async def test_items_arriving_during_a_write_share_the_next_one_in_order() -> None:
    writer = Writer(gated=True)
    commit: GroupCommit[int, int] = GroupCommit(writer)
    out: dict[int, object] = {}
    async with trio.open_nursery() as nursery:
        await start_in_order(nursery, commit, range(6), out)
        assert commit.waiting == 5
        writer.release(0)
        await settle()
        writer.release(1)
    assert writer.batches == [[0], [1, 2, 3, 4, 5]]
    assert out == {i: i * 10 for i in range(6)}


async def test_max_batch_bounds_each_write() -> None:
    writer = Writer(gated=True)
    commit: GroupCommit[int, int] = GroupCommit(writer, max_batch=2)
    out: dict[int, object] = {}
    async with trio.open_nursery() as nursery:
        await start_in_order(nursery, commit, range(6), out)
        for n in range(4):
            writer.release(n)
            await settle()
    assert writer.batches == [[0], [1, 2], [3, 4], [5]]
    assert out == {i: i * 10 for i in range(6)}


async def test_the_leader_returns_once_its_own_item_is_written() -> None:
    """Under sustained load the first caller is not kept serving the others."""
    writer = Writer(gated=True)
    commit: GroupCommit[int, int] = GroupCommit(writer)
    out: dict[int, object] = {}
    async with trio.open_nursery() as nursery:
        await start_in_order(nursery, commit, range(2), out)
        writer.release(0)  # batch [0] done; caller 1 now leads batch [1]
        await settle()
        assert writer.batches == [[0], [1]]
        assert out == {0: 0}  # returned while the next batch is still being written
        writer.release(1)
    assert out == {0: 0, 1: 10}


async def test_a_failed_write_fails_its_batch_only() -> None:
    writer = Writer(gated=True)
    writer.fail_on = {2}
    commit: GroupCommit[int, int] = GroupCommit(writer)
    out: dict[int, object] = {}
    async with trio.open_nursery() as nursery:
        await start_in_order(nursery, commit, range(3), out)
        writer.release(0)
        await settle()
        writer.release(1)
    assert out[0] == 0
    assert isinstance(out[1], RuntimeError) and isinstance(out[2], RuntimeError)
    writer.gated = False
    assert await commit.submit(3) == 30  # the next write works


async def test_a_write_returning_the_wrong_count_fails_its_callers() -> None:
    async def short(items: Sequence[int]) -> list[int]:
        return []

    commit: GroupCommit[int, int] = GroupCommit(short)
    with pytest.raises(ValueError, match="0 results for 1 items"):
        await commit.submit(1)


async def test_a_cancelled_waiter_is_withdrawn_before_its_write() -> None:
    writer = Writer(gated=True)
    commit: GroupCommit[int, int] = GroupCommit(writer)
    out: dict[int, object] = {}
    async with trio.open_nursery() as nursery:
        await start_in_order(nursery, commit, range(1), out)
        scope = trio.CancelScope()
        nursery.start_soon(submit_within, scope, commit, 1, out)
        await settle()
        await start_in_order(nursery, commit, range(2, 3), out)
        scope.cancel()
        await settle()
        assert commit.waiting == 1
        writer.release(0)
        await settle()
        writer.release(1)
    assert writer.batches == [[0], [2]]
    assert out == {0: 0, 2: 20}


async def test_a_cancelled_leader_finishes_its_write_and_others_get_results() -> None:
    writer = Writer(gated=True)
    commit: GroupCommit[int, int] = GroupCommit(writer)
    out: dict[int, object] = {}
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()
        nursery.start_soon(submit_within, scope, commit, 0, out)
        await settle()
        await start_in_order(nursery, commit, range(1, 2), out)
        scope.cancel()  # the write in progress is shielded: it completes
        await settle()
        assert writer.batches == [[0]]
        writer.release(0)
        await settle()
        writer.release(1)
    assert writer.batches == [[0], [1]]
    # The leader's own write completed, so it gets its result despite the cancel.
    assert out == {0: 0, 1: 10}


async def test_a_promoted_caller_cancelled_passes_the_lead_on() -> None:
    writer = Writer(gated=True)
    commit: GroupCommit[int, int] = GroupCommit(writer)
    out: dict[int, object] = {}
    async with trio.open_nursery() as nursery:
        await start_in_order(nursery, commit, range(1), out)
        scope = trio.CancelScope()
        nursery.start_soon(submit_within, scope, commit, 1, out)
        await settle()
        await start_in_order(nursery, commit, range(2, 3), out)
        # Batch [0] ends and caller 1 is made leader; it is cancelled before it leads.
        writer.release(0)
        scope.cancel()
        await settle()
        writer.release(1)
    assert writer.batches == [[0], [2]]
    assert out == {0: 0, 2: 20}


def test_max_batch_must_be_positive() -> None:
    async def write(items: Sequence[int]) -> list[int]:
        return list(items)

    with pytest.raises(ValueError, match="at least 1"):
        GroupCommit(write, max_batch=0)
