"""Reconciliation: does billing's ledger agree with what the gateway told acquirers?

:func:`reconcile` is pure: it compares *gateway facts* (what the gateway approved, in stand-in
or online, and what it set out to reverse, with the state of the store-and-forward entry that
carries each message) with *posting facts* (billing's postings), both keyed by the
transaction's idempotency key, and reports every disagreement. The loaders
(:func:`load_gateway_facts`, :func:`load_postings`) read those facts from the two databases
(synchronous and read-only; run them in a worker thread).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from billing.models import POSTING_POSTED, POSTING_REVERSED, Posting
from gateway.models import JournalEntry, SafEntry
from gateway.saf import KIND_ADVICE, KIND_REVERSAL, SafState
from shared.iso.codes import RC
from shared.iso.messages import (
    MTI_ADVICE,
    MTI_ADVICE_REPEAT,
    MTI_FINANCIAL,
    MTI_REVERSAL,
    MTI_REVERSAL_REPEAT,
    PC_BILL_PAYMENT,
)
from shared.store.db import DatabaseError, session_factory, transaction

__all__ = [
    "APPROVED_ONLINE",
    "APPROVED_STANDIN",
    "REVERSAL",
    "GatewayFact",
    "Mismatch",
    "PostingFact",
    "Report",
    "load_gateway_facts",
    "load_postings",
    "reconcile",
]

APPROVED_ONLINE: Final = "approved_online"
APPROVED_STANDIN: Final = "approved_standin"
REVERSAL: Final = "reversal"
_OUTCOMES: Final = frozenset({APPROVED_ONLINE, APPROVED_STANDIN, REVERSAL})

# Mismatch kinds.
MISSING_POSTING: Final = "missing_posting"
POSTING_REVERSED_UNEXPECTEDLY: Final = "posting_reversed"
AMOUNT_MISMATCH: Final = "amount_mismatch"
STANDIN_DECLINED: Final = "standin_declined_by_biller"
STANDIN_NOT_DELIVERED: Final = "standin_not_delivered"
REVERSAL_NOT_DELIVERED: Final = "reversal_not_delivered"
REVERSAL_NOT_APPLIED: Final = "reversal_not_applied"
POSTED_WITHOUT_APPROVAL: Final = "posted_without_approval"

_PENDING_STATES: Final = frozenset({SafState.QUEUED.value, SafState.IN_FLIGHT.value})
_FAILED_STATES: Final = frozenset({SafState.DEAD.value, SafState.CANCELLED.value})


@dataclass(frozen=True)
class GatewayFact:
    """Something the gateway did about transaction ``key``.

    ``outcome``: ``approved_online`` (billing approved it through the gateway),
    ``approved_standin`` (the gateway approved it alone and owes billing an advice) or
    ``reversal`` (the gateway set out to undo it). ``saf_state``/``saf_code`` are the state
    and billing's answer of the queue entry carrying the advice or reversal; None when no
    entry is involved (an online approval, an online-answered reversal, or a purged entry).
    """

    key: str
    outcome: str
    saf_state: str | None = None
    saf_code: str | None = None
    rrn: str | None = None
    amount: int | None = None

    def __post_init__(self) -> None:
        if self.outcome not in _OUTCOMES:
            raise ValueError(f"unknown gateway outcome {self.outcome!r}")
        if self.saf_state is not None:
            SafState(self.saf_state)  # ValueError for an unknown state


@dataclass(frozen=True)
class PostingFact:
    """One of billing's postings: ``status`` is ``posted`` or ``reversed``."""

    key: str
    status: str
    amount: int
    bill_number: str

    def __post_init__(self) -> None:
        if self.status not in (POSTING_POSTED, POSTING_REVERSED):
            raise ValueError(f"unknown posting status {self.status!r}")


@dataclass(frozen=True)
class Mismatch:
    """A transaction whose two sides disagree; ``kind`` names the rule, ``detail`` explains."""

    key: str
    kind: str
    detail: str


