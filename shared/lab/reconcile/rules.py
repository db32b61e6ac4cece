"""Reconciliation: was every client told 00 exactly for the payments billing holds in force?

The invariant it proves (docs/store-and-forward.md), at rest, for every transaction key
(32|41|11|7):

* a client (API or terminal) was answered 00 **if and only if** a posting for that key is
  in force at billing (posted, not reversed), unless the client itself reversed it;
* no key and no bill is posted twice;
* every reversal the network decided is applied.

:func:`reconcile` is pure. It compares three sides, all keyed by the transaction key:

* **client facts** (:class:`ClientFact`): what the acquirer answered its clients, API
  transactions and terminal pass-through alike (``acquirer`` database). Where a key has no
  client fact (the acquirer's records are not available, or another acquirer sent it), the
  gateway's answers stand in for them;
* **gateway facts** (:class:`GatewayFact`): what the gateway approved (online, or in
  stand-in with an advice to deliver) and what it set out to reverse, with the state of the
  store-and-forward entry carrying each message and who decided it (``gateway`` after a 68
  or a withheld approval, ``acquirer`` for an acquirer's own reversal);
* **postings** (:class:`PostingFact`): billing's ledger.

Every disagreement is a :class:`Mismatch` of one ``kind``; the kinds group into the three
failures of the invariant (:data:`LOST_KINDS`, :data:`ORPHAN_KINDS`, :data:`DUPLICATED`).
Transactions whose queue entries are still on their way are ``pending``, not mismatches.
The loaders are in :mod:`shared.lab.reconcile.sources`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from billing.models import POSTING_POSTED, POSTING_REVERSED
from gateway.saf_rules import ORIGIN_ACQUIRER, ORIGIN_GATEWAY, SafState
from shared.iso.codes import RC

__all__ = [
    "APPROVED_ONLINE",
    "APPROVED_STANDIN",
    "DUPLICATED",
    "LOST",
    "LOST_KINDS",
    "ORPHAN",
    "ORPHAN_KINDS",
    "REVERSAL",
    "ClientFact",
    "GatewayFact",
    "Mismatch",
    "PostingFact",
    "Report",
    "reconcile",
]

APPROVED_ONLINE: Final = "approved_online"
APPROVED_STANDIN: Final = "approved_standin"
REVERSAL: Final = "reversal"
_OUTCOMES: Final = frozenset({APPROVED_ONLINE, APPROVED_STANDIN, REVERSAL})

# Mismatch kinds.
#: A client was answered 00, and billing holds no posting in force for it.
LOST: Final = "lost"
#: Approved in stand-in, billing declined the advice: a refund is due.
STANDIN_DECLINED: Final = "standin_declined_by_biller"
#: Approved in stand-in, the advice is dead or cancelled: deliver it, or refund.
STANDIN_NOT_DELIVERED: Final = "standin_not_delivered"
#: A posting in force that no client was answered 00 for, and that nothing reverses.
ORPHAN: Final = "orphan"
#: A reversal is done (or the client was told it is), and the posting is still in force.
REVERSAL_NOT_APPLIED: Final = "reversal_not_applied"
#: A reversal is dead or cancelled, and the posting is still in force.
REVERSAL_NOT_DELIVERED: Final = "reversal_not_delivered"
#: More than one posting in force for one bill (or one key).
DUPLICATED: Final = "duplicated"
#: Approved and posted, but for another amount.
AMOUNT_MISMATCH: Final = "amount_mismatch"

#: Kinds where a client holds an approval and the biller holds no money.
LOST_KINDS: Final = frozenset({LOST, STANDIN_DECLINED, STANDIN_NOT_DELIVERED})
#: Kinds where the biller holds money no client holds an approval for.
ORPHAN_KINDS: Final = frozenset({ORPHAN, REVERSAL_NOT_APPLIED, REVERSAL_NOT_DELIVERED})

_PENDING_STATES: Final = frozenset({SafState.QUEUED.value, SafState.IN_FLIGHT.value})
_FAILED_STATES: Final = frozenset({SafState.DEAD.value, SafState.CANCELLED.value})
_KINDS_CLIENT: Final = frozenset({"payment", "advice", "reversal"})


@dataclass(frozen=True)
class ClientFact:
    """What the acquirer answered its clients for transaction ``key``.

    ``kind`` is ``payment`` (an 0200 or a terminal's own 0220) or ``reversal`` (then
    ``original_key`` names the payment it undoes). ``approved``: answered 00 at least once
    (a terminal that re-sends gets one answer per send: ``codes`` holds them all, in order).
    """

    key: str
    kind: str
    approved: bool
    codes: tuple[str, ...] = ()
    original_key: str | None = None
    rrn: str | None = None
    amount: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("payment", "reversal"):
            raise ValueError(f"unknown client fact kind {self.kind!r}")
        if self.kind == "reversal" and not self.original_key:
            raise ValueError("a reversal fact needs original_key")


@dataclass(frozen=True)
class GatewayFact:
    """Something the gateway did about transaction ``key``.

    ``outcome``: ``approved_online`` (billing approved it through the gateway),
    ``approved_standin`` (the gateway approved it alone and owes billing an advice) or
    ``reversal`` (a reversal of ``key`` went through the gateway). ``saf_state``/``saf_code``
    are the state and billing's answer of the queue entry carrying the advice or reversal;
    None when no entry is involved (an online approval, an online-answered reversal, or a
    purged entry). ``origin`` (reversals): ``gateway`` when the gateway decided it (after a
    68, or to undo an approval it withheld: the client was never told 00), ``acquirer`` when
    it carries an acquirer's own reversal (the client asked for it and was told 00).
    """

    key: str
    outcome: str
    saf_state: str | None = None
    saf_code: str | None = None
    rrn: str | None = None
    amount: int | None = None
    origin: str = ORIGIN_GATEWAY

    def __post_init__(self) -> None:
        if self.outcome not in _OUTCOMES:
            raise ValueError(f"unknown gateway outcome {self.outcome!r}")
        if self.saf_state is not None:
            SafState(self.saf_state)  # ValueError for an unknown state
        if self.origin not in (ORIGIN_GATEWAY, ORIGIN_ACQUIRER):
            raise ValueError(f"unknown origin {self.origin!r}")


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
    """A transaction whose sides disagree; ``kind`` names the rule, ``detail`` explains."""

    key: str
    kind: str
    detail: str


@dataclass(frozen=True)
class Report:
    """What :func:`reconcile` found.

    ``checked`` transactions (distinct keys), ``pending`` of them still being delivered;
    ``approved`` of them answered 00 to the client (and not reversed by the client),
    ``posted`` postings in force and ``reversed`` postings reversed at billing;
    ``journal_gaps``: keys a client was answered 00 for without a gateway approval on
    record (the journal lost a row); ``client_side``: whether client facts were given.
    """

    checked: int
    pending: int
    mismatches: list[Mismatch] = field(default_factory=list)
    approved: int = 0
    posted: int = 0
    reversed: int = 0
    journal_gaps: list[str] = field(default_factory=list)
    client_side: bool = False

    @property
    def clean(self) -> bool:
        """No mismatch (pending transactions and journal gaps are not mismatches)."""
        return not self.mismatches

    def count(self, kinds: frozenset[str] | str) -> int:
        wanted = frozenset({kinds}) if isinstance(kinds, str) else kinds
        return sum(1 for m in self.mismatches if m.kind in wanted)

    @property
    def lost(self) -> int:
        """Approved to a client, no posting in force (every kind of :data:`LOST_KINDS`)."""
        return self.count(LOST_KINDS)

    @property
    def orphans(self) -> int:
        """Postings in force without a client's approval (:data:`ORPHAN_KINDS`)."""
        return self.count(ORPHAN_KINDS)

    @property
    def duplicated(self) -> int:
        return self.count(DUPLICATED)

    def as_dict(self) -> dict[str, object]:
        return {
            "checked": self.checked,
            "pending": self.pending,
            "clean": self.clean,
            "client_side": self.client_side,
            "approved": self.approved,
            "posted": self.posted,
            "reversed": self.reversed,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "orphans": self.orphans,
            "journal_gaps": len(self.journal_gaps),
            "journal_gap_keys": self.journal_gaps[:20],
            "mismatches": [
                {"key": m.key, "kind": m.kind, "detail": m.detail} for m in self.mismatches
            ],
        }


