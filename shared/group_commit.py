"""Group commit: many concurrent writers, one database transaction.

Each caller of :meth:`GroupCommit.submit` hands in one item and waits for its own result.
The first caller to find nobody writing becomes the *leader*: it writes every item pending
in one call of ``write`` (one transaction, one fsync), hands each caller its result, and
goes on while more items arrived meanwhile. A commit costs the same for one row as for a
hundred, so under load each commit carries many items and the rate is bounded by the
number of items per commit, not by the disk's fsync rate.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import trio

T = TypeVar("T")
R = TypeVar("R")


class _Ticket(Generic[R]):
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: R | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """Batches concurrent :meth:`submit` calls into calls of ``write``.

    ``write(items)`` must return one result per item, in order; if it raises, every caller
    of that batch gets the exception. ``max_batch`` bounds the items of one call.
    """

    def __init__(
        self, write: Callable[[Sequence[T]], Awaitable[Sequence[R]]], max_batch: int = 512
    ) -> None:
        self._write = write
        self._max_batch = max_batch
        self._pending: list[tuple[T, _Ticket[R]]] = []
        self._writing = False

    async def submit(self, item: T) -> R:
        """Write ``item`` (with whatever else is pending) and return its result."""
        ticket: _Ticket[R] = _Ticket()
        self._pending.append((item, ticket))
        if not self._writing:
            self._writing = True
            try:
                await self._lead()
            finally:
                self._writing = False
        await ticket.done.wait()
        if ticket.error is not None:
            raise ticket.error
        return ticket.result  # type: ignore[return-value]

    async def _lead(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            try:
                results = await self._write([item for item, _ in batch])
            except Exception as exc:
                for _, ticket in batch:
                    ticket.error = exc
                    ticket.done.set()
                continue
            for (_, ticket), result in zip(batch, results, strict=True):
                ticket.result = result
                ticket.done.set()
