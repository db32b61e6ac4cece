"""Thin trio shells around the sans-IO framing: a framed server and multiplexed clients.

:class:`FramedServer` reads bytes, feeds a :class:`~shared.iso.framing.FrameParser`, runs one
handler task per whole frame (so a slow request never blocks the next one on the same
connection) and writes whatever the handler returns. :class:`MultiplexedConnection` is
the client side of one connection with many requests in flight, matched to responses by
a key; :class:`shared.net.pool.UpstreamPool` keeps several of them to a peer.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import trio

from shared.errors import FramingError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from shared.iso.framing import DEFAULT_MAX_FRAME, FrameParser, HeaderKind, encode_frame
from shared.ops.metrics import ServiceMetrics
from shared.resilience.ratelimit import ConnectionLimiter
from shared.store.group_commit import GroupCommit

T = TypeVar("T")
_READ_SIZE = 65536
#: Inline frames answered between two checkpoints (their answers then leave together).
_INLINE_BATCH = 128

#: A request handler: one whole frame payload in, the response payload out (None: no answer).
FrameHandler = Callable[[bytes, str], Awaitable[bytes | None]]

#: A handler that answers at once, without waiting on anything (see ``FramedServer(inline=)``).
InlineHandler = Callable[[bytes, str], bytes | None]

#: Judges a TLS client by its verified certificate (``getpeercert()``): (its identity, why it
#: is refused, or None when it is accepted).
ClientCheck = Callable[[Any], tuple[str | None, str | None]]


class FramedServer:
    """Accepts TCP connections and serves length-prefixed frames with ``handler``.

    Contract:
    * each frame is handled in its own task; answers may leave out of order;
    * at most ``max_in_flight`` frames per connection are in progress; beyond it the
      server stops reading that connection (TCP back-pressure), it does not drop frames;
    * a handler exception is logged and counted; the connection and the server live on;
    * a connection beyond ``max_connections_per_source`` from one address, or beyond
      ``max_connections`` overall (0: no limit), is closed at once, logged and counted;
      everyone else keeps being served;
    * a framing error (oversize or malformed length) is logged without content, counted,
      and closes that connection after its in-flight requests are answered;
    * a frame that is not whole ``frame_timeout`` seconds after its first byte arrived, or
      a connection that sends no message for ``idle_timeout`` seconds (0: no limit), is
      closed the same way, logged and counted (slowloris guard). Only a frame that carries
      a message restarts the idle clock: zero-length keep-alive frames do not, so a peer
      that sends nothing else is closed when its idle time is up;
    * with ``ssl_context``, every accepted connection is wrapped in TLS; the handshake runs
      in that connection's own task within ``handshake_timeout`` seconds, so a peer that
      never handshakes cannot hold up accepting. A failed or timed-out handshake is logged
      (``tls_handshake_failed``), counted (``connections_refused{reason="tls"}``) and closes
      only that connection. With ``client_check`` (mutual TLS), a client whose certificate
      it refuses is closed after the handshake the same way (``tls_peer_refused``,
      ``connections_refused{reason="peer"}``);
    * :meth:`shutdown` stops accepting and reading, lets in-flight requests finish within
      ``grace`` seconds, then closes every connection.

    With ``inline``, frames are answered by that synchronous function in the reading task
    instead, one after the other in arrival order, and the answers to every frame of one read
    go out in one send (every 128 frames at most, so one large read cannot hold the event
    loop). This is for handlers that are pure CPU work of microseconds (the HSM), where a
    task, a cancel scope and a send per frame cost more than the work itself.
    Reading pauses while the answers are sent, which is the back-pressure; a framing error
    still answers the whole frames before it. ``handler`` is then unused.
    """

    def __init__(
        self,
        name: str,
        handler: FrameHandler,
        *,
        host: str,
        port: int,
        metrics: ServiceMetrics,
        log: Any,
        kind: HeaderKind = HeaderKind.BINARY2,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_in_flight: int = 256,
        max_connections_per_source: int = 0,
        max_connections: int = 0,
        frame_timeout: float = 0.0,
        idle_timeout: float = 0.0,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
        client_check: ClientCheck | None = None,
        inline: InlineHandler | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self._handler = handler
        self._inline = inline
        self._metrics = metrics
        self._log = log
        self._kind = kind
        self._max_frame = max_frame
        self._max_in_flight = max_in_flight
        self._frame_timeout = frame_timeout
        self._idle_timeout = idle_timeout
        self._ssl_context = ssl_context
        self._handshake_timeout = handshake_timeout
        self._client_check = client_check
        self._accept_scope = trio.CancelScope()
        self._reader_scopes: set[trio.CancelScope] = set()
        self._conn_nursery: trio.Nursery | None = None
        self._closing = False
        self._conn_limits = ConnectionLimiter(
            per_source=max_connections_per_source, total=max_connections
        )

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until :meth:`shutdown` (or cancellation). Reports the bound port."""
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as conn_nursery:
            self._conn_nursery = conn_nursery
            with self._accept_scope:
                task_status.started(self.port)
                await trio.serve_listeners(
                    self._serve_conn, listeners, handler_nursery=conn_nursery
                )
            for listener in listeners:
                await listener.aclose()

    def shutdown(self, grace: float) -> None:
        """Stop accepting and reading; in-flight requests get ``grace`` seconds to finish."""
        self._closing = True
        self._accept_scope.cancel()
        for scope in list(self._reader_scopes):
            scope.cancel()
        if self._conn_nursery is not None:
            self._conn_nursery.cancel_scope.deadline = trio.current_time() + grace

    async def _serve_conn(self, stream: trio.SocketStream) -> None:
        if self._closing:
            await stream.aclose()
            return
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            host, peer = "?", "?"
        refused = self._conn_limits.acquire(host)
        if refused is not None:
            self._metrics.connections_refused.labels(refused).inc()
            self._log.warning("connection_refused", listener=self.name, peer=peer, limit=refused)
            await stream.aclose()
            return
        try:
            served: trio.abc.Stream | None = stream
            if self._ssl_context is not None:
                served = await self._tls_handshake(stream, peer)
            if served is not None:
                await self._serve_accepted(served, peer)
        finally:
            self._conn_limits.release(host)

    async def _tls_handshake(
        self, stream: trio.SocketStream, peer: str
    ) -> trio.SSLStream[Any] | None:
        """The TLS stream over ``stream``, or None (logged, counted, closed) on failure."""
        assert self._ssl_context is not None
        tls = trio.SSLStream(stream, self._ssl_context, server_side=True)
        reason: str | None = None
        try:
            with trio.move_on_after(self._handshake_timeout) as waited:
                await tls.do_handshake()
            if waited.cancelled_caught:
                reason = "timeout"
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            reason = type(cause).__name__ if cause is not None else "broken"
            if isinstance(cause, ssl.SSLError) and cause.reason:
                reason = cause.reason
        except trio.ClosedResourceError:
            reason = "closed"
        except BaseException:  # cancelled (shutdown): the socket must not leak
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            raise
        if reason is None and not self._closing:
            if self._client_check is None:
                return tls
            identity, refused = self._client_check(tls.getpeercert())
            if refused is None:
                return tls
            self._metrics.connections_refused.labels("peer").inc()
            self._log.warning(
                "tls_peer_refused",
                listener=self.name,
                peer=peer,
                identity=identity,
                reason=refused,
            )
        elif reason is not None:
            self._metrics.connections_refused.labels("tls").inc()
            self._log.warning("tls_handshake_failed", listener=self.name, peer=peer, reason=reason)
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
        return None

    async def _serve_accepted(self, stream: trio.abc.Stream, peer: str) -> None:
        parser = FrameParser(self._kind, self._max_frame)
        sender = frame_sender(stream)
        slots = trio.Semaphore(self._max_in_flight)
        self._metrics.connections.inc()
        try:
            async with trio.open_nursery() as nursery:
                with trio.CancelScope() as reader:
                    self._reader_scopes.add(reader)
                    try:
                        await self._read_loop(stream, peer, parser, nursery, sender, slots)
                    finally:
                        self._reader_scopes.discard(reader)
        finally:
            self._metrics.connections.dec()
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await stream.aclose()  # a TLS close_notify never waits long on a stuck peer

    async def _read_loop(
        self,
        stream: trio.abc.Stream,
        peer: str,
        parser: FrameParser,
        nursery: trio.Nursery,
        sender: FrameSender,
        slots: trio.Semaphore,
    ) -> None:
        last_message = trio.current_time()  # the idle clock: keep-alives do not restart it
        keepalives = 0  # zero-length frames since the last message
        frame_started: float | None = None  # when the first byte of a partial frame came
        while True:
            deadline, why = self._read_deadline(last_message, frame_started)
            data: bytes | bytearray = b""
            try:
                with trio.move_on_at(deadline) as waited:
                    data = await stream.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if waited.cancelled_caught:
                self._metrics.connections_timed_out.labels(why).inc()
                self._log.warning(
                    "connection_timed_out",
                    listener=self.name,
                    peer=peer,
                    reason=why,
                    buffered=parser.buffered,
                    keepalives=keepalives,
                )
                return
            if not data:
                return
            now = trio.current_time()
            if frame_started is None:
                frame_started = now
            parser.feed(data)
            served = False
            answers: list[bytes] = []  # inline answers of this read, sent together
            inline_count = 0
            sent = True
            try:
                while True:
                    try:
                        frame = parser.next_frame()
                    except FramingError as exc:
                        self._metrics.frames_rejected.labels("framing").inc()
                        self._log.warning(
                            "framing_error", listener=self.name, peer=peer, reason=str(exc)
                        )
                        return
                    if frame is None:
                        break
                    served = True
                    if not frame:
                        keepalives += 1
                        continue  # a zero-length frame: a keep-alive, nothing to answer
                    last_message = now
                    keepalives = 0
                    if self._inline is not None:
                        out = self._answer_inline(frame, peer)
                        if out is not None:
                            answers.append(out)
                        inline_count += 1
                        if inline_count % _INLINE_BATCH == 0:
                            # One read can hold thousands of small frames: send what is
                            # answered so far, a checkpoint, so that others get their turn.
                            batch, answers = answers, []
                            if not batch:
                                await trio.lowlevel.checkpoint()
                            elif not await _send_quietly(sender, b"".join(batch)):
                                return
                        continue
                    await slots.acquire()
                    nursery.start_soon(self._handle_one, peer, frame, sender, slots)
            finally:
                if answers:
                    with trio.CancelScope(shield=True):
                        sent = await _send_quietly(sender, b"".join(answers))
            if not sent:
                return  # the peer is gone: nothing more to read from it
            if served:  # the rest (if any) is the start of the next frame: its clock starts
                frame_started = trio.current_time() if parser.buffered else None

    def _read_deadline(self, last_message: float, frame_started: float | None) -> tuple[float, str]:
        return read_deadline(
            last_message,
            frame_started,
            idle_timeout=self._idle_timeout,
            frame_timeout=self._frame_timeout,
        )

    def _answer_inline(self, frame: bytes, peer: str) -> bytes | None:
        """The framed answer of the inline handler to ``frame`` (None: no answer)."""
        assert self._inline is not None
        try:
            response = self._inline(frame, peer)
        except Exception:
            self._metrics.handler_errors.inc()
            self._log.exception("handler_failed", listener=self.name, peer=peer)
            return None
        return None if response is None else self._framed(response)

    def _framed(self, response: bytes) -> bytes | None:
        try:
            return encode_frame(response, self._kind, self._max_frame)
        except FramingError:
            self._log.error("response_too_large", listener=self.name, size=len(response))
            return None

    async def _handle_one(
        self,
        peer: str,
        frame: bytes,
        sender: FrameSender,
        slots: trio.Semaphore,
    ) -> None:
        try:
            try:
                response = await self._handler(frame, peer)
            except Exception:
                self._metrics.handler_errors.inc()
                self._log.exception("handler_failed", listener=self.name, peer=peer)
                return
            if response is None:
                return
            out = self._framed(response)
            if out is not None:
                await _send_quietly(sender, out)
        finally:
            slots.release()


