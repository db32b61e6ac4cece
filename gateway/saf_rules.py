"""The gateway's store-and-forward (SAF) queue: its rules (pure, no I/O).

What it is for
    When the gateway approves a payment in stand-in (billing unreachable) it owes billing a
    ``0220`` advice; when an ``0200`` ended in ``68`` (sent, no answer: billing may have
    posted it), or an acquirer reversed a payment, it owes billing a ``0420`` reversal. Those
    messages are queued *before* the acquirer is answered and repeated (``0221``, ``0421``)
    until billing gives a final answer. Billing processes both idempotently, so a repeat
    can never post or reverse twice.

Here
    :class:`SafState` and :data:`ALLOWED` (the state machine), :func:`check_transition`,
    :func:`repeat_mti` and :func:`after_attempt`, which turns one delivery attempt into an
    :class:`Outcome`; the queue's vocabulary (kinds, origins, priorities) and its values
    (:class:`NewEntry`, :class:`SafView`, :class:`Claimed`, :class:`SafStats`). The storage
    is :mod:`gateway.saf_store`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from shared.errors import PaylabError
from shared.iso.codes import is_transient
from shared.iso.messages import (
    MTI_ADVICE,
    MTI_ADVICE_REPEAT,
    MTI_REVERSAL,
    MTI_REVERSAL_REPEAT,
)

__all__ = [
    "ACTIVE_STATES",
    "ALLOWED",
    "FIRST_MTI",
    "KIND_ADVICE",
    "KIND_REVERSAL",
    "ORIGINS",
    "ORIGIN_ACQUIRER",
    "ORIGIN_GATEWAY",
    "PRIORITIES",
    "PRIORITY_ADVICE",
    "PRIORITY_REVERSAL",
    "PURGEABLE_STATES",
    "Claimed",
    "NewEntry",
    "Outcome",
    "QueueFull",
    "SafState",
    "SafStats",
    "SafTransitionError",
    "SafView",
    "after_attempt",
    "check_text",
    "check_transition",
    "repeat_mti",
]


class SafState(StrEnum):
    """Where a queue entry stands."""

    QUEUED = "queued"  # waiting for its next attempt (due at next_attempt_at)
    IN_FLIGHT = "in_flight"  # leased by a forwarder that is sending it
    DONE = "done"  # billing gave a final answer (00 or a business decline)
    DEAD = "dead"  # attempts or age exhausted; waits for an operator
    CANCELLED = "cancelled"  # an operator gave up on it; never sent again


#: Every allowed state change. ``dead -> queued`` is an operator's retry; ``in_flight ->
#: queued`` another attempt later. ``done`` and ``cancelled`` are final.
ALLOWED: Final[Mapping[SafState, frozenset[SafState]]] = MappingProxyType(
    {
        SafState.QUEUED: frozenset({SafState.IN_FLIGHT, SafState.CANCELLED, SafState.DEAD}),
        SafState.IN_FLIGHT: frozenset(
            {SafState.DONE, SafState.QUEUED, SafState.DEAD, SafState.CANCELLED}
        ),
        SafState.DEAD: frozenset({SafState.QUEUED, SafState.CANCELLED}),
        SafState.DONE: frozenset(),
        SafState.CANCELLED: frozenset(),
    }
)

#: States of entries still to be delivered (they count towards the queue's depth).
ACTIVE_STATES: Final = (SafState.QUEUED.value, SafState.IN_FLIGHT.value)
#: States that end an entry's life; only these are ever purged.
PURGEABLE_STATES: Final = (SafState.DONE.value, SafState.CANCELLED.value)

KIND_ADVICE: Final = "advice"
KIND_REVERSAL: Final = "reversal"
#: Who decided a queued message (see :class:`gateway.models.SafEntry`).
ORIGIN_GATEWAY: Final = "gateway"
ORIGIN_ACQUIRER: Final = "acquirer"
ORIGINS: Final = frozenset({ORIGIN_GATEWAY, ORIGIN_ACQUIRER})
#: Reversals first: undoing a payment that may have posted matters more than delivering an
#: approval, and billing handles a reversal that overtakes its payment (tombstone).
PRIORITY_REVERSAL: Final = 100
PRIORITY_ADVICE: Final = 50
PRIORITIES: Final[Mapping[str, int]] = MappingProxyType(
    {KIND_REVERSAL: PRIORITY_REVERSAL, KIND_ADVICE: PRIORITY_ADVICE}
)
#: The MTI of each kind's first attempt.
FIRST_MTI: Final[Mapping[str, str]] = MappingProxyType(
    {KIND_ADVICE: MTI_ADVICE, KIND_REVERSAL: MTI_REVERSAL}
)
_REPEATS: Final[Mapping[str, str]] = MappingProxyType(
    {MTI_ADVICE: MTI_ADVICE_REPEAT, MTI_REVERSAL: MTI_REVERSAL_REPEAT}
)


class SafTransitionError(PaylabError):
    """A state change the queue's state machine does not allow (see :data:`ALLOWED`)."""


