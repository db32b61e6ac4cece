"""The posting rules of the billing host, pure: what each request decides.

The values the ledger takes and gives (:class:`PaymentRequest`, :class:`PaymentResult`,
:class:`ReversalRequest`, :class:`ReversalResult`, ...), and the decisions made on them
without any I/O: :func:`decide` (a new payment against its bill), :func:`seen_row` (what a
repeat gets from its record), the recorded fields' encoding, the posting row. The store
that applies them in transactions is :mod:`billing.store`.

Idempotency
    Every request that can change something (payment, advice, reversal, a decline decided by
    the handler) is recorded in ``processed_requests`` under its idempotency key together with
    a digest of its business content and its first outcome, approval or decline. A repeat with
    the same key and digest gets that outcome back (``replayed=True``) and changes nothing; the
    same key with a different digest is answered ``94`` (duplicate transmission), which is not
    stored, so the original answer stays replayable. The digest must therefore cover the
    business content only, not the MTI's repeat flag (``0221`` repeating ``0220``, ``0421``
    repeating ``0420``) nor transmission times. Inquiries change nothing and are not recorded.
    An approval is replayed only while its posting is in force: the repeat of a reversed
    payment is answered ``12`` (:data:`RC_REVERSED_REPEAT`).

Response codes (strings, from the project's response-code table): ``00`` approved, ``12``
invalid transaction, ``13`` invalid amount, ``14`` no such card, ``25`` unable to locate
record, ``55`` wrong PIN, ``88`` bill already paid, ``94`` duplicate transmission.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Final, Protocol

from billing.models import (
    BILL_PAID,
    POSTING_POSTED,
    POSTING_REVERSED,
    SOURCE_ADVICE,
    SOURCE_ONLINE,
)
from shared.iso.codes import RC
from shared.store.db import DatabaseError

__all__ = [
    "ADVICE_MTIS",
    "ONLINE_MTIS",
    "RC_ALREADY_PAID",
    "RC_APPROVED",
    "RC_DUPLICATE",
    "RC_INVALID_AMOUNT",
    "RC_INVALID_TRANSACTION",
    "RC_NO_SUCH_CARD",
    "RC_REVERSED_REPEAT",
    "RC_UNKNOWN_BILL",
    "RC_WRONG_PIN",
    "REVERSAL_MTIS",
    "REVERSED_BEFORE_POSTING",
    "CardRef",
    "InquiryResult",
    "PaymentRequest",
    "PaymentResult",
    "PostingRecord",
    "ReversalRequest",
    "ReversalResult",
    "StoredResponse",
]

# Plain strings (not the enum members) so they compare, serialize and bind everywhere alike.
RC_APPROVED: Final[str] = RC.APPROVED.value
RC_INVALID_TRANSACTION: Final[str] = RC.INVALID_TRANSACTION.value
RC_INVALID_AMOUNT: Final[str] = RC.INVALID_AMOUNT.value
RC_NO_SUCH_CARD: Final[str] = RC.NO_SUCH_CARD.value
RC_UNKNOWN_BILL: Final[str] = RC.UNKNOWN_BILL.value
RC_WRONG_PIN: Final[str] = RC.WRONG_PIN.value
RC_ALREADY_PAID: Final[str] = RC.BILL_ALREADY_PAID.value
RC_DUPLICATE: Final[str] = RC.DUPLICATE.value

ONLINE_MTIS: Final = frozenset({"0200"})
ADVICE_MTIS: Final = frozenset({"0220", "0221"})
REVERSAL_MTIS: Final = frozenset({"0420", "0421"})

#: The answer to a repeat of a payment whose posting has been reversed: ``12`` (invalid
#: transaction), as for a payment whose reversal arrived first (the tombstone below). Both
#: mean "this transaction was reversed": it can never be approved again, and its approval is
#: never replayed. See docs/message-spec.md.
RC_REVERSED_REPEAT: Final[str] = RC_INVALID_TRANSACTION

#: ``request_digest`` of the tombstone stored under a payment's key when its reversal arrived
#: first. It matches any digest: whatever the late payment looks like, it replays the ``12``.
REVERSED_BEFORE_POSTING: Final = "reversed-before-posting"

_MAX_KEY_LENGTH: Final = 64


# --------------------------------------------------------------------------------------------
# Results and requests


@dataclass(frozen=True, slots=True)
class CardRef:
    """What the handler needs to verify a card's PIN; never the PAN itself."""

    card_id: int
    customer_id: int
    pan_masked: str
    pvki: str
    pvv: str
    #: ``"active"`` or ``"blocked"``; the handler decides what a blocked card gets.
    status: str


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """An outcome recorded in ``processed_requests`` (or the ``94`` answer to a clash with one).

    ``replayed`` is True when the outcome was recorded by an earlier request and is returned
    again; False when it was recorded just now (:meth:`BillingStore.record_decline`) or for a
    ``94``, which answers a key reused with different content and is never stored.
    """

    idempotency_key: str
    mti: str
    code: str
    fields: Mapping[str, object]
    replayed: bool