def read_deadline(
    last_message: float,
    frame_started: float | None,
    *,
    idle_timeout: float,
    frame_timeout: float,
) -> tuple[float, str]:
    """When a listener's next read gives up, and why (pure; 0 turns a timeout off).

    ``idle``: ``idle_timeout`` seconds after the last frame that carried a message (or the
    accept); keep-alive frames do not count. ``frame``: ``frame_timeout`` seconds after the
    first byte of the frame in progress (``frame_started``). A frame begun before the idle
    time was up may still finish within its own frame timeout; one begun later may not, so
    a peer cannot stretch its idle time with partial frames.
    """
    idle = last_message + idle_timeout if idle_timeout > 0 else math.inf
    frame = math.inf
    if frame_started is not None and frame_timeout > 0:
        frame = frame_started + frame_timeout
    if frame <= idle and math.isfinite(frame):
        return frame, "frame"
    if frame_started is not None and frame_started < idle and math.isfinite(frame):
        return frame, "frame"
    return idle, "idle"


async def _send_quietly(sender: FrameSender, out: bytes) -> bool:
    """Send an answer; False if the peer went away (its answer has nowhere to go)."""
    try:
        await sender.submit(out)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


#: Seconds a send may wait for a peer that does not read before its connection is closed.
SEND_TIMEOUT = 10.0

