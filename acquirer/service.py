"""The acquirer: where payments start.

* HTTP API: ``POST /inquiries``, ``POST /payments``, ``POST /payments/{id}/reversal``,
  ``GET /transactions/{id}``. Each builds a MACed 0200/0420, records it, sends it to
  the gateway over one persistent multiplexed connection and maps the answer to JSON.
* A terminal listener (ISO-8583): terminals that MAC and PIN-encrypt themselves pass
  through it to the gateway; requests and answers are relayed unchanged. Every answer to
  a state-changing request (payment, advice, reversal) is recorded before it is relayed,
  so reconciliation knows what each terminal was told.

HTTP statuses: 200 for every answered transaction (a decline is an answer), 404 for an
unknown id, 422 for a bad body (naming the field), 503 (code 91) when the gateway cannot be
reached, 504 (code 68) when it did not answer in time: the outcome of such a payment is
unknown and it is recorded as ``unknown`` (the gateway journals its side too).

Storage failures (a full disk, a database away) never give a 500: a request that cannot be
recorded is not sent and is answered 503 with ``Retry-After``; an answer that came but could
not be recorded is returned as it came, marked ``"recorded": false``. On the terminal
listener an answer that cannot be recorded is relayed all the same (counted, logged); any
other storage failure while answering is a 91 (:class:`~shared.service.IsoService`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from functools import wraps
from typing import Any

from prometheus_client import Counter
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from acquirer.api import BodyError, InquiryBody, PaymentBody, parse_body
from acquirer.builder import RequestBuilder, Terminal
from acquirer.store import TransactionStore, terminal_row
from gateway.journal import status_of
from hsm.keyfile import KeyFile, load_key_file
from shared.errors import UpstreamError
from shared.iso import codec
from shared.iso.codes import RC, describe
from shared.iso.messages import (
    MTI_ADVICE,
    MTI_FINANCIAL,
    MTI_NETWORK,
    MTI_REVERSAL,
    PC_BILL_INQUIRY,
    Message,
    changes_state,
    failure_code,
    make_response,
    match_key,
)
from shared.ops.settings import Settings
from shared.pan import mask_pan
from shared.server.auth import public
from shared.server.http import json_error
from shared.server.record import key_of
from shared.server.service import (
    IsoDialect,
    IsoFrame,
    IsoService,
    database_reason,
    decode_iso_keyed,
)
from shared.store.db import DatabaseError
from shared.store.group_commit import GroupCommit

#: Seconds a client is asked to wait (``Retry-After``) when the acquirer cannot record.
STORAGE_RETRY_AFTER = 5

#: What a storage failure looks like from here: the stores' own error, or SQLAlchemy's.
STORAGE_FAILURES = (DatabaseError, SQLAlchemyError)

Handler = Callable[[Any, Request], Awaitable[Response]]


def storage_guarded(handler: Handler) -> Handler:
    """An HTTP handler whose storage failures are answered 503 with ``Retry-After``."""

    @wraps(handler)
    async def guarded(self: Any, request: Request) -> Response:
        try:
            return await handler(self, request)
        except STORAGE_FAILURES as exc:
            return self.storage_unavailable(exc, request.url.path)

    return guarded


class AcquirerService(IsoService):
    """HTTP API and terminal pass-through in front of the gateway."""

    name = "acquirer"
    migrations = "acquirer:migrations"
    request_mtis = (MTI_FINANCIAL, MTI_ADVICE, MTI_REVERSAL, MTI_NETWORK)

    def __init__(self, settings: Settings, keys: KeyFile | None = None) -> None:
        super().__init__(settings)
        keys = keys or load_key_file(settings.key_file)
        self.builder = RequestBuilder(
            Terminal(
                acquirer_id=settings.acquirer_institution,
                terminal_id=settings.terminal_id,
                merchant_id=settings.merchant_id,
                currency=settings.currency,
                tpk=keys.keys["TPK"].clear,
                tak=keys.keys["TAK"].clear,
            )
        )
        self.gateway = self.add_link(
            "gateway", settings.address("gateway"), decode_iso_keyed, IsoDialect()
        )
        self.store: TransactionStore | None = None
        # Terminal answers are recorded in groups: one transaction for the answers of a moment.
        self._answers: GroupCommit[dict[str, Any], None] = GroupCommit(self._record_answers)
        self.record_failures = Counter(
            "paylab_acquirer_record_failures",
            "Answers to terminals that could not be recorded (the database failed); the "
            "answer was given all the same, and the gateway's journal holds it.",
            registry=self.metrics.registry,
        )

    def prepare_database(self, sessions: sessionmaker[Session]) -> None:
        self.store = TransactionStore(sessions)

    async def _record_answers(self, rows: Sequence[dict[str, Any]]) -> list[None]:
        store = self.store
        assert store is not None
        await self.in_db_thread(store.record_answers, rows)
        return [None] * len(rows)

    # -- terminal pass-through ---------------------------------------------------------------
    async def dispatch(self, frame: IsoFrame, peer: str) -> Message:
        msg = frame.msg
        if msg["t"] == MTI_NETWORK:
            return make_response(msg, RC.APPROVED)
        received_at = datetime.now(UTC)
        try:
            answer = await self.gateway.call(
                frame.raw,
                match_key(msg),
                timeout=self.settings.gateway_timeout,
                resend_safe=not changes_state(msg),
            )
        except UpstreamError as exc:
            response = make_response(msg, failure_code(exc, msg))
        else:
            response = answer.msg
        if changes_state(msg):
            await self._record_terminal_answer(msg, response, received_at)
        return response

    async def _record_terminal_answer(
        self, msg: Message, response: Message, received_at: datetime
    ) -> None:
        """Record what the terminal is told (before it is told: group commit).

        A failure to record is logged and counted, and the answer still goes out: the
        gateway's journal holds the same answer, and reconciliation falls back on it.
        """
        code = response.get("39", RC.SYSTEM_MALFUNCTION)
        row = terminal_row(
            msg, code, status_of(code), received_at=received_at, answered_at=datetime.now(UTC)
        )
        try:
            await self._answers.submit(row)
        except DatabaseError as exc:
            self.record_failures.inc()
            self.log.error("answer_not_recorded", rrn=msg.get("37"), error=str(exc)[:200])

    # -- HTTP API -------------------------------------------------------------------------------
    def routes(self) -> Sequence[BaseRoute]:
        # The customer-facing payment API: open (public), unlike the admin routes.
        return [
            public(Route("/inquiries", self._post_inquiry, methods=["POST"])),
            public(Route("/payments", self._post_payment, methods=["POST"])),
            public(Route("/payments/{tx_id}/reversal", self._post_reversal, methods=["POST"])),
            public(Route("/transactions/{tx_id}", self._get_transaction, methods=["GET"])),
            # By RRN: an operators' lookup (an RRN is guessable, an id is not): admin token.
            Route("/transactions", self._find_transactions, methods=["GET"]),
        ]

    def storage_unavailable(self, exc: BaseException, path: str) -> Response:
        """503 with ``Retry-After``: the database cannot record (nothing was sent)."""
        self.log.error("storage_unavailable", path=path, error=database_reason(exc))
        return JSONResponse(
            {
                "error": "storage unavailable: the request could not be recorded and was "
                "not sent; try again later",
                "retry_after": STORAGE_RETRY_AFTER,
            },
            status_code=503,
            headers={"Retry-After": str(STORAGE_RETRY_AFTER)},
        )

    @storage_guarded
    async def _post_inquiry(self, request: Request) -> Response:
        try:
            body = await parse_body(request, InquiryBody)
        except BodyError as exc:
            return json_error(422, str(exc), fields=exc.fields, details=exc.details)
        return await self._transact("inquiry", self.builder.inquiry(body.bill))

    @storage_guarded
    async def _post_payment(self, request: Request) -> Response:
        try:
            body = await parse_body(request, PaymentBody)
        except BodyError as exc:
            return json_error(422, str(exc), fields=exc.fields, details=exc.details)
        msg = self.builder.payment(body.bill, body.amount, body.pan, body.pin)
        return await self._transact("payment", msg)

    @storage_guarded
    async def _post_reversal(self, request: Request) -> Response:
        store = self.store
        assert store is not None
        tx_id = request.path_params["tx_id"]
        payment = await self.in_db_thread(store.get, tx_id)
        original = await self.in_db_thread(store.original_fields, tx_id)
        if payment is None or original is None:
            return json_error(404, f"no payment with id {tx_id}")
        if payment["status"] == "declined":
            # Nothing was posted: billing would answer 25 (no such posting), which reads
            # as an unknown bill although the bill exists.
            return json_error(
                409,
                f"payment {tx_id} was declined ({payment['response_code']} "
                f"{payment.get('message', '')}): nothing was posted, nothing to reverse",
                payment=payment,
            )
        earlier = await self.in_db_thread(store.approved_reversal, tx_id)
        if earlier is not None:
            # Billing would answer a repeat 0420 from its record (00 again); say what it is.
            return json_error(
                409,
                f"payment {tx_id} already reversed: reversal {earlier['id']} "
                f"(RRN {earlier['rrn']}) approved at {earlier['completed_at']}",
                already_reversed=True,
                reversal=earlier,
            )
        return await self._transact("reversal", self.builder.reversal(original), tx_id)

    @storage_guarded
    async def _find_transactions(self, request: Request) -> Response:
        """``GET /transactions?rrn=...``: the records of one RRN, newest first."""
        store = self.store
        assert store is not None
        rrn = request.query_params.get("rrn", "")
        if not rrn:
            return json_error(400, "rrn is required, e.g. /transactions?rrn=123456789012")
        items = await self.in_db_thread(store.find_by_rrn, rrn)
        return JSONResponse({"items": items})

    @storage_guarded
    async def _get_transaction(self, request: Request) -> Response:
        store = self.store
        assert store is not None
        tx_id = request.path_params["tx_id"]
        record = await self.in_db_thread(store.get, tx_id)
        if record is None:
            return json_error(404, f"no transaction with id {tx_id}")
        return JSONResponse(record)

    async def _transact(self, kind: str, msg: Message, original_id: str | None = None) -> Response:
        """Record, send, wait, record the answer, and render it."""
        store = self.store
        assert store is not None
        tx_id = await self.in_db_thread(store.open, kind, msg, original_id)
        key = key_of(msg)
        call = _API_CALLS.get(kind, kind)
        self.record.api("in", "http", call, key, "", time.monotonic(), time.time(), note=tx_id)
        http_status = 200
        details: dict[str, Any]
        code: str
        try:
            answer = await self.gateway.call(
                codec.encode(msg),
                match_key(msg),
                timeout=self.settings.gateway_timeout,
                resend_safe=not changes_state(msg),
            )
        except UpstreamError as exc:
            code = failure_code(exc, msg)
            http_status = _NO_ANSWER_STATUS.get(code, 200)
            status = status_of(code)
            details = {"message": describe(code), "error": str(exc)}
        else:
            code = answer.msg.get("39", RC.SYSTEM_MALFUNCTION)
            status = status_of(code)
            details = _answer_details(answer.msg)
            details["mac_verified"] = self.builder.response_mac_ok(answer.raw, answer.msg)
            if not details["mac_verified"]:
                # An answer that cannot be authenticated proves nothing about the outcome.
                status = "unknown"
                self.log.warning("response_mac_invalid", rrn=msg["37"])
        self.metrics.requests.labels(msg["t"], code).inc()
        self.record.api("out", "http", call, key, code, time.monotonic(), time.time(), note=tx_id)
        try:
            record = await self.in_db_thread(store.complete, tx_id, status, code, details)
        except STORAGE_FAILURES as exc:
            # The answer is known: say it, rather than invite a retry of a payment that
            # may be posted. The record stays "pending" until the database is back.
            self.log.error("transaction_not_recorded", rrn=msg["37"], error=database_reason(exc))
            record = _unrecorded(tx_id, kind, msg, status, code, details, original_id)
        if code == RC.ACTIVITY_LIMIT:
            # The gateway's rate limit: HTTP says so, and when to come back.
            return JSONResponse(record, status_code=429, headers={"Retry-After": "1"})
        return JSONResponse(record, status_code=http_status)


#: How the message record names the API call behind each kind of transaction.
_API_CALLS = {
    "inquiry": "POST /inquiries",
    "payment": "POST /payments",
    "reversal": "POST /payments/{id}/reversal",
}

#: HTTP status when no answer came: 503 if the gateway could not be reached, 504 if the
#: request went out and the answer did not come back (the outcome is unknown).
_NO_ANSWER_STATUS = {RC.ISSUER_INOPERATIVE: 503, RC.LATE_RESPONSE: 504}


def _unrecorded(
    tx_id: str,
    kind: str,
    msg: Message,
    status: str,
    code: str,
    details: dict[str, Any],
    original_id: str | None,
) -> dict[str, Any]:
    """The record the API would show, built in memory, for an answer the database did not
    take (``"recorded": false``)."""
    pan = msg.get("2")
    return {
        "id": tx_id,
        "kind": kind,
        "status": status,
        "approved": status == "approved",
        "response_code": code,
        "rrn": msg["37"],
        "stan": msg["11"],
        "bill": msg["48"],
        "amount": int(msg["4"]),
        "currency": msg["49"],
        "pan": mask_pan(pan) if pan else None,
        "original_id": original_id,
        "created_at": None,
        "completed_at": None,
        **details,
        "recorded": False,
    }


def _answer_details(resp: Message) -> dict[str, Any]:
    """What the API shows of a 0210/0430: code text, amount due, biller and customer."""
    code = resp.get("39", "")
    out: dict[str, Any] = {"message": describe(code)}
    if "38" in resp:
        out["approval_code"] = resp["38"]
    if "4" in resp and resp.get("3") == PC_BILL_INQUIRY:
        out["amount_due"] = int(resp["4"])
    if "62" in resp:
        biller, _, customer = resp["62"].partition("|")
        out["biller"] = biller
        out["customer"] = customer
    return out
