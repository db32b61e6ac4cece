"""The gateway (switch): where a payment from an acquirer is checked, translated,
forwarded to billing and answered.

The path of one 0200, each step one method so later mechanisms plug in at one place:

1. :meth:`dispatch` runs the steps below and journals the outcome;
2. :meth:`_check_limit`: the rate limits (institution, terminal; payments per card after
   the MAC) -> 65;
   :meth:`_check_mac` asks the HSM to verify the acquirer's MAC (M8) -> 63 if wrong;
3. :meth:`_translate_pin` re-encrypts the PIN block from the terminal key to billing's
   zone key (CA) -> 55 if the block is not a PIN at all;
4. :meth:`_forward` sends the message to billing over the multiplexed link and waits
   for the matching answer -> 91 when there is no link, 68 when the outcome is unknown.
   **This is the seam** where the connection pool, retry with backoff, the circuit
   breaker and the store-and-forward queue plug in: they change how ``_forward`` gets
   an answer, not what the rest of the pipeline does with it;
5. :meth:`finish` MACs the response (M6).

The journal row (one per answered request) is committed before the answer leaves (group
commit, :class:`gateway.journal.JournalWriter`): the journal is part of the money record,
so no 00 leaves the gateway without its durable row. When the row cannot be written, an
approved payment is withheld and undone (:meth:`GatewayService._withhold`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import trio
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.forwarder import Forwarder
from gateway.journal import Journal, JournalView, JournalWriter, journal_row
from gateway.limits import LIMITS, RequestLimits
from gateway.metrics import SafMetrics
from gateway.saf_api import saf_routes
from gateway.saf_rules import (
    KIND_ADVICE,
    KIND_REVERSAL,
    ORIGIN_ACQUIRER,
    ORIGIN_GATEWAY,
    NewEntry,
    QueueFull,
    SafView,
)
from gateway.saf_store import SafStore
from gateway.standin import (
    StandInPolicy,
    advice_of,
    approval_code,
    day_start,
    is_payment,
    reversal_of,
)
from hsm.client import HsmClient, HsmCommandFailed, HsmDialect, MacAndPin, decode_hsm_keyed
from hsm.errors import HsmProtocolError
from hsm.keyfile import KeyFile, load_key_file
from shared.errors import DecodeError, UpstreamError, ValidationError
from shared.iso import codec
from shared.iso.codes import RC
from shared.iso.messages import (
    MTI_ADVICE,
    MTI_ADVICE_REPEAT,
    MTI_FINANCIAL,
    MTI_NETWORK,
    MTI_REVERSAL,
    MTI_REVERSAL_REPEAT,
    Message,
    changes_state,
    failure_code,
    idempotency_key,
    make_response,
    match_key,
    response_mti,
)
from shared.iso.validation import validate_response
from shared.net.upstream import request_deadline
from shared.ops.settings import Settings
from shared.pan import PanHasher, account_number_12, mask_pan
from shared.server.http import json_error
from shared.server.service import (
    IsoDialect,
    IsoFrame,
    IsoService,
    decode_iso_keyed,
    encode_upstream,
)
from shared.store.db import DatabaseError, utc_iso
from shared.store.vault import Vault

#: payShield key type codes used with M6/M8.
KEY_TYPE_TAK = "003"

# HSM errors on CA that mean "this PIN block is not a valid PIN": a cardholder problem.
_BAD_PIN_BLOCK_ERRORS = frozenset({"20", "23", "24"})


class _Decline(Exception):
    """Internal: stop the pipeline and answer with ``code``."""

    def __init__(self, code: RC) -> None:
        self.code = code


class GatewayService(IsoService):
    """The switch between acquirers and billing. See the module docstring for the path."""

    name = "gateway"
    migrations = "gateway:migrations"
    require_mac = True
    request_mtis = (MTI_FINANCIAL, MTI_ADVICE, MTI_REVERSAL, MTI_NETWORK)
    retries_upstream = True

    def __init__(self, settings: Settings, keys: KeyFile | None = None) -> None:
        super().__init__(settings)
        keys = keys or load_key_file(settings.key_file)
        self._tak = keys.keys["TAK"].under_lmk
        self._tpk = keys.keys["TPK"].under_lmk
        self._zpk = keys.keys["ZPK"].under_lmk
        self.pan_hash = PanHasher(settings.pan_hash_key.encode())
        self.billing = self.add_link(
            "billing",
            settings.address("billing"),
            decode_iso_keyed,
            IsoDialect(),
            backup=settings.backup_address("billing"),
            on_unmatched=self._late_answer,
        )
        hsm_link = self.add_link(
            "hsm",
            settings.address("hsm"),
            decode_hsm_keyed,
            HsmDialect(),
            backup=settings.backup_address("hsm"),
        )
        self.hsm = HsmClient(hsm_link, settings.hsm_timeout)
        self.journal: Journal | None = None
        self.journal_writer: JournalWriter | None = None
        self.limits = RequestLimits(settings, trio.current_time)
        for limit in LIMITS:
            self.metrics.rate_limited.labels(limit)
        self.standin = StandInPolicy.from_settings(settings)
        self.vault = Vault.from_secrets(settings.data_keys(), settings.data_key_id)
        self.saf: SafStore | None = None
        self.saf_metrics = SafMetrics(self.metrics.registry)
        self.forwarder: Forwarder | None = None
        # Payments whose outcome was unknown and that the gateway reversed: a repeat of one
        # gets the same 68 instead of being forwarded (and posted) again. Loaded from the
        # queue at start (SafStore.gateway_reversed), so it survives a restart; the journal's
        # veto (Journal.write) covers a reversal queued by another replica.
        self._reversed: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self._stats_scope = trio.CancelScope()

    def prepare_database(self, sessions: sessionmaker[Session]) -> None:
        self.journal = Journal(sessions)
        self.journal_writer = JournalWriter(self.journal, self.add_db_thread("journal"))
        self.saf = SafStore(sessions, self.vault, max_size=self.settings.saf_max_size)
        self._reversed = self.saf.gateway_reversed()
        self.forwarder = Forwarder(
            self.saf,
            self.billing,
            self.in_db_thread,
            settings=self.settings,
            metrics=self.saf_metrics,
            log=self.log,
            pan_hash=self.pan_hash,
        )

    async def start_background(self, nursery: trio.Nursery) -> None:
        assert self.journal_writer is not None and self.forwarder is not None
        self._nursery = nursery
        await nursery.start(self.forwarder.run)
        nursery.start_soon(self._refresh_saf_gauges)

    async def stop_background(self) -> None:
        if self.forwarder is not None:
            await self.forwarder.stop()
        self._stats_scope.cancel()

    async def _refresh_saf_gauges(self) -> None:
        """Queue depth by state and the oldest entry's age, for /metrics, every 2 s."""
        saf = self.saf
        assert saf is not None
        with self._stats_scope:
            while True:
                try:
                    stats = await self.in_db_thread(lambda: saf.stats(now=datetime.now(UTC)))
                except DatabaseError as exc:
                    self.log.warning("saf_stats_failed", error=str(exc)[:200])
                else:
                    for state, n in stats.counts.items():
                        self.saf_metrics.entries.labels(state).set(n)
                    self.saf_metrics.oldest_age.set(stats.oldest_queued_age_seconds or 0.0)
                await trio.sleep(2.0)

    # -- the pipeline -------------------------------------------------------------------------
    async def dispatch(self, frame: IsoFrame, peer: str) -> Message:
        msg = frame.msg
        if msg["t"] == MTI_NETWORK:
            return make_response(msg, RC.APPROVED)
        writer = self.journal_writer
        assert writer is not None
        start = trio.current_time()
        # Every upstream call made for this request (HSM, billing, retries) ends by then.
        request_deadline.set(start + self.settings.online_budget)
        received_at = datetime.now(UTC)
        journaled = False
        forward: Message | None = None
        try:
            self._check_limit(self.limits.check_request(msg))
            translated = await self._check_mac(frame)
            pan = msg.get("2")
            self._check_limit(self.limits.check_payment(msg, self.pan_hash(pan) if pan else None))
            forward = await self._translate_pin(msg, translated)
            response, journaled = await self._forward(forward, msg, received_at)
        except _Decline as d:
            response = make_response(msg, d.code)
        if journaled:
            return response
        code = response.get("39", RC.SYSTEM_MALFUNCTION)
        try:
            vetoed = await writer.write(self._journal_row(msg, code, received_at))
        except DatabaseError as exc:
            self.saf_metrics.journal_failures.inc()
            self.log.error("journal_write_failed", rrn=msg.get("37"), error=str(exc)[:200])
            if forward is not None and code == RC.APPROVED and is_payment(forward):
                return await self._withhold(forward, msg, received_at)
            # A decline changes no money; an acquirer's own reversal or advice approved by
            # billing reports a fact already made there (withholding it would make the
            # acquirer believe the payment stands): answered, and reconciliation reports the
            # journal gap.
            return response
        if vetoed:
            self.saf_metrics.withheld.labels("vetoed").inc()
            self.log.warning("approval_vetoed", rrn=msg.get("37"))
            return make_response(msg, RC.LATE_RESPONSE)
        return response

    def _journal_row(self, msg: Message, code: str, received_at: datetime) -> dict[str, Any]:
        elapsed_ms = (datetime.now(UTC) - received_at).total_seconds() * 1000
        return journal_row(
            msg, code, received_at=received_at, duration_ms=elapsed_ms, pan_hash=self.pan_hash
        )

    def _check_limit(self, limit: str | None) -> None:
        if limit is not None:
            self.metrics.rate_limited.labels(limit).inc()
            self.log.info("rate_limited", limit=limit)
            raise _Decline(RC.ACTIVITY_LIMIT)

    async def _check_mac(self, frame: IsoFrame) -> MacAndPin | None:
        """Verify the acquirer's MAC (M8) -> 63 if wrong, 96 if the HSM fails.

        A message with a PIN block has it translated in the same HSM round trip (M8 and CA
        together, see docs/security.md): the result is returned for
        :meth:`_translate_pin` only once the MAC is known good; with a wrong MAC it is
        dropped here, unread, and the answer is the 63 it always was. None: no PIN block
        (or one the combined request could not be built for: the steps then run one
        after the other, as they always did).
        """
        msg = frame.msg
        placed = codec.mac_input_of_received(frame.raw, msg)
        if placed is None:
            raise _Decline(RC.FORMAT_ERROR)  # MAC in the wrong field for this message
        mac, data = placed
        block = msg.get("52")
        both: MacAndPin | None = None
        try:
            if block is not None:
                both = await self._verify_mac_and_translate(data, mac, block, msg)
                ok = both is None or both.mac_ok
            if both is None:
                ok = await self.hsm.verify_mac(KEY_TYPE_TAK, self._tak, data, mac)
        except UpstreamError as exc:
            self.log.warning("hsm_failed", step="verify_mac", error=str(exc))
            raise _Decline(RC.SYSTEM_MALFUNCTION) from None
        if not ok:
            self.log.warning("mac_mismatch", rrn=msg.get("37"))
            raise _Decline(RC.SECURITY_VIOLATION)
        return both

    async def _verify_mac_and_translate(
        self, data: bytes, mac: str, block: str, msg: Message
    ) -> MacAndPin | None:
        """M8 and CA in one round trip; None (nothing sent) when CA cannot be built for this
        message, so that the old order decides its answer."""
        try:
            requests = self.hsm.mac_and_pin_requests(
                KEY_TYPE_TAK,
                self._tak,
                data,
                mac,
                tpk=self._tpk,
                zpk=self._zpk,
                pin_block=block,
                account12=account_number_12(msg["2"]),
            )
        except (KeyError, HsmProtocolError):
            return None  # validation makes this unreachable; kept to never change an answer
        return await self.hsm.verify_mac_and_translate_pin(requests)

    async def _translate_pin(self, msg: Message, translated: MacAndPin | None = None) -> Message:
        """The message to forward: no MAC, PIN block (if any) under billing's ZPK.

        ``translated``: CA's answer, already asked together with M8 (:meth:`_check_mac`) and
        read the same way; without it, CA is asked now. Either way: 55 when the block is
        not a PIN at all, 96 when the HSM fails.
        """
        fwd = {k: v for k, v in msg.items() if k not in ("64", "128")}
        block = msg.get("52")
        if block is None:
            return fwd
        try:
            if translated is not None:  # read only now: the MAC is good, the limits passed
                fwd["52"] = translated.pin_block()
            else:
                fwd["52"] = await self.hsm.translate_pin(
                    self._tpk, self._zpk, block, account_number_12(msg["2"])
                )
        except HsmCommandFailed as exc:
            if exc.error in _BAD_PIN_BLOCK_ERRORS:
                raise _Decline(RC.WRONG_PIN) from None
            self.log.warning("hsm_failed", step="translate_pin", error=exc.error)
            raise _Decline(RC.SYSTEM_MALFUNCTION) from None
        except UpstreamError as exc:
            self.log.warning("hsm_failed", step="translate_pin", error=str(exc))
            raise _Decline(RC.SYSTEM_MALFUNCTION) from None
        return fwd

    async def _forward(
        self, fwd: Message, msg: Message, received_at: datetime
    ) -> tuple[Message, bool]:
        """Billing's answer, a stand-in approval, or a queued advice/reversal.

        Returns (response, journaled): journaled is True when the journal row was written
        together with a queue entry (commit before answer), so the caller must not add one.
        """
        key = idempotency_key(fwd)
        if is_payment(fwd) and key in self._reversed:
            raise _Decline(RC.LATE_RESPONSE)  # same answer as the first time; never re-posted
        queues = fwd["t"] in (MTI_ADVICE, MTI_ADVICE_REPEAT, MTI_REVERSAL, MTI_REVERSAL_REPEAT)
        if is_payment(fwd) and not self.billing.available:
            # Billing unavailable (breaker open, or no healthy link): stand in at once rather
            # than spend the retry schedule on a link known to be down.
            if not self.billing.breaker_allows:
                self.metrics.upstream_rejected.labels("billing", "breaker_open").inc()
            return await self._stand_in(fwd, msg, received_at), True
        try:
            answer = await self.billing.call(
                encode_upstream(fwd),
                match_key(fwd),
                timeout=self.settings.billing_timeout,
                # Advices and reversals are idempotent at billing: resending is safe.
                resend_safe=queues or not changes_state(fwd),
            )
        except UpstreamError as exc:
            code = failure_code(exc, fwd)
            nothing_sent = code == RC.ISSUER_INOPERATIVE and changes_state(fwd)
            if is_payment(fwd) and nothing_sent:
                return await self._stand_in(fwd, msg, received_at), True
            if queues and code != RC.DUPLICATE:
                # The gateway takes the advice or reversal over: queued, then accepted.
                return await self._queue_forward(fwd, msg, received_at), True
            if is_payment(fwd) and code == RC.LATE_RESPONSE:
                await self._reverse_unknown(fwd, msg, received_at)
                return make_response(msg, RC.LATE_RESPONSE), True
            raise _Decline(code) from None
        try:
            validate_response(answer.msg)
        except ValidationError:
            self.log.warning("invalid_upstream_response", upstream="billing")
            raise _Decline(RC.SYSTEM_MALFUNCTION) from None
        response = {k: v for k, v in answer.msg.items() if k not in ("52", "64", "128")}
        response["t"] = response_mti(fwd["t"])
        return response, False

    # -- store-and-forward --------------------------------------------------------------------
    def _entry(
        self,
        kind: str,
        message: Message,
        original_key: str | None = None,
        *,
        origin: str = ORIGIN_GATEWAY,
    ) -> NewEntry:
        pan = message.get("2")
        amount = message.get("4")
        return NewEntry(
            idempotency_key=idempotency_key(message)[:64],
            kind=kind,
            mti=message["t"],
            message=codec.encode(message),
            terminal_id=message.get("41", ""),
            acquirer_id=message.get("32", ""),
            stan=message.get("11", ""),
            rrn=message.get("37"),
            bill_number=message.get("48"),
            amount=int(amount) if amount and amount.isdigit() else None,
            currency=message.get("49"),
            pan_masked=mask_pan(pan) if pan else None,
            pan_hash=self.pan_hash(pan) if pan else None,
            max_attempts=self.settings.saf_max_attempts,
            original_key=original_key,
            origin=origin,
        )

    async def _enqueue(self, entry: NewEntry, journal: dict[str, Any]) -> SafView:
        """Queue ``entry`` with its journal row, committed before returning; 91 if full."""
        saf = self.saf
        assert saf is not None and self.forwarder is not None
        try:
            view, created = await self.in_db_thread(
                lambda: saf.enqueue(entry, now=datetime.now(UTC), journal_rows=[journal])
            )
        except QueueFull:
            self.saf_metrics.rejected.labels("full").inc()
            self.log.error("saf_queue_full", kind=entry.kind, rrn=entry.rrn)
            raise _Decline(RC.ISSUER_INOPERATIVE) from None
        except DatabaseError as exc:
            self.log.error("saf_enqueue_failed", error=str(exc)[:200])
            raise _Decline(RC.SYSTEM_MALFUNCTION) from None
        if created:
            self.saf_metrics.enqueued.labels(entry.kind).inc()
            self.forwarder.wake()
        return view

    async def _stand_in(self, fwd: Message, msg: Message, received_at: datetime) -> Message:
        """Approve a payment on billing's behalf and queue its advice (see gateway.standin)."""
        saf = self.saf
        assert saf is not None
        pan_hash = self.pan_hash(fwd["2"])
        since = day_start(datetime.now(UTC))
        total = await self.in_db_thread(saf.standin_amount_since, pan_hash, since)
        refusal = self.standin.refusal(fwd, customer_total_today=total)
        # A repeat of a payment already approved in stand-in must get the same answer: its
        # own amount is in the card's total already, so the limits would now refuse it (91)
        # although its advice is queued and will post. The enqueue below returns that entry.
        if refusal is not None and not await self._advice_queued(fwd):
            self.saf_metrics.standin.labels(refusal).inc()
            self.log.info("standin_refused", reason=refusal, rrn=msg.get("37"))
            raise _Decline(RC.ISSUER_INOPERATIVE)
        try:
            view = await self._enqueue(
                self._entry(KIND_ADVICE, advice_of(fwd)),
                self._journal_row(msg, RC.APPROVED, received_at),
            )
        except _Decline as d:
            if d.code == RC.ISSUER_INOPERATIVE:  # 96 is a database failure, counted apart
                self.saf_metrics.standin.labels("queue_full").inc()
            raise
        self.saf_metrics.standin.labels("approved").inc()
        self.log.info("standin_approved", rrn=msg.get("37"), entry=view.id)
        return make_response(msg, RC.APPROVED, f38=approval_code(view.id))

    async def _advice_queued(self, fwd: Message) -> bool:
        """True when the queue already holds the advice of payment ``fwd`` (in any state)."""
        saf = self.saf
        assert saf is not None
        view = await self.in_db_thread(saf.get_by_key, idempotency_key(fwd)[:64])
        return view is not None and view.kind == KIND_ADVICE

    async def _reverse_unknown(self, fwd: Message, msg: Message, received_at: datetime) -> None:
        """A payment went out and no answer came: queue its reversal, journal the 68."""
        self.log.warning("outcome_unknown", rrn=msg.get("37"), mti=msg["t"])
        reversal = reversal_of(fwd)
        await self._enqueue(
            self._entry(KIND_REVERSAL, reversal, idempotency_key(fwd)[:64]),
            self._journal_row(msg, RC.LATE_RESPONSE, received_at),
        )
        self._reversed.add(idempotency_key(fwd))

    async def _queue_forward(self, fwd: Message, msg: Message, received_at: datetime) -> Message:
        """An acquirer's advice or reversal billing could not take now: queued, accepted."""
        first = dict(fwd)
        first["t"] = MTI_REVERSAL if fwd["t"] in (MTI_REVERSAL, MTI_REVERSAL_REPEAT) else MTI_ADVICE
        kind = KIND_REVERSAL if first["t"] == MTI_REVERSAL else KIND_ADVICE
        await self._enqueue(
            self._entry(kind, first, origin=ORIGIN_ACQUIRER),
            self._journal_row(msg, RC.APPROVED, received_at),
        )
        return make_response(msg, RC.APPROVED)

    async def _withhold(self, fwd: Message, msg: Message, received_at: datetime) -> Message:
        """Billing approved payment ``fwd``, but its journal row cannot be written.

        No approval leaves without its record, so the payment is undone: a reversal is
        queued (answer 68, as for a timeout), or, when the queue cannot be written either
        (the same database: a full disk, a read-only file), sent to billing at once (answer
        96). If that fails too, the posting stands without an approval: a critical log line
        and ``paylab_approvals_withheld{outcome="orphaned"}``; reconciliation reports it.
        """
        key = idempotency_key(fwd)
        reversal = reversal_of(fwd)
        try:
            await self._enqueue(
                self._entry(KIND_REVERSAL, reversal, key[:64]),
                self._journal_row(msg, RC.LATE_RESPONSE, received_at),
            )
        except _Decline:
            pass  # the queue is in the same database: try billing directly
        else:
            self._reversed.add(key)
            self.saf_metrics.withheld.labels("reversal_queued").inc()
            self.log.error("approval_withheld", rrn=msg.get("37"), undo="reversal_queued")
            return make_response(msg, RC.LATE_RESPONSE)
        code: str | None = None
        try:
            answer = await self.billing.call(
                encode_upstream(reversal),
                match_key(reversal),
                timeout=self.settings.billing_timeout,
                resend_safe=True,
            )
            code = answer.msg.get("39")
        except UpstreamError as exc:
            self.log.warning("online_reversal_failed", rrn=msg.get("37"), error=str(exc))
        if code in (RC.APPROVED, RC.UNKNOWN_BILL):  # reversed, or nothing was posted
            self.saf_metrics.withheld.labels("reversed_online").inc()
            self.log.error("approval_withheld", rrn=msg.get("37"), undo="reversed_online")
        else:
            self.saf_metrics.withheld.labels("orphaned").inc()
            self.log.critical(
                "posting_orphaned",
                rrn=msg.get("37"),
                reason="journal and queue unwritable, online reversal failed",
                reversal_code=code,
            )
        return make_response(msg, RC.SYSTEM_MALFUNCTION)

    def _late_answer(self, payload: bytes, key: Hashable | None) -> None:
        """A billing answer nobody waits for: count it, and note it on the queue entry."""
        self.metrics.unmatched_responses.labels("billing").inc()
        try:
            answer = codec.decode(payload)
        except DecodeError:
            self.log.warning("unmatched_response", upstream="billing", size=len(payload))
            return
        code = answer.get("39", "")
        self.saf_metrics.late_responses.inc()
        self.log.warning(
            "late_response",
            upstream="billing",
            mti=answer.get("t"),
            rrn=answer.get("37"),
            code=code,
        )
        saf, nursery = self.saf, self._nursery
        if saf is None or nursery is None or len(code) != 2:
            return
        key_of = idempotency_key(answer)[:64]

        async def record() -> None:
            try:
                await self.in_db_thread(
                    lambda: saf.record_late_response(key_of, code, now=datetime.now(UTC))
                )
            except DatabaseError as exc:
                self.log.error("late_response_not_recorded", error=str(exc)[:200])

        nursery.start_soon(record)

    async def finish(self, request: Message, response: Message) -> Message:
        """MAC every answer to a financial request; an answer without MAC beats none."""
        if request.get("t") == MTI_NETWORK:
            return response
        field, data = codec.encode_for_mac(response)
        try:
            response[field] = await self.hsm.generate_mac(KEY_TYPE_TAK, self._tak, data)
        except UpstreamError as exc:
            self.log.warning("hsm_failed", step="generate_mac", error=str(exc))
        return response

    # -- admin ----------------------------------------------------------------------------------
    def routes(self) -> Sequence[BaseRoute]:
        return [
            Route("/transactions", self._transactions, methods=["GET"]),
            *saf_routes(
                lambda: self.saf,
                self.in_db_thread,
                self.saf_metrics,
                self.log,
                self.settings.saf_retention,
            ),
        ]

    async def _transactions(self, request: Request) -> Response:
        """``GET /transactions?rrn=...|stan=...&limit=50``: journal rows, newest first, and
        the store-and-forward entries of the same transaction(s) under ``queue``."""
        journal, writer, saf = self.journal, self.journal_writer, self.saf
        if journal is None or writer is None or saf is None:
            return json_error(503, "journal not open")
        try:
            limit = max(1, min(int(request.query_params.get("limit", "50")), 500))
        except ValueError:
            return json_error(400, "limit must be a whole number")
        rrn = request.query_params.get("rrn") or None
        stan = request.query_params.get("stan") or None
        rows = await self.in_db_thread(lambda: journal.find(rrn=rrn, stan=stan, limit=limit))
        queued = []
        if rrn or stan:
            queued = await self.in_db_thread(lambda: saf.list(rrn=rrn, stan=stan, limit=limit))
        return JSONResponse(
            {"items": [_row_json(r) for r in rows], "queue": [v.as_dict() for v in queued]}
        )


def _row_json(row: JournalView) -> dict[str, object]:
    d = asdict(row)
    d["received_at"] = utc_iso(row.received_at)
    return d