#: Sends whole frames on one stream (see :func:`frame_sender`).
FrameSender = GroupCommit[bytes, None]


def frame_sender(stream: trio.abc.Stream) -> FrameSender:
    """Sends frames on ``stream``, one writer at a time: frames handed in while a send is
    in progress go out together in the next one. Under load that is one system call (and
    one TLS record) for many frames; an idle connection sends at once, as before. A send,
    once started, is finished even if its caller is cancelled, so a frame is never cut
    in half on the wire; a peer that stops reading for :data:`SEND_TIMEOUT` seconds gets its
    connection closed. Errors of the stream (broken, closed) reach every caller whose frame
    was in the failed send."""

    async def write(frames: Sequence[bytes]) -> list[None]:
        with trio.move_on_after(SEND_TIMEOUT) as waited:
            await stream.send_all(frames[0] if len(frames) == 1 else b"".join(frames))
        if waited.cancelled_caught:
            # The peer stopped reading. Part of a frame may be out, so the byte stream is
            # unusable: close it (its reader ends too) rather than block forever.
            await trio.aclose_forcefully(stream)
            raise trio.BrokenResourceError(f"send stalled for {SEND_TIMEOUT:g} s; closed")
        return [None] * len(frames)

    return GroupCommit(write, max_batch=256)


