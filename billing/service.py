"""The biller host: answers bill inquiries, posts payments exactly once, reverses them.

The ISO side is this module; the money rules live in :mod:`billing.store` (idempotent by
the transaction's key). Database work runs in a worker thread, one call at a time per
process: SQLite has one writer anyway, and serialising keeps "check the key, post, store
the answer" free of races on any database. Requests that arrive while that thread is busy
are batched into its next call (:class:`shared.store.group_commit.GroupCommit`): the replay checks
and card lookups of many payments in one read, many postings in one transaction with one
commit. Each answer still waits for the commit of its own posting.

Business metrics (:class:`shared.ops.metrics.BusinessMetrics`) count each fresh outcome once,
where it is decided: payments and advices by biller and response code with the approved
amounts, inquiries, reversals; a replayed answer counts as a replay only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from prometheus_client import Gauge
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from billing.ledger import LedgerGuard, LedgerLost, Start, open_ledger
from billing.models import CARD_ACTIVE, Bill
from billing.posting import (
    CardRef,
    InquiryResult,
    PaymentRequest,
    PaymentResult,
    ReversalRequest,
    StoredResponse,
)
from billing.store import BillingStore
from hsm.client import HsmClient, HsmCommandFailed, HsmDialect, decode_hsm_keyed
from hsm.keyfile import KeyFile, load_key_file
from shared import crypto
from shared.errors import UpstreamError
from shared.iso.codes import RC
from shared.iso.messages import (
    MTI_ADVICE,
    MTI_ADVICE_REPEAT,
    MTI_FINANCIAL,
    MTI_NETWORK,
    MTI_REVERSAL,
    MTI_REVERSAL_REPEAT,
    PC_BILL_INQUIRY,
    Message,
    idempotency_key,
    make_response,
    original_key,
)
from shared.ops.metrics import UNKNOWN_BILLER, BusinessMetrics
from shared.ops.settings import Settings
from shared.pan import PanHasher, account_number_12, mask_pan
from shared.server.http import HealthCheck
from shared.server.service import IsoFrame, IsoService
from shared.store.db import DatabaseError, transaction
from shared.store.group_commit import GroupCommit


def request_digest(msg: Mapping[str, str]) -> str:
    """Digest of a request's business content, to tell a true repeat from a key clash.

    The MTI is left out on purpose: a stand-in advice (0220) and its original payment
    (0200) are the same transaction and must match.
    """
    parts = (
        msg.get("3", ""),
        msg.get("4", ""),
        msg.get("48", ""),
        msg.get("49", ""),
        msg.get("2", ""),
    )
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def iso_fields(recorded: Mapping[str, object]) -> dict[str, str]:
    """ISO response fields from a recorded outcome (see :mod:`billing.store`).

    Field 38 (approval code) is the posting id, six digits; field 62 names the biller and
    the customer. Derived the same way for a first answer and for its replay, so a
    repeated request gets a byte-identical response.
    """
    out: dict[str, str] = {}
    posting_id = recorded.get("posting_id")
    if isinstance(posting_id, int):
        out["38"] = f"{posting_id % 1_000_000:06d}"
    biller, name = recorded.get("biller"), recorded.get("customer_name")
    if biller and name:
        out["62"] = f"{biller}|{name}"[:99]
    return out


class BillingService(IsoService):
    """Billing host service. See :mod:`billing.store` for the posting rules."""

    name = "billing"
    migrations = "billing:migrations"
    request_mtis = (MTI_FINANCIAL, MTI_ADVICE, MTI_REVERSAL, MTI_NETWORK)

    def __init__(self, settings: Settings, keys: KeyFile | None = None) -> None:
        super().__init__(settings)
        self.keys = keys or load_key_file(settings.key_file)
        self.pan_hash = PanHasher(settings.pan_hash_key.encode())
        self._zpk = self.keys.keys["ZPK"].under_lmk
        self._pvk = self.keys.keys["PVK"].under_lmk
        hsm_link = self.add_link("hsm", settings.address("hsm"), decode_hsm_keyed, HsmDialect())
        self.hsm = HsmClient(hsm_link, settings.hsm_timeout)
        self.store: BillingStore | None = None
        self.business = BusinessMetrics(self.metrics.registry)
        # The hot path batches its database work: requests that arrive while the database
        # thread is busy go together in its next call (one thread hop, one transaction, and
        # for postings one commit). Each caller still gets its own result, and a posting's
        # answer is sent only after the commit that made it durable.
        self._reads: GroupCommit[tuple[str, str, str], tuple[StoredResponse | None, CardRef | None]]
        self._reads = GroupCommit(self._read_batch)
        self._inquiries: GroupCommit[str, InquiryResult] = GroupCommit(self._inquiry_batch)
        self._postings: GroupCommit[PaymentRequest, PaymentResult] = GroupCommit(
            self._posting_batch
        )
        #: Checks that the database is still the ledger opened at start (billing.ledger).
        self.guard: LedgerGuard | None = None
        self._lost_reported = False
        self.ledger_lost_gauge = Gauge(
            "paylab_billing_ledger_lost",
            "1 once billing found its database deleted or replaced while running (it then "
            "answers 91 to everything until restarted)",
            registry=self.metrics.registry,
        )

    # -- set-up -------------------------------------------------------------------------------
    def prepare_database(self, sessions: sessionmaker[Session]) -> None:
        """Open the ledger (see :mod:`billing.ledger`): a new network's ledger is created and
        seeded with the demo data; a ledger this data directory served before must be the
        one found, or billing refuses to start (:class:`~billing.ledger.LedgerLost`)."""
        assert self.engine is not None
        store = self.store = BillingStore(sessions)
        start, ledger_id = open_ledger(
            store, self.settings.data_dir, lambda: seed_demo(store, self.settings, self.keys)
        )
        if start is not Start.SAME:
            self.log.info("ledger_created", ledger=ledger_id, start=start.value)
        if start is Start.NEW:
            self.log.info("demo_data_seeded")
        self.guard = LedgerGuard(self.engine, ledger_id)
        store.set_guard(self.guard.check)
        with transaction(sessions, write=False) as session:
            billers = session.scalars(select(Bill.biller).distinct()).all()
        self.business.add_billers(billers)

    async def close_resources(self) -> None:
        if self.store is not None:
            self.store.close()  # the hot path's own connections, before the engine goes
        await super().close_resources()

    def health_checks(self) -> dict[str, HealthCheck]:
        checks = super().health_checks()
        checks["ledger"] = self._ledger_check
        return checks

    async def _ledger_check(self) -> tuple[bool, str]:
        guard, store = self.guard, self.store
        if guard is None or store is None:
            return False, "not open"
        try:
            await self.in_db_thread(store.check_ledger)
        except LedgerLost as exc:
            self._ledger_lost(exc)
            return False, f"LOST: {exc}"
        except DatabaseError:
            return False, "cannot be read"
        return True, f"ledger {guard.ledger_id}"

    def _ledger_lost(self, exc: LedgerLost) -> None:
        """Say so, loudly, once; from now on every request is answered 91."""
        if not self._lost_reported:
            self._lost_reported = True
            self.ledger_lost_gauge.set(1)
            self.log.critical("ledger_lost", reason=str(exc))

    # -- batched database calls ---------------------------------------------------------------
    async def _read_batch(
        self, items: Sequence[tuple[str, str, str]]
    ) -> list[tuple[StoredResponse | None, CardRef | None]]:
        assert self.store is not None
        return await self.in_db_thread(self.store.replay_and_cards, items)

    async def _inquiry_batch(self, bills: Sequence[str]) -> list[InquiryResult]:
        assert self.store is not None
        return await self.in_db_thread(self.store.inquire_many, bills)

    async def _posting_batch(self, requests: Sequence[PaymentRequest]) -> list[PaymentResult]:
        assert self.store is not None
        return await self.in_db_thread(self.store.pay_many, requests)

    # -- requests -----------------------------------------------------------------------------
    async def dispatch(self, frame: IsoFrame, peer: str) -> Message:
        msg = frame.msg
        mti = msg["t"]
        try:
            if mti == MTI_NETWORK:
                return make_response(msg, RC.APPROVED)
            if self.guard is not None:
                self.guard.check_file()  # one stat: a deleted database answers nothing
            if mti == MTI_FINANCIAL and msg["3"] == PC_BILL_INQUIRY:
                return await self._inquiry(msg)
            if mti == MTI_FINANCIAL:
                return await self._payment(msg)
            if mti in (MTI_ADVICE, MTI_ADVICE_REPEAT):
                return await self._post(msg, mti)
            if mti in (MTI_REVERSAL, MTI_REVERSAL_REPEAT):
                return await self._reversal(msg)
        except UpstreamError as exc:
            # The HSM could not be asked: a transient malfunction, never stored, so a
            # repeat of the same request gets a real answer later.
            self.log.warning("hsm_unavailable", error=type(exc).__name__)
            return self._failed(msg, RC.SYSTEM_MALFUNCTION)
        except LedgerLost as exc:
            # The database is not the ledger billing served: nothing it holds can be trusted
            # (a posting made now would vanish with it). Inoperative until an operator acts.
            self._ledger_lost(exc)
            return self._failed(msg, RC.ISSUER_INOPERATIVE)
        except DatabaseError as exc:
            # The biller cannot post: it is inoperative (91), a transient condition the
            # gateway may retry. Nothing was committed (one transaction per request), so
            # a repeat later is processed afresh.
            self.log.error("database_unavailable", error=str(exc)[:200])
            return self._failed(msg, RC.ISSUER_INOPERATIVE)
        return make_response(msg, RC.INVALID_TRANSACTION)  # pragma: no cover - validated

    def _failed(self, msg: Message, code: RC) -> Message:
        """The answer to a request that failed for a transient reason, counted as such."""
        mti = msg["t"]
        if mti in (MTI_REVERSAL, MTI_REVERSAL_REPEAT):
            self.business.reversals.labels(code.value).inc()
        elif mti == MTI_FINANCIAL and msg.get("3") == PC_BILL_INQUIRY:
            self.business.inquiries.labels(UNKNOWN_BILLER, code.value).inc()
        elif mti != MTI_NETWORK:
            self.business.payment(_source(mti), code.value, None, None)
        return make_response(msg, code)

    async def _inquiry(self, msg: Message) -> Message:
        assert self.store is not None
        res = await self._inquiries.submit(msg["48"])
        self.business.inquiries.labels(res.biller or UNKNOWN_BILLER, res.code).inc()
        if res.code != RC.APPROVED:
            return make_response(msg, res.code)
        return make_response(
            msg,
            res.code,
            f4=f"{res.amount_due:012d}",
            f49=res.currency or msg["49"],
            f62=f"{res.biller}|{res.customer_name}"[:99],
        )

    async def _payment(self, msg: Message) -> Message:
        key, digest = idempotency_key(msg), request_digest(msg)
        pan = msg["2"]
        card_hash = self.pan_hash(pan)
        stored, card = await self._reads.submit((key, digest, card_hash))
        if stored is not None:
            self.business.replays.labels(_source(msg["t"])).inc()
            return make_response(msg, stored.code, **iso_fields(stored.fields))
        if card is None:
            return await self._decline(msg, key, digest, RC.NO_SUCH_CARD)
        if card.status != CARD_ACTIVE:
            return await self._decline(msg, key, digest, RC.DO_NOT_HONOR)
        try:
            pin_ok = await self.hsm.verify_pin(
                self._zpk, self._pvk, msg["52"], account_number_12(pan), card.pvki, card.pvv
            )
        except HsmCommandFailed as exc:
            if exc.error not in ("20", "23", "24"):
                raise
            pin_ok = False  # the PIN block does not even decrypt to a PIN
        if not pin_ok:
            return await self._decline(msg, key, digest, RC.WRONG_PIN)
        return await self._post(msg, msg["t"], (key, digest, card_hash))

    async def _decline(self, msg: Message, key: str, digest: str, code: RC) -> Message:
        assert self.store is not None
        stored = await self.in_db_thread(
            self.store.record_decline, key, digest, msg["t"], code.value, {}
        )
        if stored.replayed:
            self.business.replays.labels(_source(msg["t"])).inc()
        else:
            self.business.payment(_source(msg["t"]), stored.code, None, None)
        return make_response(msg, stored.code, **iso_fields(stored.fields))

    async def _post(
        self, msg: Message, mti: str, known: tuple[str, str, str] | None = None
    ) -> Message:
        """Post a payment or an advice; ``known``: its key, digest and PAN hash when the
        caller computed them already (a payment, at its replay check)."""
        assert self.store is not None
        pan = msg["2"]
        key, digest, card_hash = known or (idempotency_key(msg), request_digest(msg), None)
        req = PaymentRequest(
            idempotency_key=key,
            request_digest=digest,
            bill_number=msg["48"],
            amount=int(msg["4"]),
            currency=msg["49"],
            rrn=msg["37"],
            stan=msg["11"],
            terminal_id=msg["41"],
            acquirer_id=msg["32"],
            pan_hash=card_hash or self.pan_hash(pan),
            pan_masked=mask_pan(pan),
            mti=mti,
        )
        res = await self._postings.submit(req)
        if res.replayed:
            self.log.info("payment_replayed", rrn=msg["37"], code=res.code)
            self.business.replays.labels(_source(mti)).inc()
        else:
            self.business.payment(_source(mti), res.code, res.biller, res.amount)
        return make_response(msg, res.code, **iso_fields(res.fields))

    async def _reversal(self, msg: Message) -> Message:
        assert self.store is not None
        req = ReversalRequest(
            idempotency_key=idempotency_key(msg),
            request_digest=request_digest(msg),
            original_key=original_key(msg),
            amount=int(msg["4"]),
            mti=msg["t"],
        )
        res = await self.in_db_thread(self.store.reverse, req)
        if not res.replayed:
            self.business.reversals.labels(res.code).inc()
        return make_response(msg, res.code)


def seed_demo(store: BillingStore, settings: Settings, keys: KeyFile) -> bool:
    """Load the demo customers, cards and bills (:mod:`billing.demo_data`) into ``store``
    if it has none: PANs hashed with the settings' key, PVVs made with the key file's PVK.
    True when it seeded."""
    pan_hash = PanHasher(settings.pan_hash_key.encode())
    pvk = keys.keys["PVK"].clear
    return store.seed_demo_data(pan_hash, lambda pan, pvki, pin: crypto.pvv(pvk, pan, pvki, pin))


def _source(mti: str) -> str:
    """The ``source`` label of a payment: an advice (0220/0221) or online (0200)."""
    return "advice" if mti in (MTI_ADVICE, MTI_ADVICE_REPEAT) else "online"