@dataclass(frozen=True, slots=True)
class InquiryResult:
    """Answer to a bill inquiry. Amount, currency, biller and name are None for ``25``."""

    code: str
    bill_number: str
    amount_due: int | None
    currency: str | None
    biller: str | None
    customer_name: str | None

    @property
    def approved(self) -> bool:
        return self.code == RC_APPROVED


def check_key(name: str, value: str) -> None:
    if not value or len(value) > _MAX_KEY_LENGTH:
        raise ValueError(f"{name} must be 1..{_MAX_KEY_LENGTH} characters, got {value!r}")


@dataclass(frozen=True, slots=True)
class PaymentRequest:
    """A bill payment: an online request (``0200``) or an advice (``0220``/``0221``).

    ``pan_hash`` is the keyed hash of the PAN and ``pan_masked`` its masked form; the clear PAN
    never reaches the store.
    """

    idempotency_key: str
    request_digest: str
    bill_number: str
    amount: int
    currency: str
    rrn: str
    stan: str
    terminal_id: str
    acquirer_id: str
    pan_hash: str
    pan_masked: str
    mti: str

    def __post_init__(self) -> None:
        check_key("idempotency_key", self.idempotency_key)
        check_key("request_digest", self.request_digest)
        if self.mti not in ONLINE_MTIS | ADVICE_MTIS:
            raise ValueError(f"not a payment MTI: {self.mti!r}")

    @property
    def is_advice(self) -> bool:
        return self.mti in ADVICE_MTIS


@dataclass(frozen=True, slots=True)
class PaymentResult:
    """Outcome of :meth:`BillingStore.pay`.

    ``amount`` and ``currency`` echo the request; ``amount_due``, ``biller`` and
    ``customer_name`` describe the bill when it exists; ``posting_id`` is set for ``00`` only.
    ``replayed`` is True when this is the stored outcome of an earlier identical request (or
    the ``12`` tombstone of a reversal that arrived first): nothing was posted this time.
    ``fields`` is the recorded response object itself (keys ``bill_number``, ``amount``,
    ``currency``, ``amount_due``, ``biller``, ``customer_name``, ``posting_id`` as far as
    known); it is empty for a ``94``.
    """

    code: str
    bill_number: str
    amount: int
    currency: str
    amount_due: int | None
    biller: str | None
    customer_name: str | None
    posting_id: int | None
    replayed: bool
    fields: Mapping[str, object]

    @property
    def approved(self) -> bool:
        return self.code == RC_APPROVED


@dataclass(frozen=True, slots=True)
class ReversalRequest:
    """A reversal (``0420``/``0421``) of the payment whose idempotency key is ``original_key``."""

    idempotency_key: str
    request_digest: str
    original_key: str
    amount: int
    mti: str

    def __post_init__(self) -> None:
        check_key("idempotency_key", self.idempotency_key)
        check_key("request_digest", self.request_digest)
        check_key("original_key", self.original_key)
        if self.mti not in REVERSAL_MTIS:
            raise ValueError(f"not a reversal MTI: {self.mti!r}")
        if self.idempotency_key == self.original_key:
            # The reversal's replay check would return the payment's own recorded answer.
            raise ValueError("a reversal needs a key of its own, distinct from original_key")


@dataclass(frozen=True, slots=True)
class ReversalResult:
    """Outcome of :meth:`BillingStore.reverse`; ``bill_number`` and ``posting_id`` if found.

    ``fields`` is the recorded response object (keys ``original_key``, ``amount`` and, when a
    posting was found, ``bill_number`` and ``posting_id``).
    """

    code: str
    original_key: str
    amount: int
    bill_number: str | None
    posting_id: int | None
    replayed: bool
    fields: Mapping[str, object]

    @property
    def approved(self) -> bool:
        return self.code == RC_APPROVED


@dataclass(frozen=True, slots=True)
class PostingRecord:
    """A row of ``postings``, for tests and reconciliation."""

    id: int
    bill_number: str
    amount: int
    currency: str
    idempotency_key: str
    rrn: str
    stan: str
    terminal_id: str
    acquirer_id: str
    pan_masked: str
    pan_hash: str
    source: str
    status: str
    created_at: datetime
    reversed_at: datetime | None


# --------------------------------------------------------------------------------------------
# Decisions


class _Recorded(Protocol):
    """A ``processed_requests`` row: the ORM object or a row of its columns."""

    @property
    def idempotency_key(self) -> str: ...
    @property
    def mti(self) -> str: ...
    @property
    def request_digest(self) -> str: ...
    @property
    def response_code(self) -> str: ...
    @property
    def response_json(self) -> str: ...