@dataclass(slots=True)
class _Waiter:
    event: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


class MultiplexedConnection(Generic[T]):
    """One client connection carrying many requests at once.

    ``decode`` turns a response payload into ``(key, value)``; the value is handed to the
    caller whose request was sent with the same key. Responses whose key matches no
    request in flight (late, after a timeout, or unknown) go to ``on_unmatched``.

    :meth:`run` must be running (in a nursery) for responses to be received; when the
    connection ends, every caller still waiting gets :class:`UpstreamUnavailable` with
    ``sent=True`` (the request may have been processed).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        decode: Callable[[bytes], tuple[Hashable, T]],
        *,
        kind: HeaderKind = HeaderKind.BINARY2,
        max_frame: int = DEFAULT_MAX_FRAME,
        on_unmatched: Callable[[bytes, Hashable | None], None] = lambda payload, key: None,
    ) -> None:
        self._stream = stream
        self._decode = decode
        self._kind = kind
        self._max_frame = max_frame
        self._on_unmatched = on_unmatched
        self._pending: dict[Hashable, _Waiter] = {}
        self._sender = frame_sender(stream)
        self.closed = False
        #: Set once the connection has ended (peer closed, broken, or closed by us).
        self.closed_event = trio.Event()
        #: When a response (or an echo answer) last arrived: heartbeats go out after idling.
        self.last_activity = trio.current_time()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Receive responses until the peer closes or the stream breaks."""
        parser = FrameParser(self._kind, self._max_frame)
        task_status.started()
        try:
            while True:
                data = await self._stream.receive_some(_READ_SIZE)
                if not data:
                    return
                self.last_activity = trio.current_time()
                for payload in parser.frames(data):
                    if payload:
                        self._dispatch(payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError, FramingError):
            return
        finally:
            self._fail_all()
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await self._stream.aclose()  # bounded: a TLS close_notify to a stuck peer

    def _dispatch(self, payload: bytes) -> None:
        try:
            key, value = self._decode(payload)
        except Exception:
            self._on_unmatched(payload, None)
            return
        waiter = self._pending.pop(key, None)
        if waiter is None:
            self._on_unmatched(payload, key)
            return
        waiter.result = value
        waiter.event.set()

    def _fail_all(self) -> None:
        self.closed = True
        self.closed_event.set()
        for waiter in self._pending.values():
            waiter.error = UpstreamUnavailable("connection closed before the answer", sent=True)
            waiter.event.set()
        self._pending.clear()

    async def request(self, payload: bytes, key: Hashable, timeout: float) -> T:
        """Send ``payload`` and wait for the response with ``key``.

        Raises :class:`UpstreamUnavailable` (``sent=False`` if nothing went out),
        :class:`UpstreamTimeout` after ``timeout`` seconds (outcome unknown), or
        :class:`UpstreamError` if a request with the same key is already in flight.
        """
        if self.closed:
            raise UpstreamUnavailable("connection is closed")
        if key in self._pending:
            raise UpstreamError("a request with the same key is already in flight")
        waiter = _Waiter()
        self._pending[key] = waiter
        frame = encode_frame(payload, self._kind, self._max_frame)
        try:
            try:
                await self._sender.submit(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.closed = True
                raise UpstreamUnavailable("connection broke while sending", sent=True) from exc
            with trio.move_on_after(timeout):
                await waiter.event.wait()
            if not waiter.event.is_set():
                raise UpstreamTimeout(f"no answer within {timeout:g} s")
            if waiter.error is not None:
                raise waiter.error
            result: T = waiter.result
            return result
        finally:
            if self._pending.get(key) is waiter:
                del self._pending[key]

    async def aclose(self) -> None:
        """Close the stream; :meth:`run` then fails every caller still waiting."""
        self.closed = True
        await self._stream.aclose()
