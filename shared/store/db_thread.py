"""One long-lived worker thread that runs a service's synchronous database calls.

``trio.to_thread.run_sync`` hands every call to a thread from trio's cache and wakes the
trio loop through a fresh channel each time; on a path that makes a database call per
batch of payments that hand-off is a visible share of the CPU. :class:`DbThread` keeps one
thread for the life of the service instead: calls are queued, run one at a time in the
order they were submitted, and each result is handed back to the waiting trio task through
the loop's token. A database connection can then stay with that thread for good.

Semantics (the same as ``trio.to_thread.run_sync`` without ``abandon_on_cancel``):

* A caller cancelled while its call is still queued is withdrawn: the call never runs.
* A call that has started is finished; its caller cannot be cancelled out of the wait and
  gets the call's outcome (the cancellation takes effect at its next checkpoint), so a
  caller never loses a result the database has already committed.
* Whatever the call raises, ``BaseException`` included (``KeyboardInterrupt``,
  ``SystemExit``...), is re-raised in the caller with its type; the thread goes on.
* The calls run in a copy of the caller's :mod:`contextvars` context.

Lifecycle (structured): :meth:`DbThread.run` is a task of the owner's nursery. It starts the
thread and serves until :meth:`DbThread.aclose` (or until it is cancelled); then the call in
progress and those still queued are finished, the thread ends and ``run`` returns. Calls
submitted once closing has begun raise :class:`~shared.store.db.DatabaseError`.
"""

from __future__ import annotations

import contextlib
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import outcome
import trio

from shared.store.db import DatabaseError

__all__ = ["DbThread"]

R = TypeVar("R")


class _Call(Generic[R]):
    __slots__ = ("args", "cancelled", "context", "fn", "started", "task")

    def __init__(self, fn: Callable[..., R], args: tuple[Any, ...], task: trio.lowlevel.Task):
        self.fn = fn
        self.args = args
        self.task = task
        self.context = contextvars.copy_context()
        #: Both flags change under DbThread._lock only: the worker takes a call (started) and
        #: an aborting caller withdraws it (cancelled), never both.
        self.started = False
        self.cancelled = False


class DbThread:
    """Runs submitted synchronous calls in one worker thread, one at a time, in order."""

    def __init__(self, name: str) -> None:
        self.name = name
        #: Guards ``_closing`` against submissions (so nothing is queued behind the closing
        #: sentinel) and the flags of each :class:`_Call`.
        self._lock = threading.Lock()
        #: Calls in submission order, then ``None`` once closing has begun. A C queue: its
        #: ``put`` wakes the worker far more cheaply than ``threading.Condition.notify``.
        self._calls: queue.SimpleQueue[_Call[Any] | None] = queue.SimpleQueue()
        self._closing = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._finished: trio.Event | None = None
        self._at_exit: list[Callable[[], object]] = []

    @property
    def waiting(self) -> int:
        """Calls submitted and not started yet (withdrawn ones may be counted until skipped)."""
        return self._calls.qsize()

    @property
    def running(self) -> bool:
        """True between the start of :meth:`run` and the beginning of closing."""
        return self._token is not None and not self._closing

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the worker thread and serve until closed; then finish what was submitted.

        Returns once the thread has ended. If this task is cancelled, closing begins and the
        task still waits (shielded) for the call in progress and the queued ones.
        """
        if self._token is not None:
            raise RuntimeError(f"database thread {self.name!r} was started already")
        self._token = trio.lowlevel.current_trio_token()
        finished = self._finished = trio.Event()
        thread = threading.Thread(target=self._work, name=f"db-{self.name}", daemon=True)
        thread.start()
        task_status.started()
        try:
            await finished.wait()
        finally:
            self._close()
            with trio.CancelScope(shield=True):
                await finished.wait()
            thread.join()

    def at_exit(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` in the worker thread after its last call, before it ends (e.g. to
        close the connections the calls kept). Its exceptions are ignored."""
        self._at_exit.append(fn)

    async def aclose(self) -> None:
        """Stop taking calls, let the submitted ones finish, and wait for the thread's end."""
        self._close()
        if self._finished is not None:
            await self._finished.wait()

    async def call(self, fn: Callable[..., R], *args: Any) -> R:
        """Run ``fn(*args)`` in the worker thread after the calls submitted before it.

        Raises:
            DatabaseError: the thread is not running (not started, or closing).
            BaseException: whatever ``fn`` raised, with its type.
        """
        task = trio.lowlevel.current_task()
        job: _Call[R] = _Call(fn, args, task)
        with self._lock:
            if self._token is None or self._closing:
                raise DatabaseError(f"database thread {self.name!r} is not running")
            self._calls.put(job)

        def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
            with self._lock:
                if job.started:
                    return trio.lowlevel.Abort.FAILED  # finished, and its outcome delivered
                job.cancelled = True
                return trio.lowlevel.Abort.SUCCEEDED

        result: R = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def _close(self) -> None:
        with self._lock:
            if not self._closing:
                self._closing = True
                self._calls.put(None)  # last in: every call submitted before it runs first

    def _work(self) -> None:
        token = self._token
        finished = self._finished
        assert token is not None and finished is not None
        while True:
            job = self._next()
            if job is None:
                break
            result = outcome.capture(job.context.run, job.fn, *job.args)
            # Drop the references before handing over: the caller owns the result now.
            job.fn = job.args = job.context = None  # type: ignore[assignment]
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, job.task, result)
            except trio.RunFinishedError:  # pragma: no cover - the loop ended under us
                return
        for fn in self._at_exit:
            with contextlib.suppress(Exception):
                fn()
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(finished.set)

    def _next(self) -> _Call[Any] | None:
        """The next call to run (blocks until there is one), or None once closed and drained."""
        calls, lock = self._calls, self._lock
        while True:
            job = calls.get()
            if job is None:
                return None
            with lock:
                if not job.cancelled:
                    job.started = True
                    return job