class _Pending:
    """Marker: the transaction's messages are still on their way."""


_PENDING: Final = _Pending()
_Verdict = Mismatch | _Pending | None


@dataclass
class _Key:
    """Everything known about one transaction key."""

    client: list[ClientFact] = field(default_factory=list)
    client_reversals: list[ClientFact] = field(default_factory=list)
    gateway: list[GatewayFact] = field(default_factory=list)
    postings: list[PostingFact] = field(default_factory=list)


def reconcile(
    gateway: Iterable[GatewayFact],
    postings: Iterable[PostingFact],
    clients: Iterable[ClientFact] | None = None,
) -> Report:
    """Judge every transaction key against the invariant (see the module docstring).

    ``clients`` None means the acquirer's records are not available: the gateway's
    approvals then stand for what the clients were told. Per key:

    1. **The client reversed it** (a client reversal answered 00, or an acquirer's reversal
       the gateway took over): no posting may be in force. A posting in force is pending
       while a reversal is queued, ``reversal_not_applied`` when one is done, else
       ``reversal_not_delivered``.
    2. **The client was answered 00** (or, without its fact, the gateway approved it): a
       stand-in advice still queued is pending; one declined by billing is
       ``standin_declined_by_biller``, one dead or cancelled ``standin_not_delivered``.
       Otherwise a posting must be in force, and of the same amount (else
       ``amount_mismatch``). Without one it is ``lost`` (the detail says whether the
       gateway's own reversal undid it); with one that a queued gateway reversal is about to
       undo, it is ``lost`` too (cancel that reversal).
    3. **The client was not answered 00**: a posting in force is pending while a reversal
       is queued, ``reversal_not_applied`` when a reversal is done, ``reversal_not_delivered``
       when it is dead or cancelled, else ``orphan``.

    And across keys: a bill (or a key) with more than one posting in force is
    ``duplicated``. ``checked`` counts distinct keys; mismatches are sorted by key.
    """
    client_list = None if clients is None else list(clients)
    keys: dict[str, _Key] = {}

    def at(key: str) -> _Key:
        found = keys.get(key)
        if found is None:
            found = keys[key] = _Key()
        return found

    for fact in gateway:
        at(fact.key).gateway.append(fact)
    posting_list = list(postings)
    for posting in posting_list:
        at(posting.key).postings.append(posting)
    for cf in client_list or ():
        if cf.kind == "reversal":
            assert cf.original_key is not None
            at(cf.original_key).client_reversals.append(cf)
        else:
            at(cf.key).client.append(cf)

    pending = approved = 0
    mismatches: list[Mismatch] = []
    gaps: list[str] = []
    for key in sorted(keys):
        known = keys[key]
        verdict, was_approved = _judge(key, known, client_list is not None)
        approved += was_approved
        if isinstance(verdict, _Pending):
            pending += 1
        elif isinstance(verdict, Mismatch):
            mismatches.append(verdict)
        if any(c.approved for c in known.client) and not any(
            f.outcome in (APPROVED_ONLINE, APPROVED_STANDIN) for f in known.gateway
        ):
            gaps.append(key)
    mismatches.extend(_duplicates(posting_list))
    mismatches.sort(key=lambda m: (m.key, m.kind))
    return Report(
        checked=len(keys),
        pending=pending,
        mismatches=mismatches,
        approved=approved,
        posted=sum(p.status == POSTING_POSTED for p in posting_list),
        reversed=sum(p.status == POSTING_REVERSED for p in posting_list),
        journal_gaps=gaps,
        client_side=client_list is not None,
    )