@dataclass(frozen=True)
class Report:
    """``checked`` transactions (distinct keys), ``pending`` of them still being delivered."""

    checked: int
    pending: int
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """No mismatch (pending transactions are not mismatches)."""
        return not self.mismatches

    def as_dict(self) -> dict[str, object]:
        return {
            "checked": self.checked,
            "pending": self.pending,
            "clean": self.clean,
            "mismatches": [
                {"key": m.key, "kind": m.kind, "detail": m.detail} for m in self.mismatches
            ],
        }


class _Pending:
    """Marker: the transaction's messages are still on their way."""


_PENDING: Final = _Pending()
_Verdict = Mismatch | _Pending | None


def reconcile(gateway: Iterable[GatewayFact], postings: Iterable[PostingFact]) -> Report:
    """Compare the gateway's facts with billing's postings, per transaction key.

    A transaction with a *reversal* fact is judged by it, whatever was approved before:

    * a reversal that is done (its queue entry ``done``, whatever billing answered, or
      answered online: ``saf_state`` None): any posting must be ``reversed`` or absent;
      a ``posted`` one is ``reversal_not_applied``;
    * otherwise, a posting already ``reversed`` is fine (undone by another message);
    * otherwise, a reversal still ``queued``/``in_flight``: pending;
    * otherwise (every reversal entry ``dead`` or ``cancelled``): ``reversal_not_delivered``.

    Without a reversal, an *approval in stand-in* is judged by its advice entry:

    * ``queued``/``in_flight``: pending (not a mismatch);
    * ``done`` with ``00`` (or no entry left, e.g. purged): as an online approval below;
    * ``done`` with another code: ``standin_declined_by_biller`` (the customer paid, the bill
      was not: a refund is due);
    * ``dead``/``cancelled``: ``standin_not_delivered``.

    An *approval online* needs a posting with that key (else ``missing_posting``), ``posted``
    (a reversed one without a reversal fact is ``posting_reversed``) and of the same amount
    (else ``amount_mismatch``).

    A ``posted`` posting with no approval and no reversal fact is ``posted_without_approval``
    (e.g. billing posted an ``0200`` that the acquirer was told timed out, and nothing
    reversed it). A reversed posting without any gateway fact is fine.

    ``checked`` counts distinct keys on either side; mismatches are sorted by key.
    """
    facts: dict[str, list[GatewayFact]] = {}
    for fact in gateway:
        facts.setdefault(fact.key, []).append(fact)
    booked = {p.key: p for p in postings}  # billing's key is unique
    pending = 0
    mismatches: list[Mismatch] = []
    keys = sorted(facts.keys() | booked.keys())
    for key in keys:
        verdict = _judge(key, facts.get(key, []), booked.get(key))
        if isinstance(verdict, _Pending):
            pending += 1
        elif isinstance(verdict, Mismatch):
            mismatches.append(verdict)
    return Report(checked=len(keys), pending=pending, mismatches=mismatches)


def _judge(key: str, facts: Sequence[GatewayFact], posting: PostingFact | None) -> _Verdict:
    reversals = [f for f in facts if f.outcome == REVERSAL]
    if reversals:
        return _judge_reversal(key, reversals, posting)
    standins = [f for f in facts if f.outcome == APPROVED_STANDIN]
    if standins:
        # One advice per key (the queue's key is unique); the most advanced one if the
        # caller passed several.
        advice = min(standins, key=_standin_rank)
        state = advice.saf_state
        if state in _PENDING_STATES:
            return _PENDING
        if state in _FAILED_STATES:
            return Mismatch(
                key, STANDIN_NOT_DELIVERED, f"stand-in approval's advice is {state}{_rrn(advice)}"
            )
        if state is not None and advice.saf_code != RC.APPROVED:
            return Mismatch(
                key,
                STANDIN_DECLINED,
                f"approved in stand-in, billing answered the advice {advice.saf_code}; "
                f"refund due{_rrn(advice)}",
            )
        return _judge_posting(key, advice, posting)
    onlines = [f for f in facts if f.outcome == APPROVED_ONLINE]
    if onlines:
        return _judge_posting(key, onlines[0], posting)
    if posting is not None and posting.status == POSTING_POSTED:
        return Mismatch(
            key,
            POSTED_WITHOUT_APPROVAL,
            f"bill {posting.bill_number} posted ({posting.amount}) without a gateway approval",
        )
    return None


