"""Group commit: many concurrent writers, one write call.

Each caller of :meth:`GroupCommit.submit` hands in one item and waits for its own result.
The first caller to find nobody writing becomes the *leader*: it writes every item pending
in one call of ``write`` (one database transaction and one fsync, or one socket send),
hands each caller its result, and goes on until its own item is written. If callers are
still waiting then, the oldest of them leads next, so under sustained load no caller
serves others indefinitely. A commit costs about the same for one row as for a hundred,
so under load each write carries many items and the rate is bounded by the items per
write, not by the disk's fsync rate (or the number of system calls).

Cancellation: a write, once started, is finished (it runs shielded), because a write
interrupted half-way leaves the database call or the byte stream in an unknown state.
A caller cancelled while it waits is withdrawn if its item has not been taken into a
write yet; if it was taken, the item is written and the caller just does not see the
result. Leadership is never lost with a cancelled caller.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import trio

T = TypeVar("T")
R = TypeVar("R")


class _Ticket(Generic[R]):
    __slots__ = ("error", "finished", "result", "wake")

    def __init__(self) -> None:
        #: Set when the item is written (``finished``) or when this caller must lead.
        self.wake = trio.Event()
        self.finished = False
        self.result: R | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """Batches concurrent :meth:`submit` calls into calls of ``write``.

    ``write(items)`` must return one result per item, in order; if it raises an
    ``Exception``, every caller of that batch gets that exception. ``max_batch`` bounds
    the items of one call. Items are written in the order they were submitted.
    """

    def __init__(
        self, write: Callable[[Sequence[T]], Awaitable[Sequence[R]]], max_batch: int = 512
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._write = write
        self._max_batch = max_batch
        self._pending: list[tuple[T, _Ticket[R]]] = []
        self._writing = False

    @property
    def waiting(self) -> int:
        """Items submitted and not yet taken into a write."""
        return len(self._pending)

    async def submit(self, item: T) -> R:
        """Write ``item`` (with whatever else is pending) and return its result."""
        ticket: _Ticket[R] = _Ticket()
        self._pending.append((item, ticket))
        if not self._writing:
            self._writing = True
            await self._lead(ticket)
        else:
            try:
                await ticket.wake.wait()
            except BaseException:
                self._withdraw(ticket)
                raise
            if not ticket.finished:
                await self._lead(ticket)
        if ticket.error is not None:
            raise ticket.error
        return ticket.result  # type: ignore[return-value]

    async def _lead(self, own: _Ticket[R]) -> None:
        """Write batches until ``own`` is written, then hand over (the caller leads)."""
        try:
            while not own.finished:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                with trio.CancelScope(shield=True):
                    try:
                        results = await self._write([item for item, _ in batch])
                        if len(results) != len(batch):
                            raise ValueError(
                                f"write returned {len(results)} results for {len(batch)} items"
                            )
                    except Exception as exc:
                        for _, ticket in batch:
                            ticket.error = exc
                            _finish(ticket)
                        continue
                for (_, ticket), result in zip(batch, results, strict=True):
                    ticket.result = result
                    _finish(ticket)
        finally:
            self._hand_over()

    def _hand_over(self) -> None:
        """The oldest waiting caller leads next; with none, nobody is writing."""
        if self._pending:
            self._pending[0][1].wake.set()
        else:
            self._writing = False

    def _withdraw(self, ticket: _Ticket[R]) -> None:
        """A waiting caller was cancelled: drop its item if it is still pending, and if it
        had just been made leader, pass the lead on."""
        for index, (_, waiting) in enumerate(self._pending):
            if waiting is ticket:
                del self._pending[index]
                break
        if ticket.wake.is_set() and not ticket.finished:
            self._hand_over()


def _finish(ticket: _Ticket[R]) -> None:
    ticket.finished = True
    ticket.wake.set()
