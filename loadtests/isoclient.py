"""A blocking, framed ISO-8583 client for load tests: no trio, no locust.

The load-test users (``loadtests/locustfile.py``) play terminals talking to the gateway's ISO
listener. They must not run trio code inside locust's gevent loop, so this module uses only
the project's sans-IO pieces (``shared.iso.codec``, ``shared.iso.framing``, ``shared.iso.messages``,
``shared.crypto`` through ``acquirer.builder``, and ``hsm.keyfile`` for the shipped test keys)
over a plain :mod:`socket`. Under locust, :mod:`socket` is monkey-patched by gevent, so every
blocking call here yields to the other simulated users.

Contracts:

* :class:`IsoConnection` sends one frame per message (2-byte binary length header by
  default) and returns whole frames; a receive either returns a frame within its timeout or
  raises :class:`NoAnswer` (the connection stays usable) or :class:`ConnectionClosed`.
* :func:`check_code` raises :class:`UnexpectedResponse` unless the answer's MTI and field 39
  are among the expected ones; the exception text names both (for locust's failure table).
"""

from __future__ import annotations

import contextlib
import random
import secrets
import socket
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Final

from acquirer.builder import RequestBuilder, StanCounter, Terminal
from billing.demo_data import (
    DEMO_BILLS,
    DEMO_CARD,
    DEMO_CARDS,
    GENERATED_BILL_AMOUNT,
    DemoCard,
    generated_bill_number,
)
from hsm.keyfile import load_key_file
from shared.errors import FramingError
from shared.iso import codec
from shared.iso.codes import describe
from shared.iso.framing import FrameParser, HeaderKind, encode_frame
from shared.iso.messages import Message

__all__ = [
    "DEFAULT_ISO_PORT",
    "OPEN_BILLS",
    "Answer",
    "ConnectionClosed",
    "IsoConnection",
    "NoAnswer",
    "PayableBill",
    "UnexpectedResponse",
    "bill_picker",
    "card_for",
    "check_code",
    "load_terminal",
    "new_terminal_id",
    "parse_bills",
    "parse_target",
]

#: The gateway's ISO-8583 listener (``PAYLAB_GATEWAY_ISO_PORT`` default).
DEFAULT_ISO_PORT: Final = 9081
#: Largest frame accepted from the gateway (its answers are a few hundred bytes).
MAX_FRAME: Final = 8192
#: Demo bills billing seeds as open; payments and reversals keep flipping them.
OPEN_BILLS: Final = tuple(b for b in DEMO_BILLS if b.status == "open")

_CARDS_BY_CUSTOMER: Final = {c.name: c for c in DEMO_CARDS}


class NoAnswer(Exception):
    """No whole frame arrived within the timeout; the connection is still open."""


class ConnectionClosed(Exception):
    """The peer closed the connection (or it broke)."""


class UnexpectedResponse(Exception):
    """An answer arrived, but not one the scenario expects."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One received frame: its payload, the decoded message and the frame's size on the wire."""

    raw: bytes
    msg: Message
    length: int

    @property
    def code(self) -> str:
        """Field 39, or ``""`` when absent."""
        return self.msg.get("39", "")


def parse_target(value: str, default_port: int = DEFAULT_ISO_PORT) -> tuple[str, int]:
    """``host:port``, ``tcp://host:port`` or ``host`` -> (host, port).

    Raises ValueError for an empty host or a port that is not a number in 1..65535.
    """
    rest = value.strip()
    if "://" in rest:
        rest = rest.split("://", 1)[1]
    rest = rest.rstrip("/")
    host, sep, port_text = rest.rpartition(":")
    if not sep:
        host, port_text = rest, str(default_port)
    host = host.strip("[]")
    if not host:
        raise ValueError(f"no host in ISO target {value!r}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in ISO target {value!r}")
    return host, int(port_text)


def new_terminal_id() -> str:
    """A random 8-character terminal id (``L`` + 7 hex digits): unique across workers."""
    return "L" + secrets.token_hex(4)[:7].upper()


def load_terminal(terminal_id: str) -> RequestBuilder:
    """A request builder for a terminal using the shipped test keys (TPK, TAK).

    Same identity as ``tests.support.make_terminal`` except the terminal id; its STAN
    counter starts at a random point.
    """
    keys = load_key_file()
    terminal = Terminal(
        acquirer_id="008",
        terminal_id=terminal_id,
        merchant_id="PAYLAB-MERCH-01",
        currency="360",
        tpk=keys.keys["TPK"].clear,
        tak=keys.keys["TAK"].clear,
    )
    return RequestBuilder(terminal, StanCounter())


def card_for(customer: str) -> DemoCard:
    """The demo card of a demo customer (each customer holds exactly one)."""
    return _CARDS_BY_CUSTOMER[customer]


@dataclass(frozen=True, slots=True)
class PayableBill:
    """A bill to pay, its amount due, and the card of its holder."""

    bill_number: str
    amount_due: int
    card: DemoCard = field(repr=False)


def parse_bills(spec: str | None) -> tuple[str, int] | None:
    """``PAYLAB_LOAD_BILLS`` (``<prefix>:<count>``, as ``paylab bills add`` prints it) as
    ``(prefix, count)``; None when unset or empty. Raises ``ValueError`` when malformed."""
    if not spec:
        return None
    prefix, sep, count = spec.partition(":")
    if not sep or not prefix or not count.isdigit() or int(count) < 1:
        raise ValueError(f"PAYLAB_LOAD_BILLS must look like LOAD:10000, not {spec!r}")
    return prefix, int(count)


