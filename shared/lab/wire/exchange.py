"""The trio shell of ``paylab send``: one frame out, the first frame back."""

from __future__ import annotations

import trio

from shared.errors import FramingError, PaylabError
from shared.iso.framing import FrameParser, HeaderKind, encode_frame


class NoAnswer(PaylabError):
    """No answer came (timed out, or the peer closed the connection)."""


async def exchange(
    host: str, port: int, payload: bytes, kind: HeaderKind, timeout: float
) -> tuple[bytes, float]:
    """Send ``payload`` framed with ``kind`` to ``host:port``; (the answer's payload, seconds).

    Raises :class:`NoAnswer` when nothing comes back within ``timeout`` or the peer closes,
    :class:`PaylabError` when the connection cannot be made."""
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise PaylabError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    parser = FrameParser(kind)
    async with stream:
        start = trio.current_time()
        try:
            await stream.send_all(encode_frame(payload, kind))
        except FramingError as exc:
            raise PaylabError(str(exc)) from None
        except trio.BrokenResourceError as exc:
            raise NoAnswer(f"the connection broke while sending: {exc}") from None
        with trio.move_on_after(timeout):
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    raise NoAnswer("the peer closed the connection without an answer")
                parser.feed(data)
                frame = parser.next_frame()
                if frame is not None:
                    return bytes(frame), trio.current_time() - start
    raise NoAnswer(
        f"no answer within {timeout:g} s (an undecodable frame gets none; paylab trace or "
        "GET /messages shows what the listener saw)"
    )
