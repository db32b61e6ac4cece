"""The gateway's store-and-forward (SAF) queue: its storage.

The rules (states, transitions, what an attempt means) and the values are in
:mod:`gateway.saf_rules`; this module keeps them in the ``saf_entries`` table.

Store
    :class:`SafStore` is plain synchronous code (the service runs it in a worker thread) over
    SQLAlchemy Core on the ``saf_entries`` table. Each public method is one transaction;
    SQLAlchemy failures surface as :class:`shared.store.db.DatabaseError`, programming errors
    (bad arguments) as ``ValueError``.

    *Claiming.* A forwarder takes due entries with :meth:`SafStore.claim`, which leases them
    (``in_flight``, ``lease_owner``, ``lease_until``) so no other forwarder takes them until
    the lease runs out; it reports each attempt with :meth:`SafStore.finish`, which only
    applies while the caller still holds the lease. Entries go out highest priority first
    (reversals before advices), then first in, first out, and **one at a time per terminal**:
    an entry is claimable only while no other entry of its terminal is in flight or waiting
    ahead of it. Different terminals proceed in parallel.

    *Concurrency.* On SQLite every writer starts with ``BEGIN IMMEDIATE``, so claimers are
    serialized by the database lock. On PostgreSQL the claim query uses ``FOR UPDATE SKIP
    LOCKED`` (a row another transaction holds is skipped, never waited for nor taken twice)
    and claimers additionally take a transaction-scoped advisory lock: the per-terminal rule
    reads *other* rows than it locks, and two claimers working from snapshots taken at the
    same moment could otherwise each start a different entry of one terminal (write skew).
    The lock is held only for the claim's few short statements; enqueues, finishes and
    operators' changes do not take it.

Times
    Every ``now`` must be timezone-aware; it is stored in UTC and read back as UTC-aware
    datetimes on both backends (SQLite keeps no offset, so everything is written in UTC).
"""

from __future__ import annotations

import builtins
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final, cast

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Integer,
    Row,
    Select,
    String,
    Table,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from gateway.models import JournalEntry, SafEntry
from gateway.saf_rules import (
    ACTIVE_STATES,
    KIND_ADVICE,
    KIND_REVERSAL,
    ORIGIN_GATEWAY,
    PRIORITIES,
    PURGEABLE_STATES,
    Claimed,
    NewEntry,
    Outcome,
    QueueFull,
    SafState,
    SafStats,
    SafTransitionError,
    SafView,
    check_text,
    check_transition,
    repeat_mti,
)
from shared.errors import DecodeError
from shared.iso import codec
from shared.iso.messages import idempotency_key as message_key
from shared.iso.messages import original_key as reversal_original_key
from shared.store.db import DatabaseError, transaction
from shared.store.vault import Vault, VaultError

__all__ = ["SafStore"]

# --------------------------------------------------------------------------------------------
# Store

_T: Final = cast(Table, SafEntry.__table__)
_VIEW_COLUMNS: Final = tuple(c for c in _T.c if c.name not in ("payload", "key_id"))
if {c.name for c in _VIEW_COLUMNS} != {f.name for f in fields(SafView)}:  # pragma: no cover
    raise RuntimeError("SafView and the saf_entries table have different columns")
_DATETIME_COLUMNS: Final = frozenset(
    {"next_attempt_at", "lease_until", "created_at", "updated_at", "done_at"}
)
_CLAIM_COLUMNS: Final = (
    _T.c.id,
    _T.c.idempotency_key,
    _T.c.kind,
    _T.c.mti,
    _T.c.key_id,
    _T.c.payload,
    _T.c.attempts,
    _T.c.terminal_id,
    _T.c.created_at,
    _T.c.max_attempts,
)
#: Key of the PostgreSQL advisory lock that serializes claimers (see the module docstring).
_CLAIM_LOCK_KEY: Final = zlib.crc32(b"paylab-saf-claim")