def bill_picker(spec: str | None, rng: random.Random | None = None) -> Callable[[], PayableBill]:
    """A function giving a random bill to pay each call.

    With ``spec`` (see :func:`parse_bills`) the bills are the generated ones of ``paylab
    bills add``: many open bills, so payments keep being approved until most are paid.
    Without it, the open demo bills: under load they are soon all paid and payments answer
    ``88`` (an expected outcome, not a failure).
    """
    pick = rng or random.Random()
    parsed = parse_bills(spec)
    if parsed is None:

        def demo() -> PayableBill:
            bill = pick.choice(OPEN_BILLS)
            return PayableBill(bill.bill_number, bill.amount_due, card_for(bill.customer))

        return demo
    prefix, count = parsed

    def generated() -> PayableBill:
        number = generated_bill_number(prefix, pick.randrange(count))
        return PayableBill(number, GENERATED_BILL_AMOUNT, DEMO_CARD)

    return generated


def check_code(
    answer: Answer,
    expected_mti: str,
    expected_codes: Collection[str],
    builder: RequestBuilder | None = None,
) -> str:
    """Return field 39 if ``answer`` is ``expected_mti`` with a code in ``expected_codes``.

    With ``builder``, the gateway's response MAC must verify too. Raises
    :class:`UnexpectedResponse` otherwise.
    """
    mti, code = answer.msg.get("t", ""), answer.code
    if mti != expected_mti:
        raise UnexpectedResponse(f"expected MTI {expected_mti}, got {mti or 'none'}")
    if code not in expected_codes:
        want = "/".join(sorted(expected_codes))
        raise UnexpectedResponse(f"expected {want}, got {code or '--'} ({describe(code)})")
    if builder is not None and not builder.response_mac_ok(answer.raw, answer.msg):
        raise UnexpectedResponse(f"response MAC does not verify (code {code})")
    return code


def same_transaction(answer: Answer, request: Mapping[str, str]) -> bool:
    """True when ``answer`` carries the request's STAN (11) and terminal (41)."""
    return answer.msg.get("11") == request.get("11") and answer.msg.get("41") == request.get("41")


class IsoConnection:
    """One TCP connection to an ISO-8583 listener, framed. Not safe for concurrent use.

    The connection is opened by :meth:`connect` (or lazily by :meth:`send`); after
    :class:`ConnectionClosed` or any other socket error, call :meth:`close` and start again.
    """

    def __init__(
        self,
        host: str,
        port: int,
        kind: HeaderKind = HeaderKind.BINARY2,
        connect_timeout: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self.kind = kind
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._parser = FrameParser(kind, MAX_FRAME)
        self._frames: list[bytes] = []

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self) -> None:
        """Open the connection if it is not open (TCP_NODELAY: one frame, one segment)."""
        if self._sock is not None:
            return
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._parser = FrameParser(self.kind, MAX_FRAME)
        self._frames = []

    def close(self) -> None:
        """Close the connection (idempotent); buffered frames are dropped."""
        sock, self._sock = self._sock, None
        self._frames = []
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def send_payload(self, payload: bytes) -> int:
        """Send ``payload`` as one frame; returns the bytes written (header included)."""
        self.connect()
        assert self._sock is not None
        frame = encode_frame(payload, self.kind, MAX_FRAME)
        self._sock.settimeout(self.connect_timeout)
        self._sock.sendall(frame)
        return len(frame)

    def send(self, msg: Message) -> bytes:
        """Encode and send ``msg``; returns the payload sent (to resend it byte for byte)."""
        payload = codec.encode(msg)
        self.send_payload(payload)
        return payload

    def receive(self, timeout: float) -> Answer:
        """The next whole frame, decoded. Raises :class:`NoAnswer` after ``timeout`` s.

        A frame that does not decode raises :class:`UnexpectedResponse`; a broken stream
        (peer closed, bad length header) raises :class:`ConnectionClosed`.
        """
        sock = self._sock
        if sock is None:
            raise ConnectionClosed("not connected")
        deadline = time.monotonic() + timeout
        while not self._frames:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoAnswer(f"no answer within {timeout:g} s")
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise ConnectionClosed(f"connection broken: {exc}") from exc
            if not data:
                raise ConnectionClosed("connection closed by the server")
            try:
                self._frames.extend(self._parser.frames(data))
            except FramingError as exc:
                raise ConnectionClosed(f"bad frame from the server: {exc}") from exc
        raw = self._frames.pop(0)
        try:
            msg = codec.decode(raw)
        except Exception as exc:
            raise UnexpectedResponse(f"undecodable answer ({len(raw)} bytes)") from exc
        return Answer(raw, msg, len(raw) + self.kind.size)

    def receive_for(self, request: Mapping[str, str], timeout: float) -> Answer:
        """The next answer to ``request`` (same STAN and terminal); stale answers are skipped.

        A stale answer is a late one to an earlier request given up on; skipping it keeps
        one slow answer from failing the next request too.
        """
        deadline = time.monotonic() + timeout
        while True:
            answer = self.receive(max(0.0, deadline - time.monotonic()))
            if same_transaction(answer, request):
                return answer

    def roundtrip(self, msg: Message, timeout: float) -> Answer:
        """Send ``msg`` and return its answer (see :meth:`receive_for`)."""
        self.send(msg)
        return self.receive_for(msg, timeout)