def seen_row(
    row: _Recorded | None, key: str, digest: str, posting_status: str | None = None
) -> StoredResponse | None:
    """The outcome a repeat of ``key`` gets from its ``processed_requests`` row (see replay).

    ``posting_status`` is the status of the posting made under ``key``; when not given, it is
    read from the row itself (a row of :data:`_RECORDED_FOR`) if it has it. A recorded
    approval whose posting has been reversed since replays as ``12`` (the transaction was
    reversed, see :data:`RC_REVERSED_REPEAT`), without an approval code: an approval is
    only ever replayed for a posting in force.
    """
    if row is None:
        return None
    if row.request_digest not in (digest, REVERSED_BEFORE_POSTING):
        return StoredResponse(key, row.mti, RC_DUPLICATE, MappingProxyType({}), replayed=False)
    fields = decode_fields(row.response_json)
    if posting_status is None:
        posting_status = getattr(row, "posting_status", None)
    if row.response_code == RC_APPROVED and posting_status == POSTING_REVERSED:
        kept = {k: v for k, v in fields.items() if k != "posting_id"}
        kept["reversed"] = True
        return StoredResponse(
            row.idempotency_key, row.mti, RC_REVERSED_REPEAT, MappingProxyType(kept), True
        )
    return StoredResponse(row.idempotency_key, row.mti, row.response_code, fields, True)


# One encoder for every record: json.dumps with options builds a new encoder per call.
_ENCODER: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def encode_fields(fields: Mapping[str, object]) -> str:
    """The recorded fields as stored: compact JSON, keys sorted (a replay is byte-identical)."""
    return _ENCODER.encode(dict(fields))


def decode_fields(text: str) -> Mapping[str, object]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise DatabaseError(f"processed_requests.response_json is not an object: {text!r}")
    return MappingProxyType(value)


def _opt_int(fields: Mapping[str, object], key: str) -> int | None:
    value = fields.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _opt_str(fields: Mapping[str, object], key: str) -> str | None:
    value = fields.get(key)
    return value if isinstance(value, str) else None


def payment_result(
    request: PaymentRequest, code: str, fields: Mapping[str, object], *, replayed: bool
) -> PaymentResult:
    # Fresh and replayed answers are both built from the recorded fields, so they are equal
    # but for the flag. Fields a record lacks (94, tombstone) fall back to the request's.
    amount = _opt_int(fields, "amount")
    return PaymentResult(
        code=code,
        bill_number=_opt_str(fields, "bill_number") or request.bill_number,
        amount=request.amount if amount is None else amount,
        currency=_opt_str(fields, "currency") or request.currency,
        amount_due=_opt_int(fields, "amount_due"),
        biller=_opt_str(fields, "biller"),
        customer_name=_opt_str(fields, "customer_name"),
        posting_id=_opt_int(fields, "posting_id"),
        replayed=replayed,
        fields=fields,
    )


def reversal_result(
    request: ReversalRequest, code: str, fields: Mapping[str, object], *, replayed: bool
) -> ReversalResult:
    amount = _opt_int(fields, "amount")
    return ReversalResult(
        code=code,
        original_key=_opt_str(fields, "original_key") or request.original_key,
        amount=request.amount if amount is None else amount,
        bill_number=_opt_str(fields, "bill_number"),
        posting_id=_opt_int(fields, "posting_id"),
        replayed=replayed,
        fields=fields,
    )


@dataclass(slots=True)
class BillRow:
    """What a batch of payments reads of a bill (``status`` changes as the batch posts)."""

    bill_number: str
    biller: str
    amount_due: int
    currency: str
    status: str
    customer_name: str | None


def decide(request: PaymentRequest, bill: BillRow | None) -> tuple[str, dict[str, object]]:
    """The outcome of one new payment request, and the fields recorded with it."""
    fields: dict[str, object] = {
        "bill_number": request.bill_number,
        "amount": request.amount,
        "currency": request.currency,
    }
    if bill is None:
        return RC_UNKNOWN_BILL, fields
    fields |= {
        "amount_due": bill.amount_due,
        "biller": bill.biller,
        "customer_name": bill.customer_name,
    }
    if bill.status == BILL_PAID:
        return RC_ALREADY_PAID, fields
    if request.amount != bill.amount_due or request.currency != bill.currency:
        return RC_INVALID_AMOUNT, fields
    return RC_APPROVED, fields


def posting_values(request: PaymentRequest, created_at: object) -> tuple[object, ...]:
    """The ``postings`` row of an approved payment, in the column order of the store's insert:
    bill_number, amount, currency, idempotency_key, rrn, stan, terminal_id, acquirer_id,
    pan_masked, pan_hash, source, status, created_at (as the dialect takes it)."""
    return (
        request.bill_number,
        request.amount,
        request.currency,
        request.idempotency_key,
        request.rrn,
        request.stan,
        request.terminal_id,
        request.acquirer_id,
        request.pan_masked,
        request.pan_hash,
        SOURCE_ADVICE if request.is_advice else SOURCE_ONLINE,
        POSTING_POSTED,
        created_at,
    )
