"""The store-and-forward forwarder: delivers queued advices and reversals to billing.

A thin trio shell over :class:`gateway.saf_store.SafStore` (what is due, in which order, what an
answer means) and the billing :class:`~shared.net.upstream.Upstream` (how to reach it):

* it waits for the link instead of hammering it: nothing is claimed while billing is
  unavailable (no healthy connection, or the breaker open);
* it claims due entries (priority, then first in first out, one at a time per terminal),
  sends each with its first MTI (0220, 0420) on the first attempt and the repeat MTI
  (0221, 0421) afterwards, one attempt per claim (the queue's own schedule spaces the
  attempts: the retry schedule, never less than ``saf_retry_interval``);
* each answer updates the entry and appends a journal row in one transaction, shared by
  the answers that arrive together (group commit, :mod:`shared.store.group_commit`); billing's
  idempotency makes a repeat harmless, so a crash between sending and recording at worst
  sends the entry once more.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import trio

from gateway.journal import journal_row
from gateway.metrics import SafMetrics
from gateway.saf_rules import Claimed, Outcome, SafState, after_attempt
from gateway.saf_store import SafStore
from shared.errors import DecodeError, UpstreamError
from shared.iso import codec
from shared.iso.messages import match_key
from shared.net.iso_link import IsoFrame
from shared.net.upstream import Upstream
from shared.ops.settings import Settings
from shared.pan import PanHasher
from shared.server.service import retry_policy
from shared.store.group_commit import GroupCommit

R = TypeVar("R")
#: What one delivery leaves to record: entry id, outcome, journal rows.
_Result = tuple[int, Outcome, Sequence[Mapping[str, Any]]]
RunDb = Callable[..., Awaitable[Any]]

#: How often an idle forwarder looks for due entries (also woken at once by an enqueue).
POLL_INTERVAL = 0.5


class Forwarder:
    """Drains the queue to billing while billing is reachable. See the module docstring."""

    def __init__(
        self,
        store: SafStore,
        billing: Upstream[IsoFrame],
        run_db: RunDb,
        *,
        settings: Settings,
        metrics: SafMetrics,
        log: Any,
        pan_hash: PanHasher,
    ) -> None:
        self._store = store
        self._billing = billing
        self._run_db = run_db
        self._settings = settings
        self._metrics = metrics
        self._log = log
        self._pan_hash = pan_hash
        self._owner = settings.replica_id
        # The same 1, 2, 4, 8, 16 s schedule as online retries; only delay() is used here.
        self._schedule = retry_policy(settings)
        self._wake = trio.Event()
        self._limiter = trio.CapacityLimiter(settings.saf_concurrency)
        self._stopping = False
        self._done = trio.Event()
        # Answers are recorded in groups: one transaction (one fsync) for all the answers
        # that arrived while the previous group was being written.
        self._recorder: GroupCommit[_Result, bool] = GroupCommit(self._finish_many)

    async def _finish_many(self, results: Sequence[_Result]) -> list[bool]:
        applied: list[bool] = await self._run_db(
            lambda: self._store.finish_many(self._owner, results, now=_now())
        )
        return applied

    def wake(self) -> None:
        """Something was queued: look at once instead of at the next poll."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forward until :meth:`stop`; first take back this replica's claims of a past run."""
        released = await self._run_db(lambda: self._store.release_owner(self._owner, now=_now()))
        if released:
            self._log.info("saf_claims_released", owner=self._owner, count=released)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while not self._stopping:
                    if not self._billing.available:
                        await self._nap()
                        continue
                    if self._limiter.available_tokens < 1:
                        # Every delivery slot is busy: the first delivery to end wakes us.
                        # (This nap used to be in _claim, and its empty batch then made the
                        # loop nap again, past that wake-up: with the limiter full the drain
                        # slowed to one batch per POLL_INTERVAL.)
                        await self._nap()
                        continue
                    batch = await self._claim()
                    if not batch:
                        await self._nap()
                        continue
                    for entry in batch:
                        await self._limiter.acquire_on_behalf_of(entry.id)
                        nursery.start_soon(self._deliver, entry)
        finally:
            self._done.set()

    async def stop(self) -> None:
        """Claim nothing more; return once the deliveries under way are recorded."""
        self._stopping = True
        self._wake.set()
        await self._done.wait()

    async def _nap(self) -> None:
        with trio.move_on_after(POLL_INTERVAL):
            await self._wake.wait()
        self._wake = trio.Event()

    async def _claim(self) -> list[Claimed]:
        free = int(self._limiter.available_tokens)
        if free <= 0:  # run() waits for a free slot before claiming
            return []
        try:
            claimed: list[Claimed] = await self._run_db(
                lambda: self._store.claim(
                    self._owner, now=_now(), limit=free, lease=self._settings.saf_lease
                )
            )
        except Exception as exc:  # a database failure: log it and try again later
            self._log.error("saf_claim_failed", error=str(exc)[:200])
            return []
        return claimed

    async def _deliver(self, entry: Claimed) -> None:
        try:
            outcome, answer = await self._attempt(entry)
            rows = [] if answer is None else [self._journal(entry, answer)]
            try:
                applied = await self._recorder.submit((entry.id, outcome, rows))
            except Exception as exc:
                # The lease runs out and the entry is forwarded again: billing's idempotency
                # makes that harmless.
                self._log.error("saf_finish_failed", entry=entry.id, error=str(exc)[:200])
                return
            self._count(entry, outcome, applied)
        finally:
            self._limiter.release_on_behalf_of(entry.id)
            self._wake.set()  # the terminal's next entry may be due now

    async def _attempt(self, entry: Claimed) -> tuple[Outcome, dict[str, str] | None]:
        """Send ``entry`` once; the outcome to record and billing's answer (if any)."""
        code: str | None = None
        error: str | None = None
        answer: dict[str, str] | None = None
        try:
            msg = codec.decode(entry.message)
            msg["t"] = entry.mti_to_send
            payload = codec.encode(msg)
        except DecodeError as exc:  # cannot happen for what the gateway queued itself
            error = f"undecodable queued message: {exc}"
        else:
            try:
                frame = await self._billing.call(
                    payload,
                    match_key(msg),
                    timeout=self._settings.billing_timeout,
                    resend_safe=True,
                    retry=False,
                )
            except UpstreamError as exc:
                error = f"{type(exc).__name__}: {exc}"[:200]
            else:
                answer = frame.msg
                code = answer.get("39") or "96"
        delay = max(
            self._schedule.delay(max(entry.attempts - 1, 0)), self._settings.saf_retry_interval
        )
        outcome = after_attempt(
            attempts=entry.attempts,
            max_attempts=entry.max_attempts,
            created_at=entry.created_at,
            max_age=timedelta(seconds=self._settings.saf_max_age),
            now=_now(),
            code=code,
            error=error,
            delay=delay,
        )
        return outcome, answer

    def _journal(self, entry: Claimed, answer: dict[str, str]) -> dict[str, Any]:
        msg = codec.decode(entry.message)
        msg["t"] = entry.mti_to_send
        return journal_row(
            msg,
            answer.get("39", "96"),
            received_at=_now(),
            duration_ms=0.0,
            pan_hash=self._pan_hash,
        )

    def _count(self, entry: Claimed, outcome: Outcome, applied: bool) -> None:
        if not applied:
            self._log.info("saf_outcome_not_applied", entry=entry.id)  # cancelled meanwhile
            return
        self._metrics.forwarded.labels(entry.kind, outcome.state.value).inc()
        if outcome.state is SafState.DEAD:
            self._log.error("saf_entry_dead", entry=entry.id, kind=entry.kind, error=outcome.error)
        elif outcome.state is SafState.DONE and outcome.response_code != "00":
            self._log.warning(
                "saf_entry_declined", entry=entry.id, kind=entry.kind, code=outcome.response_code
            )


def _now() -> datetime:
    return datetime.now(UTC)
