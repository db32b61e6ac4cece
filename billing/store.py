"""The billing host's ledger store: every bill payment is posted exactly once.

The rules it applies (what a payment, a repeat, a reversal decides) are pure, in
:mod:`billing.posting`. :class:`BillingStore` is plain synchronous code over a
``sessionmaker``; the ISO-8583 handler calls it from a worker thread. Each public method is
one database transaction and returns a frozen dataclass. Business outcomes (declines) are
*returned* as response codes, never raised; only infrastructure failures raise, as
:class:`shared.store.db.DatabaseError`. Malformed arguments (an MTI the method does not
handle, an over-long key) are programming errors and raise ``ValueError``.

Concurrency
    On SQLite write transactions start with ``BEGIN IMMEDIATE`` and are serialized. On
    PostgreSQL the bill row is locked (``SELECT ... FOR UPDATE``) before it is checked, so two
    different payments of one bill cannot both post; two concurrent requests with the same key
    collide on a unique constraint, and the loser rolls back and returns the winner's stored
    outcome. Locks are always taken bill first, then posting, so payments and reversals cannot
    deadlock each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from types import MappingProxyType, TracebackType
from typing import Final, NamedTuple, TypeVar

from sqlalchemy import Connection, bindparam, delete, func, insert, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from billing.demo_data import DEMO_BILLS, DEMO_CARDS, DEMO_CURRENCY, DEMO_CUSTOMERS, DEMO_PVKI
from billing.models import (
    BILL_OPEN,
    BILL_PAID,
    CARD_ACTIVE,
    POSTING_REVERSED,
    Bill,
    Card,
    Customer,
    Ledger,
    Posting,
    ProcessedRequest,
    utcnow,
)
from billing.posting import (
    RC_ALREADY_PAID,
    RC_APPROVED,
    RC_DUPLICATE,
    RC_INVALID_AMOUNT,
    RC_INVALID_TRANSACTION,
    RC_UNKNOWN_BILL,
    REVERSED_BEFORE_POSTING,
    BillRow,
    CardRef,
    InquiryResult,
    PaymentRequest,
    PaymentResult,
    PostingRecord,
    ReversalRequest,
    ReversalResult,
    StoredResponse,
    check_key,
    decide,
    decode_fields,
    encode_fields,
    payment_result,
    posting_values,
    reversal_result,
    seen_row,
)
from shared.pan import mask_pan
from shared.store.db import DatabaseError, connection_transaction, engine_of, table_of, transaction
from shared.store.raw import RawConnections, RawTransaction, SqlText

__all__ = ["BillingStore"]

# A unique violation means a concurrent transaction won; the next attempt replays its outcome.
# More than one retry is only needed if that winner itself rolled back in between.
_ATTEMPTS: Final = 3

_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------
# The store


# Core statements of the paths off the hot path (reversals, declines, the ledger's identity).
_PR = table_of(ProcessedRequest)
_CARD = table_of(Card)
_BILL = table_of(Bill)
_CUSTOMER = table_of(Customer)
_POSTING = table_of(Posting)
# Recorded outcomes with the status of the posting made under the same key (if any): a
# replayed approval whose posting was reversed since is answered ``12``, never ``00``.
_RECORDED_FOR = (
    select(
        _PR.c.idempotency_key,
        _PR.c.mti,
        _PR.c.request_digest,
        _PR.c.response_code,
        _PR.c.response_json,
        _POSTING.c.status.label("posting_status"),
    )
    .outerjoin(_POSTING, _POSTING.c.idempotency_key == _PR.c.idempotency_key)
    .where(_PR.c.idempotency_key.in_(bindparam("keys", expanding=True)))
)
_LEDGER = table_of(Ledger)
_LEDGER_ID = select(_LEDGER.c.ledger_id).where(_LEDGER.c.id == 1)
_ANY_CUSTOMER = select(_CUSTOMER.c.id).limit(1)


# The hot path's statements as SQL text for the raw DB-API (shared.store.raw), written once
# per dialect by SqlText: ``?`` placeholders, ``{in}`` for an IN list. A Core statement
# costs tens of microseconds of Python per execution even when cached; these cost what the
# driver costs. Rows come back as plain tuples; a batch builds no ORM object at all.
_RAW_RECORDED_FOR = (
    "SELECT pr.idempotency_key, pr.mti, pr.request_digest, pr.response_code,"
    " pr.response_json, p.status"
    " FROM processed_requests pr"
    " LEFT OUTER JOIN postings p ON p.idempotency_key = pr.idempotency_key"
    " WHERE pr.idempotency_key {in}"
)
_RAW_CARDS_FOR = (
    "SELECT pan_hash, id, customer_id, pan_masked, pvki, pvv, status FROM cards WHERE pan_hash {in}"
)
_RAW_BILLS_FOR = (
    "SELECT b.bill_number, b.biller, b.amount_due, b.currency, b.status, c.name"
    " FROM bills b JOIN customers c ON c.id = b.customer_id"
    " WHERE b.bill_number {in}"
)
# PostgreSQL: the bill rows only are locked, in bill-number order.
_RAW_BILLS_FOR_UPDATE_PG = _RAW_BILLS_FOR + " ORDER BY b.bill_number FOR UPDATE OF b"
_RAW_INSERT_POSTING = (
    "INSERT INTO postings (bill_number, amount, currency, idempotency_key, rrn, stan,"
    " terminal_id, acquirer_id, pan_masked, pan_hash, source, status, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_RAW_MARK_PAID = f"UPDATE bills SET status = '{BILL_PAID}', paid_at = ? WHERE bill_number = ?"
_RAW_INSERT_RECORD = (
    "INSERT INTO processed_requests (idempotency_key, mti, request_digest, response_code,"
    " response_json, created_at) VALUES (?, ?, ?, ?, ?, ?)"
)


class _RecordedRow(NamedTuple):
    """A row of ``_RAW_RECORDED_FOR`` with the names :func:`seen_row` reads."""

    idempotency_key: str
    mti: str
    request_digest: str
    response_code: str
    response_json: str
    posting_status: str | None


class BillingStore:
    """The billing host's ledger. Thread-safe: besides the session factory it holds only the
    hot path's idle raw connections, each used by one thread at a time (:meth:`close`).

    ``clock`` returns the current time (timezone-aware UTC) for ``paid_at``/``reversed_at``;
    tests may pin it.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        clock: Callable[[], datetime] = utcnow,
        guard: Callable[[Connection | RawTransaction], None] | None = None,
    ) -> None:
        self._sessions = sessions
        self._engine = engine_of(sessions)
        #: The hot paths (payments, their replay checks, inquiries) run SQL text on raw
        #: DB-API connections kept for good: see :mod:`shared.store.raw`.
        self._raw = RawConnections(self._engine)
        self._sql = SqlText(self._engine)
        self._insert_posting = self._sql.sql(_RAW_INSERT_POSTING)
        self._mark_paid = self._sql.sql(_RAW_MARK_PAID)
        self._insert_record = self._sql.sql(_RAW_INSERT_RECORD)
        self._bills_for_update = _RAW_BILLS_FOR if self._sql.sqlite else _RAW_BILLS_FOR_UPDATE_PG
        self._clock = clock
        #: Called inside every write transaction just before its commit; it raises (e.g.
        #: :class:`billing.ledger.LedgerLost`) to roll the transaction back.
        self._guard = guard

    def set_guard(self, guard: Callable[[Connection | RawTransaction], None] | None) -> None:
        """Install the check run before every commit (see ``guard`` above): it is given
        the transaction's SQLAlchemy connection, or on the hot path its raw transaction."""
        self._guard = guard

    def close(self) -> None:
        """Close the hot path's idle raw connections (before the engine is disposed of)."""
        self._raw.close()

    def _check(self, conn: Connection | RawTransaction) -> None:
        if self._guard is not None:
            self._guard(conn)

    # -- reads ---------------------------------------------------------------------------

    def lookup_card(self, pan_hash: str) -> CardRef | None:
        """The card with this PAN hash, or None (the handler answers ``14``)."""
        with _infrastructure_errors(), self._raw.transaction(write=False) as tx:
            rows = tx.rows(*self._sql.in_list(_RAW_CARDS_FOR, [pan_hash]))
        return CardRef(*rows[0][1:]) if rows else None

    def replay(self, idempotency_key: str, request_digest: str) -> StoredResponse | None:
        """What was answered to this key before, if anything.

        Returns the stored response (``replayed=True``) if the key was seen with the same
        digest (or is a reversed-before-posting tombstone, which matches any digest); a
        ``94`` response (``replayed=False``, no fields) if it was seen with a different digest;
        None if the key is new.
        """
        with _infrastructure_errors(), self._raw.transaction(write=False) as tx:
            rows = tx.rows(*self._sql.in_list(_RAW_RECORDED_FOR, [idempotency_key]))
        return seen_row(_RecordedRow(*rows[0]) if rows else None, idempotency_key, request_digest)

    def replay_and_cards(
        self, items: Sequence[tuple[str, str, str]]
    ) -> list[tuple[StoredResponse | None, CardRef | None]]:
        """:meth:`replay` and :meth:`lookup_card` for many payments, in one read transaction.

        ``items`` are ``(idempotency_key, request_digest, pan_hash)``. For each, in order:
        the stored response as :meth:`replay` gives it, and, when there is none, the card as
        :meth:`lookup_card` gives it (None for an unknown card). Two queries for the whole
        batch, whatever its size: this is the read half of a payment on the hot path.
        """
        if not items:
            return []
        sql = self._sql
        with _infrastructure_errors(), self._raw.transaction(write=False) as tx:
            keys = list({key for key, _, _ in items})
            rows = {row[0]: row for row in tx.rows(*sql.in_list(_RAW_RECORDED_FOR, keys))}
            seen = [
                seen_row(_RecordedRow(*row), key, digest) if (row := rows.get(key)) else None
                for key, digest, _ in items
            ]
            wanted = list({h for (_, _, h), s in zip(items, seen, strict=True) if s is None})
            cards = (
                {row[0]: CardRef(*row[1:]) for row in tx.rows(*sql.in_list(_RAW_CARDS_FOR, wanted))}
                if wanted
                else {}
            )
        return [
            (s, None if s is not None else cards.get(h))
            for (_, _, h), s in zip(items, seen, strict=True)
        ]

    def inquire(self, bill_number: str) -> InquiryResult:
        """``00`` with the amount due for an open bill, ``25`` unknown bill, ``88`` paid.

        Not recorded in ``processed_requests``: an inquiry changes nothing.
        """
        return self.inquire_many([bill_number])[0]

    def inquire_many(self, bill_numbers: Sequence[str]) -> list[InquiryResult]:
        """:meth:`inquire` for many bills (in order), with one query in one read transaction."""
        if not bill_numbers:
            return []
        numbers = list(set(bill_numbers))
        with _infrastructure_errors(), self._raw.transaction(write=False) as tx:
            rows = tx.rows(*self._sql.in_list(_RAW_BILLS_FOR, numbers))
        found = {row[0]: row for row in rows}
        results = []
        for number in bill_numbers:
            row = found.get(number)
            if row is None:
                results.append(InquiryResult(RC_UNKNOWN_BILL, number, None, None, None, None))
                continue
            _, biller, amount_due, currency, status, customer_name = row
            code = RC_ALREADY_PAID if status == BILL_PAID else RC_APPROVED
            results.append(InquiryResult(code, number, amount_due, currency, biller, customer_name))
        return results

    def postings_count(self, bill_number: str | None = None) -> int:
        """Number of postings (posted or reversed), of one bill or of all."""
        with _infrastructure_errors(), transaction(self._sessions, write=False) as session:
            query = select(func.count()).select_from(Posting)
            if bill_number is not None:
                query = query.where(Posting.bill_number == bill_number)
            return session.scalar(query) or 0

    def list_postings(self, limit: int = 100) -> list[PostingRecord]:
        """The first ``limit`` postings, oldest first."""
        with _infrastructure_errors(), transaction(self._sessions, write=False) as session:
            postings = session.scalars(select(Posting).order_by(Posting.id).limit(limit))
            return [_posting_record(p) for p in postings]

    # -- writes --------------------------------------------------------------------------

    def pay(self, request: PaymentRequest) -> PaymentResult:
        """Post a payment, or decline it, exactly once per idempotency key.

        In one transaction: a repeat of a recorded key returns the recorded outcome
        (``replayed=True``, nothing posted; ``94`` if the content differs); otherwise an
        unknown bill gives ``25``, a paid bill ``88``, an amount or currency other than the
        bill's ``13``, and an open bill with the right amount is posted (``00``): a posting is
        inserted and the bill marked paid. Every outcome, declines included, is recorded so a
        repeat gets the same answer.

        Advices (``0220``/``0221``) follow the same rules with ``source="advice"``. An advice
        is a payment the gateway already approved in stand-in while billing was unreachable, so
        a decline here (typically ``88`` because the bill was paid meanwhile through another
        channel, or ``13``) cannot be refused back to the card holder: it is recorded like any
        other outcome, nothing is posted, and the gateway's reconciliation of stand-in
        approvals against billing's answers shows the mismatch for manual settlement. It is
        never raised.
        """
        return self.pay_many([request])[0]

    def pay_many(self, requests: Sequence[PaymentRequest]) -> list[PaymentResult]:
        """:meth:`pay` for several requests in one transaction: one commit for all (group
        commit), each request with exactly the rules of :meth:`pay`, applied in order as if
        one after the other (a second request for the same key in the batch replays the
        first's outcome; a second payment of the same bill gets ``88``).

        The results are returned only once the transaction has committed: an answer never
        announces a posting that is not durable. If the transaction fails, every request of
        the batch fails with :class:`~shared.store.db.DatabaseError` and nothing is posted. A lost
        unique-key race (another process posting the same key, PostgreSQL) retries the batch,
        whose replay checks then return the winner's outcome; if it still fails the requests
        are posted one transaction each, so one contested key cannot fail the others.
        """
        if not requests:
            return []

        def attempt() -> list[PaymentResult]:
            with self._raw.transaction(write=True) as tx:
                results = self._pay_in(tx, requests)
                self._check(tx)
                return results

        try:
            return _retry_on_conflict(attempt)
        except DatabaseError as exc:
            if len(requests) == 1 or not isinstance(exc.__cause__, IntegrityError):
                raise
        return [self.pay(request) for request in requests]

    def _pay_in(
        self, tx: RawTransaction, requests: Sequence[PaymentRequest]
    ) -> list[PaymentResult]:
        """The rules of :meth:`pay` for a batch, with a constant number of statements.

        Two reads (the keys' records; the bills with their customers' names), then three
        multi-row writes (the postings, with their ids returned in order; the bills marked
        paid; the records), all as prebuilt SQL text on a raw connection: a batch
        of a hundred costs little more than a single payment, and no ORM object is built on
        this path. Decisions are made in
        order, as if the requests had come one by one: a key first seen in this batch
        replays for its later copies, and a bill paid by an earlier request of the batch
        is ``88`` for the later ones.
        """
        now = self._clock()
        sql = self._sql
        stamp = sql.timestamp(now)
        keys = list({r.idempotency_key for r in requests})
        recorded = {
            row[0]: _RecordedRow(*row) for row in tx.rows(*sql.in_list(_RAW_RECORDED_FOR, keys))
        }
        # FOR UPDATE (PostgreSQL): a concurrent payment of the same bill waits here and then
        # sees it paid. Rows are locked in bill-number order, so two batches cannot deadlock.
        numbers = list({r.bill_number for r in requests})
        bills = {
            row[0]: BillRow(*row) for row in tx.rows(*sql.in_list(self._bills_for_update, numbers))
        }

        results: list[PaymentResult | None] = [None] * len(requests)
        fresh: list[tuple[int, str, dict[str, object]]] = []
        postings: list[tuple[object, ...]] = []
        first_of_key: dict[str, int] = {}
        repeats: list[tuple[int, int]] = []
        for index, request in enumerate(requests):
            key = request.idempotency_key
            row = recorded.get(key)
            if row is not None:
                seen = seen_row(row, key, request.request_digest)
                assert seen is not None
                results[index] = payment_result(
                    request, seen.code, seen.fields, replayed=seen.replayed
                )
                continue
            if key in first_of_key:
                repeats.append((index, first_of_key[key]))
                continue
            first_of_key[key] = index
            code, fields = decide(request, bills.get(request.bill_number))
            if code == RC_APPROVED:
                bills[request.bill_number].status = BILL_PAID  # later requests see it paid
                postings.append(posting_values(request, stamp))
            fresh.append((index, code, fields))

        ids: Iterator[int] = iter(())
        if postings:
            ids = iter(tx.insert_ids(self._insert_posting, postings))
            tx.run_many(self._mark_paid, [(stamp, p[0]) for p in postings])
        records = []
        for index, code, fields in fresh:
            request = requests[index]
            if code == RC_APPROVED:
                fields["posting_id"] = next(ids)
            encoded = encode_fields(fields)
            records.append(
                (
                    request.idempotency_key,
                    request.mti,
                    request.request_digest,
                    code,
                    encoded,
                    stamp,
                )
            )
            results[index] = payment_result(request, code, decode_fields(encoded), replayed=False)
        if records:
            # A concurrent duplicate key surfaces here, inside the transaction.
            tx.run_many(self._insert_record, records)

        for index, first in repeats:
            request, original = requests[index], results[first]
            assert original is not None
            if request.request_digest == requests[first].request_digest:
                results[index] = payment_result(
                    request, original.code, original.fields, replayed=True
                )
            else:
                results[index] = payment_result(
                    request, RC_DUPLICATE, MappingProxyType({}), replayed=False
                )
        return [r for r in results if r is not None]

    def reverse(self, request: ReversalRequest) -> ReversalResult:
        """Undo the payment recorded under ``request.original_key``, exactly once.

        In one transaction, after the usual replay check on the reversal's own key:

        * posting found and posted, same amount: it is marked reversed (``reversed_at`` set),
          its bill reopened (open, ``paid_at`` cleared), ``00``. Partial reversals are not
          supported: another amount gives ``13`` and changes nothing.
        * posting found and already reversed (by another reversal message): ``00``, nothing
          changes.
        * no posting: ``25`` ("unable to locate record"): there is nothing to undo, and the
          gateway treats ``25`` on a reversal as final, so it stops repeating it. If the
          original key was never seen at all, the reversal overtook its payment (late or
          out-of-order delivery): a tombstone is recorded under the original key (code ``12``,
          digest :data:`REVERSED_BEFORE_POSTING`), so the payment, when it arrives, replays a
          ``12`` decline instead of posting money that the acquirer already considers
          reversed. If the original key was seen but declined, no tombstone is needed: its
          repeats already replay the decline.

        The outcome is recorded under the reversal's key like any other.
        """
        return _retry_on_conflict(lambda: self._reverse_once(request))

    def _reverse_once(self, request: ReversalRequest) -> ReversalResult:
        with transaction(self._sessions, write=True) as session:
            seen = _seen(session, request.idempotency_key, request.request_digest)
            if seen is not None:
                return reversal_result(request, seen.code, seen.fields, replayed=seen.replayed)

            fields: dict[str, object] = {
                "original_key": request.original_key,
                "amount": request.amount,
            }
            found = session.scalars(
                select(Posting).where(Posting.idempotency_key == request.original_key)
            ).one_or_none()
            if found is None:
                code = RC_UNKNOWN_BILL
                if session.get(ProcessedRequest, request.original_key) is None:
                    tombstone = _Record(request.original_key, REVERSED_BEFORE_POSTING, request.mti)
                    tombstone_fields = {
                        "reason": REVERSED_BEFORE_POSTING,
                        "reversal_key": request.idempotency_key,
                    }
                    _record(
                        session, tombstone, RC_INVALID_TRANSACTION, tombstone_fields, self._clock()
                    )
            else:
                # Lock order bill -> posting, as in pay(); re-read the posting under the lock.
                bill = session.get(Bill, found.bill_number, with_for_update=True)
                posting = session.get(
                    Posting, found.id, with_for_update=True, populate_existing=True
                )
                if bill is None or posting is None:  # foreign key makes this impossible
                    raise DatabaseError(f"posting {found.id} lost its bill")
                fields |= {"bill_number": posting.bill_number, "posting_id": posting.id}
                if posting.status == POSTING_REVERSED:
                    code = RC_APPROVED
                elif request.amount != posting.amount:
                    code = RC_INVALID_AMOUNT
                else:
                    code = RC_APPROVED
                    posting.status = POSTING_REVERSED
                    posting.reversed_at = self._clock()
                    bill.status = BILL_OPEN
                    bill.paid_at = None

            record = _Record(request.idempotency_key, request.request_digest, request.mti)
            stored = _record(session, record, code, fields, self._clock())
            self._check(session.connection())
            return reversal_result(request, code, stored, replayed=False)

    def record_decline(
        self,
        idempotency_key: str,
        request_digest: str,
        mti: str,
        code: str,
        fields: Mapping[str, object],
    ) -> StoredResponse:
        """Record a decline decided outside the store (``55`` wrong PIN, ``14`` no such card...).

        ``fields`` must be JSON-serializable. If the key was already recorded, nothing is
        written and the earlier outcome is returned (``replayed=True``), or ``94`` if the digest
        differs. Recording ``00`` this way is refused (``ValueError``): approvals are made by
        :meth:`pay` and :meth:`reverse` only.
        """
        check_key("idempotency_key", idempotency_key)
        check_key("request_digest", request_digest)
        if code == RC_APPROVED or len(code) != 2:
            raise ValueError(f"not a decline code: {code!r}")
        if not (len(mti) == 4 and mti.isdigit()):
            raise ValueError(f"not an MTI: {mti!r}")
        encode_fields(fields)  # fail on unserializable fields before touching the database

        def once() -> StoredResponse:
            with transaction(self._sessions, write=True) as session:
                seen = _seen(session, idempotency_key, request_digest)
                if seen is not None:
                    return seen
                record = _Record(idempotency_key, request_digest, mti)
                stored = _record(session, record, code, fields, self._clock())
                self._check(session.connection())
                return StoredResponse(idempotency_key, mti, code, stored, replayed=False)

        return _retry_on_conflict(once)

    # -- the ledger's identity (billing.ledger) --------------------------------------------

    def ledger_state(self) -> tuple[str | None, bool]:
        """The ledger id (None when there is none) and whether any customer exists."""
        with _infrastructure_errors(), connection_transaction(self._engine, write=False) as conn:
            ledger = conn.execute(_LEDGER_ID).scalar()
            has_data = conn.execute(_ANY_CUSTOMER).first() is not None
        return (None if ledger is None else str(ledger)), has_data

    def create_ledger(self, ledger_id: str, *, replace: bool = False) -> None:
        """Give the database its ledger id; ``replace`` overwrites an existing one."""
        with _infrastructure_errors(), connection_transaction(self._engine, write=True) as conn:
            if replace:
                conn.execute(delete(_LEDGER))
            conn.execute(
                insert(_LEDGER), {"id": 1, "ledger_id": ledger_id, "created_at": self._clock()}
            )

    def check_ledger(self) -> None:
        """Run the guard (see ``guard``) in a read transaction: for health checks."""
        with _infrastructure_errors(), connection_transaction(self._engine, write=False) as conn:
            self._check(conn)

    def seed_demo_data(
        self,
        pan_hasher: Callable[[str], str],
        pvv_for: Callable[[str, str, str], str],
    ) -> bool:
        """Load :mod:`billing.demo_data` if the ``customers`` table is empty.

        ``pan_hasher`` maps a PAN to its keyed hash (64 hex characters: the caller owns the
        key); ``pvv_for(pan, pvki, pin)`` computes the 4-digit PVV (the caller holds the PVK).
        Returns True when it seeded, False when there was data already (including when a
        concurrent process seeded first). Raises ``ValueError`` if the callbacks return
        something else than a 64-hex-digit hash or a 4-digit PVV, so that a mistaken hasher
        can never put a clear PAN in the database.
        """
        cards = []
        for pan, pin, name in DEMO_CARDS:
            pan_hash = pan_hasher(pan)
            pvv = pvv_for(pan, DEMO_PVKI, pin)
            if len(pan_hash) != 64 or any(c not in "0123456789abcdefABCDEF" for c in pan_hash):
                raise ValueError("pan_hasher must return a 64-character hex digest")
            if not (len(pvv) == 4 and pvv.isdigit()):
                raise ValueError("pvv_for must return 4 digits")
            cards.append((pan_hash, mask_pan(pan), name, pvv))

        try:
            with _infrastructure_errors(), transaction(self._sessions, write=True) as session:
                if session.scalar(select(func.count()).select_from(Customer)):
                    return False
                now = self._clock()
                customers = {name: Customer(name=name, created_at=now) for name in DEMO_CUSTOMERS}
                session.add_all(customers.values())
                session.flush()
                session.add_all(
                    Card(
                        pan_hash=pan_hash,
                        pan_masked=pan_masked,
                        customer_id=customers[name].id,
                        pvki=DEMO_PVKI,
                        pvv=pvv,
                        status=CARD_ACTIVE,
                    )
                    for pan_hash, pan_masked, name, pvv in cards
                )
                session.add_all(
                    Bill(
                        bill_number=bill.bill_number,
                        customer_id=customers[bill.customer].id,
                        biller=bill.biller,
                        amount_due=bill.amount_due,
                        currency=DEMO_CURRENCY,
                        status=bill.status,
                        paid_at=now if bill.status == BILL_PAID else None,
                        created_at=now,
                    )
                    for bill in DEMO_BILLS
                )
                session.flush()
                return True
        except DatabaseError as exc:
            # PostgreSQL: a concurrent seeder committed the same cards first.
            if isinstance(exc.__cause__, IntegrityError):
                return False
            raise