# The statements of the hot paths (enqueue, claim, finish) are built once with bind
# parameters: building them per call costs more CPU than the SQL itself.
_DT: Final = DateTime(timezone=True)
_BY_KEY: Final = select(*_VIEW_COLUMNS).where(_T.c.idempotency_key == bindparam("p_key"))
_DEPTH: Final = select(func.count()).select_from(_T).where(_T.c.state.in_(ACTIVE_STATES))
_INSERT: Final = insert(_T).returning(*_VIEW_COLUMNS)
_INSERT_JOURNAL: Final = insert(cast(Table, JournalEntry.__table__))
_CLAIM: Final = (
    update(_T)
    .where(_T.c.id.in_(bindparam("p_ids", expanding=True)))
    .values(
        state=SafState.IN_FLIGHT.value,
        lease_owner=bindparam("p_owner", type_=String()),
        lease_until=bindparam("p_until", type_=_DT),
        attempts=_T.c.attempts + 1,
        updated_at=bindparam("p_now", type_=_DT),
    )
    .returning(*_CLAIM_COLUMNS)
)
_FINISH: Final = (
    update(_T)
    .where(
        _T.c.id == bindparam("p_id"),
        _T.c.state == SafState.IN_FLIGHT.value,
        _T.c.lease_owner == bindparam("p_owner"),
    )
    .values(
        state=bindparam("p_state", type_=String()),
        lease_owner=None,
        lease_until=None,
        response_code=bindparam("p_code", type_=String()),
        last_error=bindparam("p_error", type_=String()),
        updated_at=bindparam("p_now", type_=_DT),
        # Only a done entry gets done_at; an in-flight entry has none to keep.
        done_at=bindparam("p_done_at", type_=_DT),
        # Only a re-queued entry gets a new due time; the others keep theirs.
        next_attempt_at=func.coalesce(bindparam("p_next", type_=_DT), _T.c.next_attempt_at),
    )
)
_HELD: Final = select(_T.c.id).where(
    _T.c.id.in_(bindparam("p_ids", expanding=True)),
    _T.c.state == SafState.IN_FLIGHT.value,
    _T.c.lease_owner == bindparam("p_owner"),
)
_MAX_ERROR_LENGTH: Final = 200
_MAX_LIST_LIMIT: Final = 1000
# A unique-key race lost on PostgreSQL is retried; more than one retry is only needed when
# the winner itself rolled back in between.
_ENQUEUE_ATTEMPTS: Final = 3


def _utc(value: datetime) -> datetime:
    """An aware datetime in UTC, as stored. Naive datetimes are refused (ambiguous)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"datetime must be timezone-aware: {value!r}")
    return value.astimezone(UTC)


def _read_dt(value: datetime | None) -> datetime | None:
    """A stored datetime as UTC-aware (SQLite returns naive UTC, PostgreSQL aware)."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _view(row: Row[Any]) -> SafView:
    values = dict(row._mapping)
    for name in _DATETIME_COLUMNS:
        values[name] = _read_dt(values[name])
    values["state"] = SafState(values["state"])
    return SafView(**values)


def _error_text(error: str | None) -> str | None:
    return None if error is None else error[:_MAX_ERROR_LENGTH]


@contextmanager
def _db_errors() -> Iterator[None]:
    try:
        yield
    except SQLAlchemyError as exc:
        raise DatabaseError(f"gateway SAF database failure: {exc}") from exc


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


