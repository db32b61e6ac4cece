"""Reconciliation's sources: the three sides read from their databases.

:func:`load_client_facts` (the acquirer's records), :func:`load_gateway_facts` (the
gateway's journal and queue) and :func:`load_postings` (billing's ledger) are synchronous
and read-only: run them in a worker thread. :func:`reconcile_databases` reads all three
and judges them with :func:`shared.lab.reconcile.rules.reconcile`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from sqlalchemy import Engine, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from acquirer.models import Transaction
from billing.models import Posting
from gateway.models import JournalEntry, SafEntry
from gateway.saf_rules import KIND_ADVICE, KIND_REVERSAL, ORIGIN_ACQUIRER, ORIGIN_GATEWAY
from shared.iso.messages import (
    MTI_ADVICE,
    MTI_ADVICE_REPEAT,
    MTI_FINANCIAL,
    MTI_REVERSAL,
    MTI_REVERSAL_REPEAT,
    PC_BILL_PAYMENT,
)
from shared.lab.reconcile.rules import (
    APPROVED_ONLINE,
    APPROVED_STANDIN,
    REVERSAL,
    ClientFact,
    GatewayFact,
    PostingFact,
    Report,
    reconcile,
)
from shared.store.db import DatabaseError, make_engine, session_factory, transaction

__all__ = [
    "load_client_facts",
    "load_gateway_facts",
    "load_postings",
    "reconcile_databases",
]

#: What a client's record may be about (inquiries change nothing and are not recorded).
_KINDS_CLIENT: Final = frozenset({"payment", "advice", "reversal"})

#: Journal MTIs whose approval means "billing approved this payment through the gateway": an
#: online payment, or an acquirer's own advice the gateway forwarded.
_APPROVING_MTIS: Final = (MTI_FINANCIAL, MTI_ADVICE, MTI_ADVICE_REPEAT)


def load_gateway_facts(sessions: sessionmaker[Session]) -> list[GatewayFact]:
    """The gateway's facts, from its SAF queue and its journal.

    * every SAF advice: ``approved_standin`` under its key, if the gateway decided it (the
      entry is written before the acquirer is answered, so it is the durable record of a
      stand-in approval); an acquirer's own advice the gateway took over:
      ``approved_online`` (the acquirer approved it, the gateway delivers it);
    * every SAF reversal: ``reversal`` under the key of the transaction it undoes
      (``original_key``), with its origin;
    * every approved journal row of a bill payment (``0200``, or an ``0220``/``0221`` the
      gateway forwarded) whose key has no SAF advice: ``approved_online``;
    * every approved journal row of a reversal (``0420``/``0421``) forwarded online (its key
      is no SAF entry's): ``reversal`` (done, 00, origin acquirer) under the key of the
      transaction it undoes (the journal's ``original_key``, from field 90).

    Raises:
        DatabaseError: the database failed.
    """
    facts: list[GatewayFact] = []
    standin_keys: set[str] = set()
    saf = select(
        SafEntry.idempotency_key,
        SafEntry.original_key,
        SafEntry.kind,
        SafEntry.state,
        SafEntry.response_code,
        SafEntry.rrn,
        SafEntry.amount,
        SafEntry.origin,
    ).order_by(SafEntry.id)
    journal = (
        select(JournalEntry.idempotency_key, JournalEntry.rrn, JournalEntry.amount)
        .where(
            JournalEntry.status == "approved",
            JournalEntry.mti.in_(_APPROVING_MTIS),
            JournalEntry.processing_code == PC_BILL_PAYMENT,
        )
        .order_by(JournalEntry.id)
    )
    reversals = (
        select(
            JournalEntry.idempotency_key,
            JournalEntry.original_key,
            JournalEntry.rrn,
            JournalEntry.amount,
        )
        .where(
            JournalEntry.status == "approved",
            JournalEntry.mti.in_((MTI_REVERSAL, MTI_REVERSAL_REPEAT)),
            JournalEntry.original_key.is_not(None),
        )
        .order_by(JournalEntry.id)
    )
    saf_keys: set[str] = set()
    with _db_errors(), transaction(sessions, write=False) as s:
        for key, orig, kind, state, code, rrn, amount, origin in s.execute(saf):
            saf_keys.add(key)
            origin = origin or ORIGIN_GATEWAY
            if kind == KIND_ADVICE:
                standin_keys.add(key)
                outcome = APPROVED_STANDIN if origin == ORIGIN_GATEWAY else APPROVED_ONLINE
                facts.append(GatewayFact(key, outcome, state, code, rrn, amount))
            elif kind == KIND_REVERSAL and orig:
                facts.append(GatewayFact(orig, REVERSAL, state, code, rrn, amount, origin))
        seen: set[str] = set()
        for key, rrn, amount in s.execute(journal):
            if key in standin_keys or key in seen:  # repeats journal one row each
                continue
            seen.add(key)
            facts.append(GatewayFact(key, APPROVED_ONLINE, None, None, rrn, amount))
        for key, orig, rrn, amount in s.execute(reversals):
            # A reversal the gateway queued is judged by its queue entry, not its journal row.
            if key in saf_keys or key in seen or orig is None:
                continue
            seen.add(key)
            facts.append(GatewayFact(orig, REVERSAL, "done", "00", rrn, amount, ORIGIN_ACQUIRER))
    return facts


def load_client_facts(acquirer: Engine | sessionmaker[Session]) -> list[ClientFact] | None:
    """What the acquirer answered its clients (API and terminals), one fact per key.

    Returns None when the acquirer's database has no records table (it never ran there):
    reconciliation then judges by the gateway's answers alone.

    Raises:
        DatabaseError: the database failed.
    """
    sessions = session_factory(acquirer) if isinstance(acquirer, Engine) else acquirer
    q = (
        select(
            Transaction.idempotency_key,
            Transaction.kind,
            Transaction.status,
            Transaction.response_code,
            Transaction.original_key,
            Transaction.rrn,
            Transaction.amount,
        )
        .where(Transaction.idempotency_key.is_not(None), Transaction.kind.in_(_KINDS_CLIENT))
        .order_by(Transaction.created_at, Transaction.id)
    )
    grouped: dict[tuple[str, str], list[tuple[str, str | None, str | None, str, int]]] = {}
    with _db_errors(), transaction(sessions, write=False) as s:
        if not inspect(s.connection()).has_table(Transaction.__tablename__):
            return None
        for key, kind, status, code, orig, rrn, amount in s.execute(q):
            assert key is not None  # selected so
            cls = "reversal" if kind == "reversal" else "payment"
            grouped.setdefault((key, cls), []).append((status, code, orig, rrn, amount))
    facts = []
    for (key, cls), rows in grouped.items():
        orig = next((r[2] for r in rows if r[2]), None)
        if cls == "reversal" and not orig:
            continue  # a reversal naming no original (bad field 90): nothing to pair
        facts.append(
            ClientFact(
                key=key,
                kind=cls,
                approved=any(r[0] == "approved" for r in rows),
                codes=tuple(r[1] or "--" for r in rows),
                original_key=orig if cls == "reversal" else None,
                rrn=rows[0][3],
                amount=rows[0][4],
            )
        )
    return facts


@contextmanager
def _db_errors() -> Iterator[None]:
    try:
        yield
    except SQLAlchemyError as exc:
        raise DatabaseError(f"reconciliation read failed: {exc}") from exc


def load_postings(billing: Engine | sessionmaker[Session]) -> list[PostingFact]:
    """Billing's postings (posted and reversed), from its database.

    Raises:
        DatabaseError: the database failed.
    """
    sessions = session_factory(billing) if isinstance(billing, Engine) else billing
    q = select(
        Posting.idempotency_key, Posting.status, Posting.amount, Posting.bill_number
    ).order_by(Posting.id)
    with _db_errors(), transaction(sessions, write=False) as s:
        return [PostingFact(*row) for row in s.execute(q)]


def reconcile_databases(
    gateway_url: str, billing_url: str, acquirer_url: str | None = None
) -> Report:
    """Load the three sides from their databases and :func:`reconcile` them.

    ``acquirer_url`` None, or a SQLite file that does not exist, means no client facts.

    Raises:
        DatabaseError: a database failed.
    """
    for name, url in (("gateway", gateway_url), ("billing", billing_url)):
        if _missing_sqlite(url):
            # Opening it would create an empty file: a vanished ledger must be said, not
            # reconciled against nothing.
            raise DatabaseError(f"{name}'s database {make_url(url).database} does not exist")
    engines: list[Engine] = []
    try:
        gateway_engine = make_engine(gateway_url)
        engines.append(gateway_engine)
        billing_engine = make_engine(billing_url)
        engines.append(billing_engine)
        clients: list[ClientFact] | None = None
        if acquirer_url is not None and not _missing_sqlite(acquirer_url):
            acquirer_engine = make_engine(acquirer_url)
            engines.append(acquirer_engine)
            clients = load_client_facts(acquirer_engine)
        return reconcile(
            load_gateway_facts(session_factory(gateway_engine)),
            load_postings(billing_engine),
            clients,
        )
    finally:
        for engine in engines:
            engine.dispose()


def _missing_sqlite(url: str) -> bool:
    """True for the URL of a SQLite file that does not exist."""
    parsed = make_url(url)
    return (
        parsed.get_backend_name() == "sqlite"
        and parsed.database is not None
        and not Path(parsed.database).exists()
    )