# --------------------------------------------------------------------------------------------
# Helpers


class _infrastructure_errors:
    """``with _infrastructure_errors():`` turns a SQLAlchemy error raised in the block into
    :class:`DatabaseError` (its cause). A plain class: it is on every payment's path, and a
    generator-based context manager costs several calls more."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is not None and issubclass(kind, SQLAlchemyError):
            raise DatabaseError(f"billing database failure: {exc}") from exc


def _retry_on_conflict(attempt: Callable[[], _T]) -> _T:
    """Run a write transaction, again if it lost a unique-key race to a concurrent one.

    Each attempt starts with the replay check, so the retry returns the winner's outcome.
    """
    for _ in range(_ATTEMPTS - 1):
        try:
            with _infrastructure_errors():
                return attempt()
        except DatabaseError as exc:
            if not isinstance(exc.__cause__, IntegrityError):
                raise
    with _infrastructure_errors():
        return attempt()


def _seen(session: Session, key: str, digest: str) -> StoredResponse | None:
    row = session.execute(_RECORDED_FOR, {"keys": [key]}).first()
    return seen_row(row, key, digest)


class _Record(NamedTuple):
    """Who a ``processed_requests`` row is for."""

    key: str
    digest: str
    mti: str


def _record(
    session: Session, record: _Record, code: str, fields: Mapping[str, object], now: datetime
) -> Mapping[str, object]:
    """Insert the outcome; return the fields as a replay will read them back (JSON round trip)."""
    encoded = encode_fields(fields)
    session.add(
        ProcessedRequest(
            idempotency_key=record.key,
            mti=record.mti,
            request_digest=record.digest,
            response_code=code,
            response_json=encoded,
            created_at=now,
        )
    )
    # Flush now so a concurrent duplicate surfaces inside the transaction, not at commit.
    session.flush()
    return decode_fields(encoded)


def _posting_record(posting: Posting) -> PostingRecord:
    return PostingRecord(
        id=posting.id,
        bill_number=posting.bill_number,
        amount=posting.amount,
        currency=posting.currency,
        idempotency_key=posting.idempotency_key,
        rrn=posting.rrn,
        stan=posting.stan,
        terminal_id=posting.terminal_id,
        acquirer_id=posting.acquirer_id,
        pan_masked=posting.pan_masked,
        pan_hash=posting.pan_hash,
        source=posting.source,
        status=posting.status,
        created_at=posting.created_at,
        reversed_at=posting.reversed_at,
    )
