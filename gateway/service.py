"""The gateway (switch): where a payment from an acquirer is checked, translated,
forwarded to billing and answered.

The path of one 0200, each step one method so later mechanisms plug in at one place:

1. :meth:`dispatch` runs the steps below and journals the outcome;
2. :meth:`_check_mac` asks the HSM to verify the acquirer's MAC (M8) -> 63 if wrong;
3. :meth:`_translate_pin` re-encrypts the PIN block from the terminal key to billing's
   zone key (CA) -> 55 if the block is not a PIN at all;
4. :meth:`_forward` sends the message to billing over the multiplexed link and waits
   for the matching answer -> 91 when there is no link, 68 when the outcome is unknown.
   **This is the seam** where the connection pool, retry with backoff, the circuit
   breaker and the store-and-forward queue plug in: they change how ``_forward`` gets
   an answer, not what the rest of the pipeline does with it;
5. :meth:`finish` MACs the response (M6).

The journal row (one per answered request) is handed to a batching writer after the
answer is decided; see :class:`gateway.journal.JournalWriter` for why that is safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime

import trio
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.journal import Journal, JournalView, JournalWriter, journal_row
from hsm.client import HsmClient, HsmCommandFailed, decode_hsm_keyed
from hsm.keyfile import KeyFile, load_key_file
from shared import codec
from shared.codes import RC
from shared.errors import UpstreamError, ValidationError
from shared.http import json_error
from shared.messages import (
    MTI_ADVICE,
    MTI_FINANCIAL,
    MTI_NETWORK,
    MTI_REVERSAL,
    Message,
    failure_code,
    make_response,
    match_key,
    response_mti,
)
from shared.pan import PanHasher, account_number_12
from shared.service import IsoFrame, IsoService, decode_iso_keyed
from shared.settings import Settings
from shared.validation import validate_response

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

    def __init__(self, settings: Settings, keys: KeyFile | None = None) -> None:
        super().__init__(settings)
        keys = keys or load_key_file(settings.key_file)
        self._tak = keys.keys["TAK"].under_lmk
        self._tpk = keys.keys["TPK"].under_lmk
        self._zpk = keys.keys["ZPK"].under_lmk
        self.pan_hash = PanHasher(settings.pan_hash_key.encode())
        self.billing = self.add_link("billing", settings.address("billing"), decode_iso_keyed)
        hsm_link = self.add_link("hsm", settings.address("hsm"), decode_hsm_keyed)
        self.hsm = HsmClient(hsm_link, settings.hsm_timeout)
        self.journal: Journal | None = None
        self.journal_writer: JournalWriter | None = None

    def prepare_database(self, sessions: sessionmaker[Session]) -> None:
        self.journal = Journal(sessions)
        self.journal_writer = JournalWriter(self.journal, self.log)

    async def start_background(self, nursery: trio.Nursery) -> None:
        assert self.journal_writer is not None
        await nursery.start(self.journal_writer.run)

    async def close_resources(self) -> None:
        if self.journal_writer is not None:
            await self.journal_writer.close()
        await super().close_resources()

    # -- the pipeline -------------------------------------------------------------------------
    async def dispatch(self, frame: IsoFrame, peer: str) -> Message:
        msg = frame.msg
        if msg["t"] == MTI_NETWORK:
            return make_response(msg, RC.APPROVED)
        writer = self.journal_writer
        assert writer is not None
        start = trio.current_time()
        received_at = datetime.now(UTC)
        try:
            await self._check_mac(frame)
            forward = await self._translate_pin(msg)
            response = await self._forward(forward)
        except _Decline as d:
            response = make_response(msg, d.code)
        code = response.get("39", RC.SYSTEM_MALFUNCTION)
        elapsed_ms = (trio.current_time() - start) * 1000
        await writer.submit(
            journal_row(
                msg,
                code,
                received_at=received_at,
                duration_ms=elapsed_ms,
                pan_hash=self.pan_hash,
            )
        )
        if code == RC.LATE_RESPONSE:
            self.log.warning("outcome_unknown", rrn=msg.get("37"), mti=msg["t"])
        return response

    async def _check_mac(self, frame: IsoFrame) -> None:
        placed = codec.mac_input_of_received(frame.raw, frame.msg)
        if placed is None:
            raise _Decline(RC.FORMAT_ERROR)  # MAC in the wrong field for this message
        mac, data = placed
        try:
            ok = await self.hsm.verify_mac(KEY_TYPE_TAK, self._tak, data, mac)
        except UpstreamError as exc:
            self.log.warning("hsm_failed", step="verify_mac", error=str(exc))
            raise _Decline(RC.SYSTEM_MALFUNCTION) from None
        if not ok:
            self.log.warning("mac_mismatch", rrn=frame.msg.get("37"))
            raise _Decline(RC.SECURITY_VIOLATION)

    async def _translate_pin(self, msg: Message) -> Message:
        """The message to forward: no MAC, PIN block (if any) under billing's ZPK."""
        fwd = {k: v for k, v in msg.items() if k not in ("64", "128")}
        block = msg.get("52")
        if block is None:
            return fwd
        try:
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

    async def _forward(self, fwd: Message) -> Message:
        """Send to billing and return its answer, or the code for why there is none."""
        try:
            answer = await self.billing.call(
                codec.encode(fwd), match_key(fwd), self.settings.billing_timeout
            )
        except UpstreamError as exc:
            raise _Decline(failure_code(exc, fwd)) from None
        try:
            validate_response(answer.msg)
        except ValidationError:
            self.log.warning("invalid_upstream_response", upstream="billing")
            raise _Decline(RC.SYSTEM_MALFUNCTION) from None
        response = {k: v for k, v in answer.msg.items() if k not in ("52", "64", "128")}
        response["t"] = response_mti(fwd["t"])
        return response

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
        return [Route("/transactions", self._transactions, methods=["GET"])]

    async def _transactions(self, request: Request) -> Response:
        """``GET /transactions?rrn=...|stan=...&limit=50``: journal rows, newest first."""
        journal, writer = self.journal, self.journal_writer
        if journal is None or writer is None:
            return json_error(503, "journal not open")
        try:
            limit = max(1, min(int(request.query_params.get("limit", "50")), 500))
        except ValueError:
            return json_error(400, "limit must be a whole number")
        await writer.flush()  # show every answer already sent
        rows = await self.in_db_thread(
            lambda: journal.find(
                rrn=request.query_params.get("rrn"),
                stan=request.query_params.get("stan"),
                limit=limit,
            )
        )
        return JSONResponse({"items": [_row_json(r) for r in rows]})


def _row_json(row: JournalView) -> dict[str, object]:
    d = asdict(row)
    d["received_at"] = row.received_at.isoformat()
    return d
