"""Length-prefixed framing, sans-IO.

Every TCP link in paylab (ISO-8583 and HSM alike) carries frames: a length header
followed by that many bytes of payload. Two header kinds exist:

* ``binary2``: 2-byte big-endian unsigned length (the default, as on most switches);
* ``ascii4``: 4 ASCII decimal digits ("0123").

:class:`FrameParser` takes bytes in arbitrary chunks (partial frames, several frames in
one chunk) and hands back whole payloads. A zero length is a valid, empty frame (some
hosts send it as a keep-alive); the parser yields ``b""`` for it and the caller decides.
An oversize or malformed header raises :class:`~shared.errors.FramingError`; after it the
stream cannot be resynchronised and the connection must be closed.
"""

from __future__ import annotations

from enum import StrEnum

from shared.errors import FramingError

DEFAULT_MAX_FRAME = 8192


class HeaderKind(StrEnum):
    """The length header on the wire."""

    BINARY2 = "binary2"
    ASCII4 = "ascii4"

    @property
    def size(self) -> int:
        return 2 if self is HeaderKind.BINARY2 else 4

    @property
    def limit(self) -> int:
        """The largest length this header can express."""
        return 0xFFFF if self is HeaderKind.BINARY2 else 9999


def encode_frame(
    payload: bytes, kind: HeaderKind = HeaderKind.BINARY2, max_frame: int = DEFAULT_MAX_FRAME
) -> bytes:
    """Prefix ``payload`` with its length header.

    Raises :class:`FramingError` when the payload is longer than ``max_frame`` or than
    the header can express: refusing to send beats sending a frame the peer must drop.
    """
    n = len(payload)
    if n > max_frame or n > kind.limit:
        raise FramingError(
            f"frame of {n} bytes exceeds the maximum of {min(max_frame, kind.limit)}"
        )
    if kind is HeaderKind.BINARY2:
        return n.to_bytes(2, "big") + payload
    return b"%04d" % n + payload


class FrameParser:
    """Incremental frame splitter.

    Feed it with :meth:`feed`; take whole payloads with :meth:`next_frame` until it
    returns ``None``. It keeps at most one partial frame buffered, so memory per
    connection is bounded by ``max_frame`` plus one read.
    """

    __slots__ = ("_buf", "_kind", "_max")

    def __init__(self, kind: HeaderKind = HeaderKind.BINARY2, max_frame: int = DEFAULT_MAX_FRAME):
        self._kind = kind
        self._max = max_frame
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame (a partial frame in progress)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray) -> None:
        """Append received bytes."""
        self._buf += data

    def next_frame(self) -> bytes | None:
        """Return the next whole payload, or ``None`` if more bytes are needed.

        Raises :class:`FramingError` on a length above the maximum or a non-decimal
        ASCII header. The header is checked as soon as it is complete, before the body
        arrives, so an attacker cannot make us buffer an oversize frame.
        """
        size = self._kind.size
        if len(self._buf) < size:
            return None
        header = bytes(self._buf[:size])
        if self._kind is HeaderKind.BINARY2:
            length = int.from_bytes(header, "big")
        else:
            if not header.isdigit():
                raise FramingError(f"length header {header!r} is not 4 decimal digits")
            length = int(header)
        if length > self._max:
            raise FramingError(f"frame length {length} exceeds the maximum of {self._max}")
        end = size + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[size:end])
        del self._buf[:end]
        return payload

    def frames(self, data: bytes | bytearray = b"") -> list[bytes]:
        """Feed ``data`` and return every whole payload now available (convenience)."""
        if data:
            self.feed(data)
        out: list[bytes] = []
        while (frame := self.next_frame()) is not None:
            out.append(frame)
        return out