class QueueFull(PaylabError):
    """The queue holds ``max_size`` undelivered entries; nothing was queued.

    The caller must not approve in stand-in (nor promise a reversal) when it gets this.
    """


def check_transition(src: SafState, dst: SafState) -> None:
    """Raise :class:`SafTransitionError` unless ``src -> dst`` is in :data:`ALLOWED`."""
    if dst not in ALLOWED[src]:
        raise SafTransitionError(f"SAF entry cannot go from {src.value} to {dst.value}")


def repeat_mti(mti: str) -> str:
    """The repeat MTI sent on every attempt after the first: 0220 -> 0221, 0420 -> 0421.

    Raises ValueError for any other MTI.
    """
    try:
        return _REPEATS[mti]
    except KeyError:
        raise ValueError(f"no repeat MTI for {mti!r}") from None


@dataclass(frozen=True)
class Outcome:
    """What one delivery attempt means for its entry (see :func:`after_attempt`).

    ``next_attempt_at`` is set for ``QUEUED`` only; ``response_code`` is billing's answer
    (None when there was none); ``error`` says why the entry is not done.
    """

    state: SafState
    next_attempt_at: datetime | None
    response_code: str | None
    error: str | None


def after_attempt(
    *,
    attempts: int,
    max_attempts: int,
    created_at: datetime,
    max_age: timedelta,
    now: datetime,
    code: str | None,
    error: str | None,
    delay: float,
) -> Outcome:
    """Decide what follows an attempt (pure).

    ``attempts`` counts attempts made so far, this one included (what :meth:`SafStore.claim`
    returned); ``code`` is billing's response code, or None with ``error`` saying why there
    was no answer (not sent, timeout, connection lost).

    * ``code`` final (``00`` or a business decline such as ``88``, ``13``, ``25``): ``DONE``
      with that code. A decline is a final answer too; reconciliation reports it.
    * ``code`` transient (:func:`shared.iso.codes.is_transient`: ``91``, ``96``, ``68``) or no
      answer: ``QUEUED`` again, due at ``now + delay`` seconds, unless ``attempts >=
      max_attempts`` or the entry is ``max_age`` old or older, which makes it ``DEAD``. The
      error is kept in both cases.

    Raises:
        ValueError: ``delay`` is negative or ``max_attempts`` is below 1.
    """
    if delay < 0:
        raise ValueError(f"delay must not be negative: {delay}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1: {max_attempts}")
    if code is not None and not is_transient(code):
        return Outcome(SafState.DONE, None, code, None)
    if code is None:
        reason = error or "no answer"
    else:
        reason = f"transient response {code}" + (f": {error}" if error else "")
    if attempts >= max_attempts:
        return Outcome(SafState.DEAD, None, code, f"{reason}; gave up after {attempts} attempts")
    age = now - created_at
    if age >= max_age:
        return Outcome(
            SafState.DEAD, None, code, f"{reason}; gave up at age {age.total_seconds():.0f}s"
        )
    return Outcome(SafState.QUEUED, now + timedelta(seconds=delay), code, reason)


# --------------------------------------------------------------------------------------------
# Values


def check_text(name: str, value: str | None, max_len: int, *, required: bool = True) -> None:
    if value is None:
        if required:
            raise ValueError(f"{name} is required")
        return
    if (required and not value) or len(value) > max_len:
        raise ValueError(f"{name} must be {int(required)}..{max_len} characters: {value!r}")