def _judge(key: str, known: _Key, client_side: bool) -> tuple[_Verdict, bool]:
    """The verdict on one key, and whether its client holds an approval in force."""
    posting = _in_force(known.postings) or (known.postings[0] if known.postings else None)
    in_force = posting is not None and posting.status == POSTING_POSTED
    reversals = [f for f in known.gateway if f.outcome == REVERSAL]
    mine = [f for f in reversals if f.origin == ORIGIN_GATEWAY]
    approvals = [f for f in known.gateway if f.outcome in (APPROVED_ONLINE, APPROVED_STANDIN)]

    client_reversed = any(c.approved for c in known.client_reversals) or any(
        f.origin == ORIGIN_ACQUIRER for f in reversals
    )
    if client_reversed:
        if not in_force:
            return None, False
        return _undo_verdict(key, reversals, posting, "the client reversed it"), False

    # The client's own record decides; without one, what the gateway approved.
    client_approved = any(c.approved for c in known.client) if known.client else bool(approvals)
    if not client_approved:
        if not in_force:
            return None, False
        if reversals:
            return _undo_verdict(key, reversals, posting, "the client was not told 00"), False
        assert posting is not None
        who = "the client" if known.client else "no client"
        return (
            Mismatch(
                key,
                ORPHAN,
                f"bill {posting.bill_number} posted ({posting.amount}) but {who} was answered "
                f"00{_codes(known.client)} and nothing reverses it",
            ),
            False,
        )

    standins = [f for f in approvals if f.outcome == APPROVED_STANDIN]
    if standins:
        advice = min(standins, key=_standin_rank)
        state = advice.saf_state
        if state in _PENDING_STATES and not in_force:
            return _PENDING, True
        if state in _FAILED_STATES and not in_force:
            return (
                Mismatch(
                    key,
                    STANDIN_NOT_DELIVERED,
                    f"approved in stand-in, the advice is {state}: deliver it or refund"
                    f"{_rrn(advice)}",
                ),
                True,
            )
        declined = state is not None and state not in _PENDING_STATES
        if declined and advice.saf_code != RC.APPROVED and not in_force:
            return (
                Mismatch(
                    key,
                    STANDIN_DECLINED,
                    f"approved in stand-in, billing answered the advice {advice.saf_code}: "
                    f"refund due{_rrn(advice)}",
                ),
                True,
            )
    if not in_force:
        if mine:
            detail = (
                "the client was answered 00, but the gateway's own reversal (after a 68 "
                "the client did not keep) undid the posting"
            )
        elif posting is not None:
            detail = (
                "the client was answered 00, but the posting is reversed and no client reversed it"
            )
        else:
            detail = "the client was answered 00, but billing has no posting"
        return Mismatch(key, LOST, detail + _rrn_of(known)), True
    assert posting is not None
    if any(f.saf_state in _PENDING_STATES for f in mine):
        return (
            Mismatch(
                key,
                LOST,
                "the client was answered 00, and a queued gateway reversal is about to undo "
                f"the posting: cancel that reversal (paylab saf cancel){_rrn_of(known)}",
            ),
            True,
        )
    amount = next((f.amount for f in approvals if f.amount is not None), None)
    if amount is None:
        amount = next((c.amount for c in known.client if c.amount is not None), None)
    if amount is not None and amount != posting.amount:
        return (
            Mismatch(key, AMOUNT_MISMATCH, f"approved {amount}, billing posted {posting.amount}"),
            True,
        )
    return None, True