def _judge_reversal(
    key: str, reversals: Sequence[GatewayFact], posting: PostingFact | None
) -> _Verdict:
    states = {f.saf_state for f in reversals}
    # Done: billing answered it (through the queue, or online when no entry is involved).
    if states & {None, SafState.DONE.value}:
        if posting is not None and posting.status == POSTING_POSTED:
            codes = sorted({f.saf_code or "?" for f in reversals})
            return Mismatch(
                key,
                REVERSAL_NOT_APPLIED,
                f"reversal done (billing answered {'/'.join(codes)}) but bill "
                f"{posting.bill_number} is still posted",
            )
        return None
    if posting is not None and posting.status == POSTING_REVERSED:
        return None
    if states & _PENDING_STATES:
        return _PENDING
    return Mismatch(
        key,
        REVERSAL_NOT_DELIVERED,
        f"reversal is {'/'.join(sorted(s or '' for s in states))}; posting "
        + ("absent" if posting is None else posting.status),
    )


def _judge_posting(key: str, fact: GatewayFact, posting: PostingFact | None) -> _Verdict:
    if posting is None:
        return Mismatch(key, MISSING_POSTING, f"{fact.outcome} but billing has no posting")
    if posting.status != POSTING_POSTED:
        return Mismatch(
            key,
            POSTING_REVERSED_UNEXPECTEDLY,
            f"{fact.outcome} but the posting is {posting.status} and no reversal is known",
        )
    if fact.amount is not None and fact.amount != posting.amount:
        return Mismatch(
            key, AMOUNT_MISMATCH, f"gateway approved {fact.amount}, billing posted {posting.amount}"
        )
    return None


def _standin_rank(fact: GatewayFact) -> int:
    order = (SafState.DONE, SafState.IN_FLIGHT, SafState.QUEUED, SafState.DEAD)
    for rank, state in enumerate(order):
        if fact.saf_state == state.value:
            return rank
    return len(order)


def _rrn(fact: GatewayFact) -> str:
    return f" (rrn {fact.rrn})" if fact.rrn else ""


# --------------------------------------------------------------------------------------------
# Loaders

#: Journal MTIs whose approval means "billing approved this payment through the gateway": an
#: online payment, or an acquirer's own advice the gateway forwarded.
_APPROVING_MTIS: Final = (MTI_FINANCIAL, MTI_ADVICE, MTI_ADVICE_REPEAT)


def load_gateway_facts(sessions: sessionmaker[Session]) -> list[GatewayFact]:
    """The gateway's facts, from its SAF queue and its journal.

    * every SAF advice: ``approved_standin`` under its key (the entry is written before the
      acquirer is answered, so it is the durable record of a stand-in approval);
    * every SAF reversal: ``reversal`` under the key of the transaction it undoes
      (``original_key``);
    * every approved journal row of a bill payment (``0200``, or an ``0220``/``0221`` the
      gateway forwarded) whose key has no SAF advice: ``approved_online``.

    * every approved journal row of a reversal (``0420``/``0421``) forwarded online (its key
      is no SAF entry's): ``reversal`` (done, 00) under the key of the transaction it undoes
      (the journal's ``original_key``, from field 90).

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
        for key, orig, kind, state, code, rrn, amount in s.execute(saf):
            saf_keys.add(key)
            if kind == KIND_ADVICE:
                standin_keys.add(key)
                facts.append(GatewayFact(key, APPROVED_STANDIN, state, code, rrn, amount))
            elif kind == KIND_REVERSAL and orig:
                facts.append(GatewayFact(orig, REVERSAL, state, code, rrn, amount))
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
            facts.append(GatewayFact(orig, REVERSAL, "done", "00", rrn, amount))
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