@dataclass(frozen=True, slots=True)
class NewEntry:
    """An advice or reversal to queue.

    ``message`` is the encoded ISO-8583 message to send, with the first-attempt MTI
    (``0220`` for an advice, ``0420`` for a reversal), and no PIN block (field 52). It is
    stored sealed; the other fields are stored in clear for operators and the queue's rules,
    so ``pan_masked`` must be masked (:func:`shared.pan.mask_pan`) and ``pan_hash`` keyed
    (:class:`shared.pan.PanHasher`). ``idempotency_key`` is the key of ``message`` itself
    (:func:`shared.iso.messages.idempotency_key`). ``original_key`` (reversals) is the key of the
    transaction being undone; left None, the store takes it from the message's field 90.

    Raises ValueError from the constructor for values that cannot be stored.
    """

    idempotency_key: str
    kind: str
    mti: str
    message: bytes
    terminal_id: str
    acquirer_id: str
    stan: str
    rrn: str | None
    bill_number: str | None
    amount: int | None
    currency: str | None
    pan_masked: str | None
    pan_hash: str | None
    max_attempts: int
    original_key: str | None = None
    #: ``gateway`` (the gateway decided it) or ``acquirer`` (an acquirer's own message).
    origin: str = ORIGIN_GATEWAY

    def __post_init__(self) -> None:
        if self.kind not in FIRST_MTI:
            raise ValueError(f"kind must be advice or reversal: {self.kind!r}")
        if self.origin not in ORIGINS:
            raise ValueError(f"origin must be gateway or acquirer: {self.origin!r}")
        if self.mti != FIRST_MTI[self.kind]:
            raise ValueError(f"a {self.kind} is queued with MTI {FIRST_MTI[self.kind]}")
        check_text("idempotency_key", self.idempotency_key, 64)
        check_text("original_key", self.original_key, 64, required=False)
        check_text("terminal_id", self.terminal_id, 16)
        check_text("acquirer_id", self.acquirer_id, 11)
        check_text("stan", self.stan, 6)
        check_text("rrn", self.rrn, 12, required=False)
        check_text("bill_number", self.bill_number, 32, required=False)
        check_text("currency", self.currency, 3, required=False)
        check_text("pan_masked", self.pan_masked, 19, required=False)
        check_text("pan_hash", self.pan_hash, 64, required=False)
        if self.pan_masked is not None and self.pan_masked.isdigit():
            # Cheap guard against a clear PAN reaching a clear column by mistake.
            raise ValueError("pan_masked must be masked (see shared.pan.mask_pan)")
        if self.amount is not None and self.amount < 0:
            raise ValueError(f"amount must not be negative: {self.amount}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1: {self.max_attempts}")
        if not self.message:
            raise ValueError("message must not be empty")

    @property
    def priority(self) -> int:
        return PRIORITIES[self.kind]


def _iso(value: object) -> object:
    """A datetime in ISO 8601 with its UTC offset (a naive one, as SQLite gives them back, is
    UTC); any other value as it is."""
    if not isinstance(value, datetime):
        return value
    return (
        value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    ).isoformat()


@dataclass(frozen=True, slots=True)
class SafView:
    """A queue entry as operators see it: every column but the sealed message and its key id."""

    id: int
    idempotency_key: str
    original_key: str | None
    kind: str
    origin: str | None
    priority: int
    state: SafState
    mti: str
    terminal_id: str
    acquirer_id: str
    stan: str
    rrn: str | None
    bill_number: str | None
    amount: int | None
    currency: str | None
    pan_masked: str | None
    pan_hash: str | None
    attempts: int
    max_attempts: int
    next_attempt_at: datetime
    lease_owner: str | None
    lease_until: datetime | None
    response_code: str | None
    last_error: str | None
    late_response_code: str | None
    created_at: datetime
    updated_at: datetime
    done_at: datetime | None

    def as_dict(self) -> dict[str, object]:
        """JSON-ready: plain values, the state as its string, datetimes in ISO 8601 (UTC)."""
        out = {f.name: _iso(getattr(self, f.name)) for f in fields(self)}
        out["state"] = self.state.value
        return out


@dataclass(frozen=True, slots=True)
class Claimed:
    """An entry leased to a forwarder for one attempt.

    ``message`` is the decrypted message exactly as queued (first-attempt MTI in field
    ``"t"``); the forwarder sends it with ``mti_to_send`` instead, which is the repeat MTI
    from the second attempt on. ``attempts`` includes this attempt.
    """

    id: int
    idempotency_key: str
    kind: str
    mti_to_send: str
    message: bytes
    attempts: int
    terminal_id: str
    created_at: datetime
    max_attempts: int


@dataclass(frozen=True, slots=True)
class SafStats:
    """Queue figures for metrics and the operators' page."""

    #: Entries in every state (each state present, zeros included).
    counts: Mapping[str, int]
    #: Entries still to deliver (queued + in flight).
    depth: int
    #: Age of the oldest undelivered (queued or in-flight) entry; None when there is none.
    oldest_queued_age_seconds: float | None

    def as_dict(self) -> dict[str, object]:
        return {
            "counts": dict(self.counts),
            "depth": self.depth,
            "oldest_queued_age_seconds": self.oldest_queued_age_seconds,
        }
