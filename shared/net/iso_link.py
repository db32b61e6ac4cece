"""An ISO-8583 link as the connection pool sees it: the received frame, the keyed decoder
(a response finds its request by :func:`~shared.iso.messages.match_key`), and the dialect of
network management messages (echo, sign-on, sign-off).

The HSM's counterparts live with its client (:mod:`hsm.client`).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import NamedTuple

from shared.iso import codec
from shared.iso.codes import RC
from shared.iso.messages import (
    NMI_ECHO,
    NMI_SIGN_OFF,
    NMI_SIGN_ON,
    Message,
    StanCounter,
    match_key,
    network_request,
)


class IsoFrame(NamedTuple):
    """A received ISO-8583 message: its raw payload (for MAC checks) and its fields."""

    raw: bytes
    msg: Message


def decode_iso_keyed(payload: bytes) -> tuple[Hashable, IsoFrame]:
    """Decoder for ISO links: (match key, frame). Raises DecodeError on garbage."""
    msg = codec.decode(payload)
    return match_key(msg), IsoFrame(payload, msg)


#: Answers that say "the upstream could not do it now": worth another attempt.
TRANSIENT_ANSWERS = frozenset({RC.ISSUER_INOPERATIVE.value, RC.SYSTEM_MALFUNCTION.value})


class IsoDialect:
    """Network management (0800) on an ISO-8583 link: 001 sign-on, 002 sign-off, 301 echo."""

    def __init__(self, stans: StanCounter | None = None) -> None:
        self._stans = stans or StanCounter()

    def _network(self, nmi: str) -> tuple[bytes, Hashable]:
        msg = network_request(nmi, self._stans.next())
        return codec.encode(msg), match_key(msg)

    def echo(self) -> tuple[bytes, Hashable]:
        return self._network(NMI_ECHO)

    def sign_on(self) -> tuple[bytes, Hashable] | None:
        return self._network(NMI_SIGN_ON)

    def sign_off(self) -> tuple[bytes, Hashable] | None:
        return self._network(NMI_SIGN_OFF)

    def accepted(self, response: IsoFrame) -> bool:
        return response.msg.get("39") == RC.APPROVED

    def failed_answer(self, response: IsoFrame) -> str | None:
        """``"rc_91"``/``"rc_96"`` when the answer says the upstream failed, else None."""
        code = response.msg.get("39")
        return f"rc_{code}" if code in TRANSIENT_ANSWERS else None