def _undo_verdict(
    key: str, reversals: Sequence[GatewayFact], posting: PostingFact | None, why: str
) -> _Verdict:
    """A posting in force that must be undone: pending, not applied, or not delivered."""
    assert posting is not None
    states = {f.saf_state for f in reversals}
    if states & _PENDING_STATES:
        return _PENDING
    if states & {None, SafState.DONE.value}:
        codes = sorted({f.saf_code or "?" for f in reversals})
        return Mismatch(
            key,
            REVERSAL_NOT_APPLIED,
            f"{why}; the reversal is done (billing answered {'/'.join(codes)}) but bill "
            f"{posting.bill_number} is still posted",
        )
    if reversals:
        return Mismatch(
            key,
            REVERSAL_NOT_DELIVERED,
            f"{why}; the reversal is {'/'.join(sorted(s or '' for s in states))} and bill "
            f"{posting.bill_number} is still posted: retry it (paylab saf retry)",
        )
    return Mismatch(
        key,
        REVERSAL_NOT_DELIVERED,
        f"{why}, but no reversal reached the gateway and bill {posting.bill_number} is still "
        "posted",
    )


def _duplicates(postings: Sequence[PostingFact]) -> list[Mismatch]:
    """One mismatch per bill or key with more than one posting in force."""
    by_bill: dict[str, list[str]] = {}
    by_key: dict[str, int] = {}
    for p in postings:
        if p.status == POSTING_POSTED:
            by_bill.setdefault(p.bill_number, []).append(p.key)
            by_key[p.key] = by_key.get(p.key, 0) + 1
    out = [
        Mismatch(sorted(keys)[1], DUPLICATED, f"bill {bill} posted {len(keys)} times: {keys}")
        for bill, keys in by_bill.items()
        if len(keys) > 1
    ]
    out.extend(
        Mismatch(key, DUPLICATED, f"posted {n} times under one key")
        for key, n in by_key.items()
        if n > 1
    )
    return out


def _in_force(postings: Sequence[PostingFact]) -> PostingFact | None:
    return next((p for p in postings if p.status == POSTING_POSTED), None)


def _standin_rank(fact: GatewayFact) -> int:
    order = (SafState.DONE, SafState.IN_FLIGHT, SafState.QUEUED, SafState.DEAD)
    for rank, state in enumerate(order):
        if fact.saf_state == state.value:
            return rank
    return len(order)


def _codes(client: Sequence[ClientFact]) -> str:
    codes = [code for c in client for code in c.codes]
    return f" (answered {'/'.join(codes)})" if codes else ""


def _rrn(fact: GatewayFact) -> str:
    return f" (rrn {fact.rrn})" if fact.rrn else ""


def _rrn_of(known: _Key) -> str:
    rrn = next((f.rrn for f in known.gateway if f.rrn), None) or next(
        (c.rrn for c in known.client if c.rrn), None
    )
    return f" (rrn {rrn})" if rrn else ""
