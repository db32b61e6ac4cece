"""Async client of the HSM, used by the gateway and billing.

It turns the sans-IO builders of :mod:`hsm.protocol` into calls over an
:class:`~shared.net.upstream.Upstream` (pool, breaker, retry). The 4-character message header
is the correlation key: many commands are in flight on one connection and each answer
finds its caller. HSM commands change nothing, so every one is safe to resend.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from dataclasses import dataclass
from typing import NamedTuple

from hsm import protocol
from hsm.protocol import HsmResponse
from shared.errors import UpstreamError
from shared.net.upstream import Upstream


class HsmCommandFailed(UpstreamError):
    """The HSM answered with an error code other than the one the caller can act on."""

    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"HSM {command} failed with error {error}")
        self.command = command
        self.error = error


@dataclass(frozen=True, slots=True)
class MacAndPin:
    """The answers of M8 (verify a MAC) and CA (translate a PIN block) asked together.

    ``mac_ok`` is the MAC verdict. CA's answer is kept unread (``pin_response``) and only
    :meth:`pin_block` reads it, which refuses to while the MAC is not good.
    """

    mac_ok: bool
    pin_response: HsmResponse | None = None

    def pin_block(self) -> str:
        """The translated PIN block, read as :meth:`HsmClient.translate_pin` reads it:
        raises :class:`HsmCommandFailed` (``"CA"``) when CA answered an error (20/23/24:
        the PIN block itself is bad). Raises :class:`ValueError` when the MAC was not good:
        such a block must never be used."""
        if not self.mac_ok or self.pin_response is None:
            raise ValueError("the MAC did not verify: the PIN block must not be used")
        return _translated_block(self.pin_response)


class MacAndPinRequests(NamedTuple):
    """M8 and CA as ``(payload, header)`` pairs, ready to go together."""

    mac: tuple[bytes, Hashable]
    pin: tuple[bytes, Hashable]


def _translated_block(resp: HsmResponse) -> str:
    """CA's answer read: the PIN block under the destination key, or HsmCommandFailed."""
    if resp.error != "00":
        raise HsmCommandFailed("CA", resp.error)
    _length, block = protocol.ca_result(resp)
    return block


def decode_hsm_keyed(payload: bytes) -> tuple[Hashable, HsmResponse]:
    """Decoder for HSM links: (message header, parsed response)."""
    resp = protocol.parse_response(payload)
    return resp.header, resp


class HsmDialect:
    """The pool's view of an HSM link: NC is the heartbeat; there is no sign-on or off.

    Heartbeat headers start with ``H`` so they never collide with the client's numeric
    headers on the same connection.
    """

    def __init__(self) -> None:
        self._n = itertools.cycle(range(1000))

    def echo(self) -> tuple[bytes, Hashable]:
        header = f"H{next(self._n):03d}"
        return protocol.build_nc(header), header

    def sign_on(self) -> tuple[bytes, Hashable] | None:
        return None

    def sign_off(self) -> tuple[bytes, Hashable] | None:
        return None

    def accepted(self, response: HsmResponse) -> bool:
        return response.error == "00"

    def failed_answer(self, response: HsmResponse) -> str | None:
        """HSM error codes are answers about the command, never a reason to resend."""
        return None


class HsmClient:
    """Typed HSM commands. Errors: :class:`~shared.errors.UpstreamError` subclasses."""

    def __init__(self, link: Upstream[HsmResponse], timeout: float) -> None:
        self._link = link
        self._timeout = timeout
        self._headers = itertools.cycle(range(10000))

    def _header(self) -> str:
        return f"{next(self._headers):04d}"

    async def _call(self, request: bytes, header: str) -> HsmResponse:
        return await self._link.call(request, header, timeout=self._timeout, resend_safe=True)

    async def diagnostics(self) -> HsmResponse:
        """NC: the HSM is alive and has its LMK loaded."""
        h = self._header()
        resp = await self._call(protocol.build_nc(h), h)
        if resp.error != "00":
            raise HsmCommandFailed("NC", resp.error)
        return resp

    async def translate_pin(self, tpk: str, zpk: str, pin_block: str, account12: str) -> str:
        """CA: re-encrypt a format-0 PIN block from the TPK to the ZPK.

        Returns the new PIN block. Raises :class:`HsmCommandFailed` (error 20/23/24 mean
        the PIN block itself is bad: treat as a wrong PIN).
        """
        h = self._header()
        resp = await self._call(protocol.build_ca(h, tpk, zpk, pin_block, account12), h)
        return _translated_block(resp)

    async def verify_pin(
        self, zpk: str, pvk: str, pin_block: str, account12: str, pvki: str, pvv: str
    ) -> bool:
        """EC: True if the PIN under the ZPK matches the PVV; False on error 01."""
        h = self._header()
        resp = await self._call(protocol.build_ec(h, zpk, pvk, pin_block, account12, pvki, pvv), h)
        if resp.error == "00":
            return True
        if resp.error == "01":
            return False
        raise HsmCommandFailed("EC", resp.error)

    async def generate_mac(self, key_type: str, key: str, data: bytes) -> str:
        """M6: ISO 9797-1 algorithm 3 MAC of ``data``, 16 hex digits."""
        h = self._header()
        resp = await self._call(protocol.build_m6(h, key_type, key, data), h)
        if resp.error != "00":
            raise HsmCommandFailed("M6", resp.error)
        return protocol.m7_mac(resp)

    async def verify_mac(self, key_type: str, key: str, data: bytes, mac: str) -> bool:
        """M8: True if ``mac`` is right for ``data``; False on error 01."""
        h = self._header()
        resp = await self._call(protocol.build_m8(h, key_type, key, data, mac), h)
        if resp.error == "00":
            return True
        if resp.error == "01":
            return False
        raise HsmCommandFailed("M8", resp.error)

    def mac_and_pin_requests(
        self,
        key_type: str,
        key: str,
        data: bytes,
        mac: str,
        *,
        tpk: str,
        zpk: str,
        pin_block: str,
        account12: str,
    ) -> MacAndPinRequests:
        """M8 (verify ``mac`` over ``data``) and CA (translate ``pin_block`` from ``tpk`` to
        ``zpk``), built for :meth:`verify_mac_and_translate_pin`. Sends nothing; raises
        :class:`~hsm.errors.HsmProtocolError` when an argument does not fit a layout."""
        h_mac, h_pin = self._header(), self._header()
        return MacAndPinRequests(
            (protocol.build_m8(h_mac, key_type, key, data, mac), h_mac),
            (protocol.build_ca(h_pin, tpk, zpk, pin_block, account12), h_pin),
        )

    async def verify_mac_and_translate_pin(self, requests: MacAndPinRequests) -> MacAndPin:
        """M8 and CA in one round trip: both commands (one per frame, as the HSM expects)
        leave in one write on one connection and the caller is woken once, when both
        answers are in (:meth:`Upstream.call_many`).

        The MAC verdict comes first: with a wrong MAC (M8 error 01) the result holds only
        ``mac_ok=False`` and the translated block is discarded unread. Raises
        :class:`HsmCommandFailed` when M8 answers any other error (whatever CA answered),
        and :class:`~shared.errors.UpstreamError` when the link fails (for both commands).
        """
        verdict, translated = await self._link.call_many(
            requests, timeout=self._timeout, resend_safe=True
        )
        if verdict.error == "01":
            return MacAndPin(mac_ok=False)  # CA's answer is dropped unread
        if verdict.error != "00":
            raise HsmCommandFailed("M8", verdict.error)
        return MacAndPin(mac_ok=True, pin_response=translated)