class SafStore:
    """The SAF queue table (synchronous; call from a worker thread).

    ``max_size`` bounds the undelivered entries (queued + in flight). On PostgreSQL the bound
    is soft by at most the number of enqueuers racing at the limit (they count in parallel);
    on SQLite it is exact.
    """

    def __init__(
        self, sessions: sessionmaker[Session], vault: Vault, *, max_size: int = 10_000
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1: {max_size}")
        self._sessions = sessions
        self._vault = vault
        self.max_size = max_size

    # -- forwarding -------------------------------------------------------------------------

    def enqueue(
        self,
        entry: NewEntry,
        *,
        now: datetime,
        journal_rows: Sequence[Mapping[str, Any]] = (),
    ) -> tuple[SafView, bool]:
        """Queue ``entry`` durably; ``(view, True)`` when queued now.

        One write transaction, committed before this returns, so the caller may answer the
        acquirer as soon as it has the result. ``journal_rows`` (dicts for
        :class:`gateway.models.JournalEntry`, see :func:`gateway.journal.journal_row`) are
        inserted in the same transaction: the journal never shows an approval whose advice
        is not queued, nor the reverse.

        * An entry with the same ``idempotency_key`` already exists (in any state): returns
          ``(existing view, False)`` and writes nothing, journal rows included. Two
          concurrent enqueuers of one key get one entry; the loser gets ``False``.
        * The queue holds ``max_size`` undelivered entries: raises :class:`QueueFull`,
          writes nothing.
        * Otherwise the entry is stored ``queued``, due ``now``, attempts 0.

        Raises:
            ValueError: the message does not decode, its MTI or key disagree with the entry,
                it carries a PIN block (field 52), or a reversal names no original (neither
                ``original_key`` nor field 90).
            QueueFull: see above.
            DatabaseError: the database failed.
        """
        now = _utc(now)
        orig = self._checked_original_key(entry)
        rows = [dict(r) for r in journal_rows]
        for attempt in range(_ENQUEUE_ATTEMPTS):
            try:
                with _db_errors():
                    return self._enqueue_once(entry, orig, now, rows)
            except DatabaseError as exc:
                if not isinstance(exc.__cause__, IntegrityError):
                    raise
                # Lost a race on the unique key: return the winner's entry (next round's
                # lookup finds it), unless this was the last round.
                if attempt == _ENQUEUE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _enqueue_once(
        self, entry: NewEntry, orig: str | None, now: datetime, rows: list[dict[str, Any]]
    ) -> tuple[SafView, bool]:
        with transaction(self._sessions, write=True) as s:
            existing = s.execute(_BY_KEY, {"p_key": entry.idempotency_key}).first()
            if existing is not None:
                return _view(existing), False
            depth = s.scalar(_DEPTH)
            if (depth or 0) >= self.max_size:
                raise QueueFull(f"SAF queue is full ({depth} undelivered entries)")
            # The key is the additional authenticated data: a payload moved to another row
            # no longer opens.
            key_id, blob = self._vault.seal(entry.message, entry.idempotency_key.encode())
            values = {
                "idempotency_key": entry.idempotency_key,
                "original_key": orig,
                "kind": entry.kind,
                "origin": entry.origin,
                "priority": entry.priority,
                "state": SafState.QUEUED.value,
                "mti": entry.mti,
                "terminal_id": entry.terminal_id,
                "acquirer_id": entry.acquirer_id,
                "stan": entry.stan,
                "rrn": entry.rrn,
                "bill_number": entry.bill_number,
                "amount": entry.amount,
                "currency": entry.currency,
                "pan_masked": entry.pan_masked,
                "pan_hash": entry.pan_hash,
                "key_id": key_id,
                "payload": blob,
                "attempts": 0,
                "max_attempts": entry.max_attempts,
                "next_attempt_at": now,
                "lease_owner": None,
                "lease_until": None,
                "response_code": None,
                "last_error": None,
                "late_response_code": None,
                "created_at": now,
                "updated_at": now,
                "done_at": None,
            }
            row = s.execute(_INSERT, values).one()
            if rows:
                s.execute(_INSERT_JOURNAL, rows)
            return _view(row), True

    @staticmethod
    def _checked_original_key(entry: NewEntry) -> str | None:
        """Check the message against the entry; the original key of a reversal."""
        try:
            msg = codec.decode(entry.message)
        except DecodeError as exc:
            raise ValueError(f"SAF message does not decode: {exc}") from None
        if msg.get("t") != entry.mti:
            raise ValueError(f"SAF message MTI {msg.get('t')!r} differs from entry {entry.mti}")
        if "52" in msg:
            raise ValueError("a SAF message must not carry a PIN block (field 52)")
        if message_key(msg)[:64] != entry.idempotency_key:
            raise ValueError("idempotency_key is not the key of the queued message")
        if entry.kind != KIND_REVERSAL:
            return entry.original_key
        if entry.original_key is not None:
            return entry.original_key
        if "90" not in msg:
            raise ValueError("a reversal needs original_key or field 90")
        return reversal_original_key(msg)[:64]

    def claim(self, owner: str, *, now: datetime, limit: int, lease: float) -> list[Claimed]:
        """Lease up to ``limit`` due entries to ``owner`` for ``lease`` seconds.

        Due: ``queued`` with ``next_attempt_at <= now``, or ``in_flight`` with ``lease_until <
        now`` (a forwarder that crashed or stalled; its late :meth:`finish` will be refused).
        Order: priority descending, then id (first in, first out).

        Per terminal, only the head may go: an entry is skipped while another entry of its
        terminal is in flight under an unexpired lease, or is queued/in flight and sorts
        before it. So one terminal's entries are delivered one at a time, in order (at most
        one per terminal is returned), and terminals proceed in parallel.

        Claimed rows become ``in_flight`` with ``lease_owner=owner``, ``lease_until=now +
        lease`` and ``attempts + 1``. An entry whose payload no longer opens (its vault key
        was removed, or the row was tampered with) is not returned but moved to ``dead``
        with the reason, so one bad row cannot stall the queue.
        """
        check_text("owner", owner, 64)
        if limit < 1:
            raise ValueError(f"limit must be at least 1: {limit}")
        if lease <= 0:
            raise ValueError(f"lease must be positive: {lease}")
        now = _utc(now)
        with _db_errors(), transaction(self._sessions, write=True) as s:
            postgres = _is_postgres(s)
            if postgres:
                s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CLAIM_LOCK_KEY})
            ids = _due_ids(s, now, limit, skip_locked=postgres)
            if not ids:
                return []
            params = {
                "p_ids": ids,
                "p_owner": owner,
                "p_until": now + timedelta(seconds=lease),
                "p_now": now,
            }
            rows = s.execute(_CLAIM, params).all()
            by_id = {row.id: row for row in rows}
            claimed: list[Claimed] = []
            for entry_id in ids:  # RETURNING order is unspecified; keep the claim order
                row = by_id[entry_id]
                try:
                    message = self._vault.open(
                        row.key_id, row.payload, row.idempotency_key.encode()
                    )
                except VaultError as exc:
                    s.execute(
                        update(_T)
                        .where(_T.c.id == entry_id)
                        .values(
                            state=SafState.DEAD.value,
                            lease_owner=None,
                            lease_until=None,
                            last_error=_error_text(f"cannot open payload: {exc}"),
                            updated_at=now,
                        )
                    )
                    continue
                claimed.append(
                    Claimed(
                        id=row.id,
                        idempotency_key=row.idempotency_key,
                        kind=row.kind,
                        mti_to_send=row.mti if row.attempts == 1 else repeat_mti(row.mti),
                        message=message,
                        attempts=row.attempts,
                        terminal_id=row.terminal_id,
                        created_at=_read_dt(row.created_at) or now,
                        max_attempts=row.max_attempts,
                    )
                )
            return claimed

    def finish(
        self,
        entry_id: int,
        owner: str,
        outcome: Outcome,
        *,
        now: datetime,
        journal_rows: Sequence[Mapping[str, Any]] = (),
    ) -> bool:
        """Apply ``outcome`` to an entry ``owner`` has claimed; True when applied.

        Applies only while the entry is still ``in_flight`` and leased by ``owner`` (an
        expired lease that nobody took over still counts). Otherwise (cancelled meanwhile,
        lease taken over by another forwarder, unknown id) returns False and changes nothing,
        journal rows included. When applied: the lease is cleared, ``response_code`` and
        ``last_error`` take the outcome's, ``done_at`` is set for ``DONE``, ``next_attempt_at``
        for ``QUEUED`` (``now`` when the outcome has none), and ``journal_rows`` are inserted
        in the same transaction.

        Raises:
            SafTransitionError: ``outcome.state`` cannot follow ``in_flight``.
        """
        return self.finish_many(owner, [(entry_id, outcome, journal_rows)], now=now)[0]

    def finish_many(
        self,
        owner: str,
        results: Sequence[tuple[int, Outcome, Sequence[Mapping[str, Any]]]],
        *,
        now: datetime,
    ) -> builtins.list[bool]:
        """:meth:`finish` for several entries in **one** transaction (group commit).

        ``results`` holds ``(entry_id, outcome, journal_rows)``; the answer lists, in the same
        order, whether each was applied (same rules as :meth:`finish`). One commit (one
        fsync on SQLite) records a whole batch of answers: that is what lets the forwarder
        drain thousands of entries a second.

        Raises:
            SafTransitionError: an outcome's state cannot follow ``in_flight`` (nothing is
                written).
        """
        for _id, outcome, _rows in results:
            check_transition(SafState.IN_FLIGHT, outcome.state)
        if not results:
            return []
        now = _utc(now)
        ids = [entry_id for entry_id, _outcome, _rows in results]
        with _db_errors(), transaction(self._sessions, write=True) as s:
            # Which entries this owner still holds. The write transaction keeps them so until
            # commit: SQLite's write lock is taken at BEGIN, and on PostgreSQL the rows are
            # locked (a concurrent cancel or takeover waits, and is re-checked after us).
            held_query = _HELD.with_for_update() if _is_postgres(s) else _HELD
            held = set(s.scalars(held_query, {"p_ids": ids, "p_owner": owner}))
            updates: builtins.list[dict[str, Any]] = []
            journal: builtins.list[dict[str, Any]] = []
            for entry_id, outcome, journal_rows in results:
                if entry_id not in held:
                    continue
                held.discard(entry_id)  # the same id twice in one batch applies once
                next_at = None
                if outcome.state is SafState.QUEUED:
                    when = outcome.next_attempt_at
                    next_at = now if when is None else _utc(when)
                updates.append(
                    {
                        "p_id": entry_id,
                        "p_owner": owner,
                        "p_state": outcome.state.value,
                        "p_code": outcome.response_code,
                        "p_error": _error_text(outcome.error),
                        "p_now": now,
                        "p_done_at": now if outcome.state is SafState.DONE else None,
                        "p_next": next_at,
                    }
                )
                journal.extend(dict(r) for r in journal_rows)
            if updates:
                # executemany: one statement for the whole batch, no RETURNING needed.
                s.connection().execute(_FINISH, updates)
            if journal:
                s.execute(_INSERT_JOURNAL, journal)
        applied_ids = {u["p_id"] for u in updates}
        seen: set[int] = set()
        out: builtins.list[bool] = []
        for entry_id, _outcome, _rows in results:
            out.append(entry_id in applied_ids and entry_id not in seen)
            seen.add(entry_id)
        return out

    def release_owner(self, owner: str, *, now: datetime) -> int:
        """Put ``owner``'s in-flight entries back to ``queued``, due ``now``; how many.

        For a forwarder's start-up: what its previous run had in flight is sent again
        (as a repeat: the attempt count is kept) instead of waiting for the lease to run out.
        """
        now = _utc(now)
        with _db_errors(), transaction(self._sessions, write=True) as s:
            released = s.execute(
                update(_T)
                .where(_T.c.state == SafState.IN_FLIGHT.value, _T.c.lease_owner == owner)
                .values(
                    state=SafState.QUEUED.value,
                    lease_owner=None,
                    lease_until=None,
                    next_attempt_at=now,
                    updated_at=now,
                )
                .returning(_T.c.id)
            ).all()
            return len(released)

    def record_late_response(
        self, idempotency_key: str, code: str, *, now: datetime
    ) -> SafView | None:
        """Note a late ``0210`` (code ``code``) for the transaction ``idempotency_key``.

        Marks every entry about that transaction: its advice (same key) and any reversal of
        it (``original_key``). The state is not changed: a reversal promised after a ``68``
        is still delivered (billing's answer decides), an advice likewise. Returns the
        advice's view if there is one, else the newest reversal's, else None (nothing
        queued for that transaction).
        """
        check_text("code", code, 2)
        now = _utc(now)
        about = or_(_T.c.idempotency_key == idempotency_key, _T.c.original_key == idempotency_key)
        with _db_errors(), transaction(self._sessions, write=True) as s:
            rows = s.execute(
                update(_T)
                .where(about)
                .values(late_response_code=code, updated_at=now)
                .returning(*_VIEW_COLUMNS)
            ).all()
        if not rows:
            return None
        views = sorted(
            (_view(r) for r in rows),
            key=lambda v: (v.idempotency_key != idempotency_key, -v.id),
        )
        return views[0]

    # -- operators ---------------------------------------------------------------------------

    def get(self, entry_id: int) -> SafView | None:
        """One entry, or None."""
        with _db_errors(), transaction(self._sessions, write=False) as s:
            row = s.execute(select(*_VIEW_COLUMNS).where(_T.c.id == entry_id)).first()
        return None if row is None else _view(row)

    def gateway_reversed(self) -> set[str]:
        """Keys of the payments the gateway decided to reverse (its reversals not cancelled).

        The acquirer was told 68 for each: a repeat of one must get 68 again and must never
        be forwarded (billing could replay an approval). Read at start, so that this
        survives a restart; an entry purged after its retention is no longer listed
        (billing then answers such a repeat ``12``, see docs/message-spec.md).
        """
        q = select(_T.c.original_key).where(
            _T.c.kind == KIND_REVERSAL,
            _T.c.origin == ORIGIN_GATEWAY,
            _T.c.state != SafState.CANCELLED.value,
            _T.c.original_key.is_not(None),
        )
        with _db_errors(), transaction(self._sessions, write=False) as s:
            return {str(k) for k in s.scalars(q)}

    def get_by_key(self, idempotency_key: str) -> SafView | None:
        """The entry queued under ``idempotency_key`` (unique), or None."""
        with _db_errors(), transaction(self._sessions, write=False) as s:
            row = s.execute(_BY_KEY, {"p_key": idempotency_key}).first()
        return None if row is None else _view(row)

    def retry(self, entry_id: int, *, now: datetime) -> SafView:
        """An operator's retry of a dead entry: queued again, due ``now``, attempts reset to 0.

        Raises:
            LookupError: no such entry.
            SafTransitionError: the entry is not dead.
        """
        return self._operator_change(
            entry_id,
            SafState.QUEUED,
            now,
            {"attempts": 0, "next_attempt_at": _utc(now)},
            # in_flight -> queued is the forwarder's move (finish), not an operator's.
            only_from=SafState.DEAD,
        )

    def cancel(self, entry_id: int, *, now: datetime) -> SafView:
        """An operator gives up on an entry (queued, in flight or dead): it is never sent again.

        A forwarder holding it in flight gets False from :meth:`finish`. Its message may still
        reach billing (it may be on the wire): reconciliation shows what happened.

        Raises:
            LookupError: no such entry.
            SafTransitionError: the entry is done or already cancelled.
        """
        return self._operator_change(entry_id, SafState.CANCELLED, now, {})

    def _operator_change(
        self,
        entry_id: int,
        dst: SafState,
        now: datetime,
        extra: Mapping[str, Any],
        *,
        only_from: SafState | None = None,
    ) -> SafView:
        now = _utc(now)
        with _db_errors(), transaction(self._sessions, write=True) as s:
            # FOR UPDATE (PostgreSQL): a concurrent claim or finish of this row is waited for,
            # so the check below sees the state the update applies to.
            current = s.execute(
                select(_T.c.state).where(_T.c.id == entry_id).with_for_update()
            ).scalar()
            if current is None:
                raise LookupError(f"no SAF entry {entry_id}")
            src = SafState(current)
            if only_from is not None and src is not only_from:
                raise SafTransitionError(
                    f"SAF entry {entry_id} is {src.value}; only a {only_from.value} entry can go "
                    f"to {dst.value} this way"
                )
            check_transition(src, dst)
            row = s.execute(
                update(_T)
                .where(_T.c.id == entry_id)
                .values(
                    state=dst.value,
                    lease_owner=None,
                    lease_until=None,
                    updated_at=now,
                    **extra,
                )
                .returning(*_VIEW_COLUMNS)
            ).one()
            return _view(row)

    def purge(self, *, older_than: datetime) -> int:
        """Delete done and cancelled entries that ended before ``older_than``; how many.

        "Ended" is ``done_at`` (done) or ``updated_at`` (cancelled). Queued, in-flight and dead
        entries are never purged. Keep them at least as long as reconciliation looks back:
        a purged stand-in advice can no longer be told from an online approval.
        """
        cutoff = _utc(older_than)
        ended = func.coalesce(_T.c.done_at, _T.c.updated_at)
        with _db_errors(), transaction(self._sessions, write=True) as s:
            deleted = s.execute(
                delete(_T)
                .where(_T.c.state.in_(PURGEABLE_STATES), ended < cutoff)
                .returning(_T.c.id)
            ).all()
            return len(deleted)

    def stats(self, *, now: datetime) -> SafStats:
        """Counts by state (every state, zeros included), depth, age of the oldest undelivered."""
        now = _utc(now)
        with _db_errors(), transaction(self._sessions, write=False) as s:
            by_state: dict[str, int] = dict(
                s.execute(select(_T.c.state, func.count()).group_by(_T.c.state)).all()
            )
            oldest = s.scalar(
                select(func.min(_T.c.created_at)).where(_T.c.state.in_(ACTIVE_STATES))
            )
        counts = {state.value: int(by_state.get(state.value, 0)) for state in SafState}
        oldest_at = _read_dt(oldest)
        return SafStats(
            counts=MappingProxyType(counts),
            depth=sum(counts[state] for state in ACTIVE_STATES),
            oldest_queued_age_seconds=(
                None if oldest_at is None else max(0.0, (now - oldest_at).total_seconds())
            ),
        )

    def standin_amount_since(self, pan_hash: str, since: datetime) -> int:
        """Total amount approved in stand-in for one card since ``since`` (advices, any state
        but cancelled), for per-customer stand-in limits."""
        with _db_errors(), transaction(self._sessions, write=False) as s:
            total = s.scalar(
                select(func.coalesce(func.sum(_T.c.amount), 0)).where(
                    _T.c.pan_hash == pan_hash,
                    _T.c.kind == KIND_ADVICE,
                    _T.c.state != SafState.CANCELLED.value,
                    _T.c.created_at >= _utc(since),
                )
            )
        return int(total or 0)

    def depth(self) -> int:
        """Entries still to deliver (queued + in flight)."""
        with _db_errors(), transaction(self._sessions, write=False) as s:
            n = s.scalar(select(func.count()).select_from(_T).where(_T.c.state.in_(ACTIVE_STATES)))
        return int(n or 0)

    def list(
        self,
        *,
        state: SafState | None = None,
        limit: int = 50,
        before_id: int | None = None,
        rrn: str | None = None,
        stan: str | None = None,
    ) -> builtins.list[SafView]:
        """Entries newest first, optionally filtered; ``before_id`` pages on (keyset).

        ``limit`` is capped at 1000. For the next page pass the last returned id as
        ``before_id``.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1: {limit}")
        conditions: builtins.list[ColumnElement[bool]] = []
        if state is not None:
            conditions.append(_T.c.state == SafState(state).value)
        if before_id is not None:
            conditions.append(_T.c.id < before_id)
        if rrn:
            conditions.append(_T.c.rrn == rrn)
        if stan:
            conditions.append(_T.c.stan == stan)
        q = (
            select(*_VIEW_COLUMNS)
            .where(*conditions)
            .order_by(_T.c.id.desc())
            .limit(min(limit, _MAX_LIST_LIMIT))
        )
        with _db_errors(), transaction(self._sessions, write=False) as s:
            return [_view(r) for r in s.execute(q)]


def _claim_statements(*, skip_locked: bool) -> tuple[Select[Any], Select[Any]]:
    """The two queries of :meth:`SafStore.claim`, built once (bind parameters ``now``,
    ``limit``, ``priority``): due queued entries of one priority in id order, and in-flight
    entries whose lease ran out, in claim order; both without blocked entries.

    Queued entries are read one priority at a time so that each query walks the index
    ``(state, priority, id)`` in order and stops after ``limit`` rows (one ``ORDER BY
    priority DESC, id`` over both states would sort every due row on each claim).
    """
    now = bindparam("now", type_=_T.c.next_attempt_at.type)
    limit = bindparam("limit", type_=Integer())
    other = _T.alias("other")
    sorts_before = or_(
        other.c.priority > _T.c.priority,
        and_(other.c.priority == _T.c.priority, other.c.id < _T.c.id),
    )
    blocked = exists().where(
        other.c.terminal_id == _T.c.terminal_id,
        other.c.id != _T.c.id,
        or_(
            # Anything of the terminal on the wire right now holds the terminal...
            and_(other.c.state == SafState.IN_FLIGHT.value, other.c.lease_until >= now),
            # ...and so does anything still undelivered that is ahead in the line.
            and_(other.c.state.in_(ACTIVE_STATES), sorts_before),
        ),
    )
    queued = (
        select(_T.c.priority, _T.c.id)
        .where(
            _T.c.state == SafState.QUEUED.value,
            _T.c.priority == bindparam("priority", type_=Integer()),
            _T.c.next_attempt_at <= now,
            ~blocked,
        )
        .order_by(_T.c.id)
        .limit(limit)
    )
    expired = (
        select(_T.c.priority, _T.c.id)
        .where(_T.c.state == SafState.IN_FLIGHT.value, _T.c.lease_until < now, ~blocked)
        .order_by(_T.c.priority.desc(), _T.c.id)
        .limit(limit)
    )
    if skip_locked:
        queued = queued.with_for_update(skip_locked=True, of=_T)
        expired = expired.with_for_update(skip_locked=True, of=_T)
    return queued, expired


_CLAIM_STATEMENTS: Final = {
    False: _claim_statements(skip_locked=False),
    True: _claim_statements(skip_locked=True),
}
#: Every priority the store writes, highest first.
_PRIORITIES_DESC: Final = tuple(sorted(set(PRIORITIES.values()), reverse=True))


def _due_ids(s: Session, now: datetime, limit: int, *, skip_locked: bool) -> list[int]:
    """Ids of the entries to claim, in claim order (see :meth:`SafStore.claim`)."""
    queued_q, expired_q = _CLAIM_STATEMENTS[skip_locked]
    params = {"now": now, "limit": limit}
    # (priority, id) of every candidate; the top ``limit`` of the union is the top ``limit``
    # of each part's own top ``limit``, and lower priorities are not read once enough
    # higher-priority entries are due.
    found: list[tuple[int, int]] = []
    for priority in _PRIORITIES_DESC:
        if len(found) >= limit:
            break
        rows = s.execute(queued_q, {**params, "priority": priority})
        found.extend((int(p), int(i)) for p, i in rows)
    found.extend((int(p), int(i)) for p, i in s.execute(expired_q, params))
    found.sort(key=lambda pair: (-pair[0], pair[1]))
    return [entry_id for _, entry_id in found[:limit]]
