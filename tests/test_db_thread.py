"""The long-lived database thread (shared/store/db_thread.py): order, outcomes, cancellation,
shutdown. Real threads; every wait is on a condition with a deadline."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from shared.store.db import DatabaseError
from shared.store.db_thread import DbThread

DEADLINE = 10.0


class Fatal(BaseException):
    """Not an Exception: like KeyboardInterrupt, it must still reach the caller only."""


@asynccontextmanager
async def running(name: str = "test") -> AsyncIterator[tuple[DbThread, trio.Nursery]]:
    db = DbThread(name)
    async with trio.open_nursery() as nursery:
        await nursery.start(db.run)
        yield db, nursery
        await db.aclose()


def gate() -> tuple[threading.Event, threading.Event, Callable[[], str]]:
    """A call that blocks the worker: ``entered`` is set when it runs, it ends on ``release``."""
    entered, release = threading.Event(), threading.Event()

    def blocked() -> str:
        entered.set()
        assert release.wait(DEADLINE)
        return "released"

    return entered, release, blocked


async def wait_for(event: threading.Event) -> None:
    assert await trio.to_thread.run_sync(event.wait, DEADLINE)


async def test_calls_run_in_one_thread_in_submission_order() -> None:
    done: list[int] = []
    threads: set[int] = set()

    def work(n: int) -> int:
        threads.add(threading.get_ident())
        done.append(n)
        return n * n

    async with running() as (db, nursery):
        entered, release, blocked = gate()
        results: dict[int, int] = {}

        async def submit(n: int) -> None:
            results[n] = await db.call(work, n)

        nursery.start_soon(db.call, blocked)
        await wait_for(entered)
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as submitters:
                for n in range(20):
                    submitters.start_soon(submit, n)
                    await trio.testing.wait_all_tasks_blocked()  # submitted in this order
                assert db.waiting == 20
                release.set()
    assert done == list(range(20))
    assert results == {n: n * n for n in range(20)}
    assert len(threads) == 1 and threading.get_ident() not in threads


async def test_exceptions_reach_the_caller_with_their_type_and_the_thread_goes_on() -> None:
    def fail(exc: BaseException) -> None:
        raise exc

    async with running() as (db, _):
        with pytest.raises(ValueError, match="bad"):
            await db.call(fail, ValueError("bad"))
        with pytest.raises(Fatal):
            await db.call(fail, Fatal())
        with pytest.raises(SystemExit):
            await db.call(fail, SystemExit(3))
        with pytest.raises(KeyboardInterrupt):
            await db.call(fail, KeyboardInterrupt())
        assert await db.call(lambda: "still here") == "still here"


async def test_a_cancelled_waiting_caller_is_withdrawn_and_its_call_never_runs() -> None:
    ran: list[str] = []
    async with running() as (db, nursery):
        entered, release, blocked = gate()
        nursery.start_soon(db.call, blocked)
        await wait_for(entered)
        scope = trio.CancelScope()

        async def withdrawn() -> None:
            with scope:
                await db.call(ran.append, "withdrawn")

        nursery.start_soon(withdrawn)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(db.call, ran.append, "after")
        await trio.testing.wait_all_tasks_blocked()
        assert db.waiting == 2
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        release.set()
        assert await db.call(lambda: "last") == "last"
    assert ran == ["after"]


async def test_a_started_call_is_finished_and_its_caller_gets_the_result() -> None:
    async with running() as (db, _):
        entered, release, blocked = gate()
        got: list[str] = []
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:

                async def caller() -> None:
                    got.append(await db.call(blocked))

                inner.start_soon(caller)
                await wait_for(entered)
                scope.cancel()  # the call is running: the caller waits for its outcome
                release.set()
        assert got == ["released"]


async def test_shutdown_finishes_the_queued_calls_then_refuses_new_ones() -> None:
    done: list[int] = []
    db = DbThread("stop")
    with pytest.raises(DatabaseError, match="not running"):
        await db.call(done.append, 0)  # not started yet
    results: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(db.run)
        entered, release, blocked = gate()
        nursery.start_soon(db.call, blocked)
        await wait_for(entered)

        async def submit(n: int) -> None:
            await db.call(done.append, n)
            results.append(n)

        for n in range(1, 4):
            nursery.start_soon(submit, n)
            await trio.testing.wait_all_tasks_blocked()
        closing = trio.Event()

        async def close() -> None:
            await db.aclose()
            closing.set()

        nursery.start_soon(close)
        await trio.testing.wait_all_tasks_blocked()
        assert not db.running and not closing.is_set()
        with pytest.raises(DatabaseError, match="not running"):
            await db.call(done.append, 99)
        release.set()
        await closing.wait()
    assert done == [1, 2, 3] and len(results) == 3


async def test_cancelling_the_run_task_still_finishes_the_call_in_progress() -> None:
    db = DbThread("cancelled")
    entered, release, blocked = gate()
    got: list[str] = []
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(db.run)

            async def caller() -> None:
                got.append(await db.call(blocked))

            nursery.start_soon(caller)
            await wait_for(entered)
            scope.cancel()
            release.set()  # no checkpoint in between: this task is cancelled from here on
    assert got == ["released"]
    assert not db.running


async def test_calls_see_the_callers_context() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    async with running() as (db, _):
        var.set("caller's")
        assert await db.call(var.get) == "caller's"


async def test_a_thread_runs_once() -> None:
    async with running() as (db, _):
        with pytest.raises(RuntimeError, match="started already"):
            await db.run()


async def test_at_exit_runs_in_the_thread_after_the_last_call() -> None:
    order: list[tuple[str, int]] = []

    def boom() -> None:
        raise RuntimeError("ignored")

    db = DbThread("exit")
    db.at_exit(boom)  # its failure does not stop the others
    db.at_exit(lambda: order.append(("exit", threading.get_ident())))
    async with trio.open_nursery() as nursery:
        await nursery.start(db.run)
        await db.call(lambda: order.append(("call", threading.get_ident())))
        assert [what for what, _ in order] == ["call"]
        await db.aclose()
    assert [what for what, _ in order] == ["call", "exit"]
    assert order[0][1] == order[1][1] != threading.get_ident()
