"""Thin trio shells around the sans-IO framing: a framed server and multiplexed clients.

:class:`FramedServer` reads bytes, feeds a :class:`~shared.iso.framing.FrameParser`, runs one
handler task per whole frame (so a slow request never blocks the next one on the same
connection) and writes whatever the handler returns. :class:`MultiplexedConnection` is
the client side of one connection with many requests in flight, matched to responses by
a key; :class:`shared.net.pool.UpstreamPool` keeps several of them to a peer.
"""

from __future__ import annotations

import heapq
import math
import ssl
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

import trio

from shared.errors import FramingError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from shared.iso.framing import DEFAULT_MAX_FRAME, FrameParser, HeaderKind, encode_frame
from shared.ops.metrics import ServiceMetrics
from shared.resilience.ratelimit import ConnectionLimiter

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
    * at most ``max_in_flight`` frames per connection are in progress (being handled, or
      their answer waiting to be sent); beyond it the server stops reading that connection
      (TCP back-pressure), it does not drop frames. A handler's task ends as soon as its
      answer is handed to the connection's sender: it does not wait for the send;
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
                    if slots.value:
                        slots.acquire_nowait()  # room: no checkpoint per frame
                    else:
                        await slots.acquire()  # full: stop reading (back-pressure)
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
        handed_over = False  # the sender releases the slot once the answer is out
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
                handed_over = True
                await sender.send_answer(out, slots.release)
        finally:
            if not handed_over:
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


class _Ticket:
    """A frame waiting for the sender (see :class:`FrameSender`)."""

    __slots__ = ("error", "finished", "wake")

    def __init__(self) -> None:
        #: Set when the frame is sent (``finished``) or when this caller must send next.
        self.wake = trio.Event()
        self.finished = False
        self.error: BaseException | None = None


class FrameSender:
    """Sends whole frames on one stream, one writer at a time.

    Contract:
    * a caller that finds nobody sending sends its bytes at once (no queue, no event);
    * frames handed in while a send is in progress go out together in the next send, made
      by the oldest of their callers (under load: one system call, and one TLS record, for
      many frames); that caller sends until its own frame is out, then hands over;
    * a send, once started, is finished even if its caller is cancelled (it runs shielded),
      so a frame is never cut in half on the wire; a caller cancelled while its frame is
      still queued is withdrawn and its frame never goes out;
    * a peer that stops reading for :data:`SEND_TIMEOUT` seconds gets its stream closed
      (part of a frame may be out: the byte stream is unusable) and
      :class:`trio.BrokenResourceError`;
    * errors of the stream (broken, closed) reach every caller whose bytes were in the
      failed send; later callers get the stream's own error on their attempt.
    """

    __slots__ = ("_max_batch", "_pending", "_stream", "_writing")

    def __init__(self, stream: trio.abc.Stream, max_batch: int = 256) -> None:
        self._stream = stream
        self._max_batch = max_batch
        #: Queued frames: (bytes, the ticket of a caller waiting for them, or None and the
        #: callback of an answer nobody waits for).
        self._pending: list[tuple[bytes, _Ticket | None, Callable[[], None] | None]] = []
        self._writing = False

    @property
    def busy(self) -> bool:
        """True while a send is in progress."""
        return self._writing

    async def submit(self, data: bytes) -> None:
        """Send ``data`` (whole frames) on the stream; see the class docstring."""
        if not self._writing:
            self._writing = True
            try:
                await self._write(data)
            finally:
                await self._drain()
            return
        ticket = _Ticket()
        self._pending.append((data, ticket, None))
        try:
            await ticket.wake.wait()
        except BaseException:
            self._withdraw(ticket)
            raise
        if not ticket.finished:
            await self._lead(ticket)
        if ticket.error is not None:
            raise ticket.error

    async def send_answer(self, data: bytes, on_sent: Callable[[], None]) -> None:
        """Send ``data`` for a caller that does not wait for it: at once when nobody is
        sending, else queued (returns at once) and sent by whoever sends next.

        ``on_sent`` is called exactly once, when the bytes are out or their send failed
        (a server releases the request's in-flight slot then, so answers waiting to be
        sent still count against its limit). Errors are not raised: a peer that is gone
        is the reader's business.
        """
        if self._writing:
            self._pending.append((data, None, on_sent))
            return
        self._writing = True
        try:
            await self._write(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            on_sent()
            await self._drain()

    async def _write(self, data: bytes) -> None:
        await _write_frames(self._stream, data)

    async def _write_batch(self) -> None:
        """Send the oldest queued frames (up to ``max_batch``) and settle them."""
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        error: BaseException | None = None
        try:
            await self._write(batch[0][0] if len(batch) == 1 else b"".join(d for d, _, _ in batch))
        except Exception as exc:
            error = exc
        for _, ticket, on_sent in batch:
            if ticket is not None:
                ticket.error = error
                ticket.finished = True
                ticket.wake.set()
            elif on_sent is not None:
                on_sent()

    async def _lead(self, own: _Ticket) -> None:
        """Send queued frames in batches until ``own`` is out, then hand over."""
        try:
            while not own.finished:
                await self._write_batch()
        finally:
            await self._drain()

    async def _drain(self) -> None:
        """Before handing over: send the answers nobody waits for at the front of the
        queue (nobody else would), then wake the oldest waiting caller, or stop."""
        while self._pending and self._pending[0][1] is None:
            await self._write_batch()
        self._hand_over()

    def _hand_over(self) -> None:
        """The oldest waiting caller sends next; with none, nobody is sending."""
        if self._pending:
            ticket = self._pending[0][1]
            assert ticket is not None  # _drain sent the answers in front
            ticket.wake.set()
        else:
            self._writing = False

    def _withdraw(self, ticket: _Ticket) -> None:
        """A waiting caller was cancelled: drop its frame if it is still queued, and if it
        had just been made the sender, pass that on."""
        for index, (_, waiting, _cb) in enumerate(self._pending):
            if waiting is ticket:
                del self._pending[index]
                break
        if ticket.wake.is_set() and not ticket.finished:
            self._hand_over()


async def _write_frames(stream: trio.abc.Stream, data: bytes) -> None:
    """Send ``data`` whole: shielded (a started send finishes, so a frame is never cut in
    half), within :data:`SEND_TIMEOUT` (a peer that stops reading gets its stream closed
    and :class:`trio.BrokenResourceError`: part of a frame may be out, the stream is
    unusable). One cancel scope serves both rules."""
    with trio.CancelScope(shield=True, deadline=trio.current_time() + SEND_TIMEOUT) as scope:
        await stream.send_all(data)
    if scope.cancelled_caught:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
        raise trio.BrokenResourceError(f"send stalled for {SEND_TIMEOUT:g} s; closed")


def frame_sender(stream: trio.abc.Stream) -> FrameSender:
    """The :class:`FrameSender` of ``stream`` (whole frames, one writer at a time)."""
    return FrameSender(stream)


W = TypeVar("W")


class Deadlines(Generic[W]):
    """The pending deadlines of one connection's waiters (sans-IO, no clock of its own).

    :meth:`add` files an item under its deadline; :meth:`expired` takes out the items whose
    deadline has come (``deadline <= now``) and are still live; :meth:`earliest` is the
    nearest deadline of a live item (None: none), the time a sweeper should next look.
    An item stops being live when ``is_done(item)`` says so (it was answered, or its caller
    gave up): it is then dropped lazily, when it reaches the front, so that finishing a
    request costs nothing here. Items with equal deadlines come out in the order added.
    """

    __slots__ = ("_heap", "_is_done", "_seq")

    def __init__(self, is_done: Callable[[W], bool]) -> None:
        self._heap: list[tuple[float, int, W]] = []
        self._is_done = is_done
        self._seq = 0

    def __len__(self) -> int:
        """Entries held, live or not yet dropped."""
        return len(self._heap)

    def add(self, deadline: float, item: W) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (deadline, self._seq, item))

    def expired(self, now: float) -> list[W]:
        """The live items whose deadline is ``<= now``, in deadline order (taken out)."""
        heap = self._heap
        out: list[W] = []
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)[2]
            if not self._is_done(item):
                out.append(item)
        return out

    def earliest(self) -> float | None:
        """The nearest deadline of a live item, or None (finished items in front are dropped)."""
        heap = self._heap
        while heap:
            deadline, _seq, item = heap[0]
            if not self._is_done(item):
                return deadline
            heapq.heappop(heap)
        return None


class _Waiter:
    """One caller waiting for the answers to its request(s): one event, woken once."""

    __slots__ = ("done", "error", "event", "keys", "remaining", "results", "timeout")

    def __init__(self, keys: list[Hashable], timeout: float) -> None:
        self.event = trio.Event()
        self.keys = keys
        self.results: list[Any] = [None] * len(keys)
        self.remaining = len(keys)
        self.error: BaseException | None = None
        #: True once the waiter needs nothing more (answered, failed, or given up).
        self.done = False
        self.timeout = timeout


def _waiter_done(waiter: _Waiter) -> bool:
    return waiter.done


class MultiplexedConnection(Generic[T]):
    """One client connection carrying many requests at once.

    ``decode`` turns a response payload into ``(key, value)``; the value is handed to the
    caller whose request was sent with the same key. Responses whose key matches no
    request in flight (late, after a timeout, or unknown) go to ``on_unmatched``.

    :meth:`run` must be running (in a nursery) for responses to be received and for
    timeouts to fire: one deadline sweeper per connection (started by :meth:`run`) fails
    the callers whose time is up, so a request costs no cancel scope of its own. A caller
    that finds nobody sending sends its frame itself; frames handed in meanwhile are sent
    together by the connection's writer task, their callers waiting only for the answer
    (one wake-up per request). A send, once started, is finished (a frame is never cut in
    half on the wire); a frame whose caller gave up before it went out is not sent; a send
    stalled for :data:`SEND_TIMEOUT` seconds closes the connection. When the
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
        #: Requests in flight: key -> (its waiter, its place among the waiter's answers).
        self._pending: dict[Hashable, tuple[_Waiter, int]] = {}
        self._sender = frame_sender(stream)  # used only while run() is not running
        #: Frames handed in while a send was in progress, for the writer task.
        self._outbox: list[tuple[bytes, _Waiter]] = []
        self._writing = False  # a send is in progress (a caller's, or the writer task's)
        self._writer_wake = trio.Event()
        self._deadlines: Deadlines[_Waiter] = Deadlines(_waiter_done)
        self._sweeping = False  # the sweeper runs (else a request bounds its own wait)
        self._sweep_at = math.inf  # when the sweeper wakes next
        self._sweep_wake = trio.Event()  # wakes it earlier (a nearer deadline came)
        self.closed = False
        #: Set once the connection has ended (peer closed, broken, or closed by us).
        self.closed_event = trio.Event()
        #: When a response (or an echo answer) last arrived: heartbeats go out after idling.
        self.last_activity = trio.current_time()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Receive responses (and fail callers whose time is up) until the peer closes or
        the stream breaks."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sweep)
                nursery.start_soon(self._write_queued)
                self._sweeping = True
                task_status.started()
                try:
                    await self._receive()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._sweeping = False
            self._fail_all()
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await self._stream.aclose()  # bounded: a TLS close_notify to a stuck peer

    async def _receive(self) -> None:
        parser = FrameParser(self._kind, self._max_frame)
        stream = self._stream
        try:
            while True:
                data = await stream.receive_some(_READ_SIZE)
                if not data:
                    return
                self.last_activity = trio.current_time()
                for payload in parser.frames(data):
                    if payload:
                        self._dispatch(payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError, FramingError):
            return

    async def _sweep(self) -> None:
        """Fail the waiters whose deadline has come; sleep until the nearest other one."""
        deadlines = self._deadlines
        while True:
            for waiter in deadlines.expired(trio.current_time()):
                self._expire(waiter)
            earliest = deadlines.earliest()
            self._sweep_at = math.inf if earliest is None else earliest
            wake = self._sweep_wake = trio.Event()
            with trio.move_on_at(self._sweep_at):
                await wake.wait()

    async def _write_queued(self) -> None:
        """The writer task: sends the frames queued behind a send in progress, together."""
        while True:
            await self._writer_wake.wait()
            self._writer_wake = trio.Event()
            while self._outbox:
                batch, self._outbox = self._outbox, []
                # A frame whose caller gave up (cancelled, timed out) before it left stays home.
                frames = [data for data, waiter in batch if not waiter.done]
                if not frames:
                    continue
                try:
                    await _write_frames(self._stream, b"".join(frames))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._broken_while_sending(batch + self._outbox)
                    return
            self._writing = False

    def _broken_while_sending(self, batch: list[tuple[bytes, _Waiter]]) -> None:
        """The stream failed under a send: its callers (and those queued) learn it now."""
        self.closed = True
        self._outbox = []
        for _data, waiter in batch:
            if not waiter.done:
                waiter.done = True
                waiter.error = UpstreamUnavailable("connection broke while sending", sent=True)
                self._forget(waiter)
                waiter.event.set()

    def _watch(self, waiter: _Waiter, deadline: float) -> None:
        """File ``waiter``'s deadline; wake the sweeper if it sleeps past it."""
        self._deadlines.add(deadline, waiter)
        if deadline < self._sweep_at:
            self._sweep_at = deadline
            self._sweep_wake.set()

    def _expire(self, waiter: _Waiter) -> None:
        waiter.done = True
        waiter.error = UpstreamTimeout(f"no answer within {waiter.timeout:g} s")
        self._forget(waiter)
        waiter.event.set()

    def _forget(self, waiter: _Waiter) -> None:
        """Take ``waiter``'s requests still in flight out of the table (answers now unmatched)."""
        pending = self._pending
        for key in waiter.keys:
            entry = pending.get(key)
            if entry is not None and entry[0] is waiter:
                del pending[key]

    def _dispatch(self, payload: bytes) -> None:
        try:
            key, value = self._decode(payload)
        except Exception:
            self._on_unmatched(payload, None)
            return
        entry = self._pending.pop(key, None)
        if entry is None:
            self._on_unmatched(payload, key)
            return
        waiter, index = entry
        waiter.results[index] = value
        waiter.remaining -= 1
        if waiter.remaining == 0:
            waiter.done = True
            waiter.event.set()

    def _fail_all(self) -> None:
        self.closed = True
        self.closed_event.set()
        for waiter, _index in self._pending.values():
            if not waiter.done:
                waiter.done = True
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
        frame = encode_frame(payload, self._kind, self._max_frame)
        waiter = _Waiter([key], timeout)
        self._pending[key] = (waiter, 0)
        result: T = (await self._send_and_wait(frame, waiter))[0]
        return result

    async def request_many(
        self, requests: Sequence[tuple[bytes, Hashable]], timeout: float
    ) -> list[T]:
        """Send several ``(payload, key)`` requests in one write and wait for all answers.

        The answers come back in the order of ``requests``. One waiter, woken once, when
        the last answer is in. Errors are those of :meth:`request`, for the group as a
        whole: nothing is sent when the connection is closed or a key is already in flight
        (or repeated); a timeout or a broken link fails every request of the group (the
        outcome of each is unknown), and answers that come later are unmatched.
        """
        if self.closed:
            raise UpstreamUnavailable("connection is closed")
        keys = [key for _payload, key in requests]
        if not keys:
            return []
        pending = self._pending
        if len(set(keys)) != len(keys) or any(key in pending for key in keys):
            raise UpstreamError("a request with the same key is already in flight")
        kind, max_frame = self._kind, self._max_frame
        data = b"".join(encode_frame(payload, kind, max_frame) for payload, _key in requests)
        waiter = _Waiter(keys, timeout)
        for index, key in enumerate(keys):
            pending[key] = (waiter, index)
        return await self._send_and_wait(data, waiter)

    async def _send_and_wait(self, data: bytes, waiter: _Waiter) -> list[T]:
        """Send ``data`` (the frames of ``waiter``'s requests, already in the table) and
        wait for the answers, the deadline, or the end of the connection."""
        deadline = trio.current_time() + waiter.timeout
        try:
            if not self._sweeping:  # run() is not running: no writer, no sweeper
                await self._send_unmanaged(data, waiter, deadline)
            else:
                if self._writing:  # the writer task sends it with the others queued
                    self._outbox.append((data, waiter))
                else:
                    await self._send_direct(data)
                if not waiter.done:
                    self._watch(waiter, deadline)
                    await waiter.event.wait()
            if waiter.error is not None:
                raise waiter.error
            return waiter.results
        finally:
            if not waiter.done:  # cancelled, or the send failed: nobody waits any more
                waiter.done = True
                self._forget(waiter)

    async def _send_direct(self, data: bytes) -> None:
        """Nobody is sending: send ``data`` now, then hand what queued meanwhile to the
        writer task."""
        self._writing = True
        try:
            await _write_frames(self._stream, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._broken_while_sending(self._outbox)
            raise UpstreamUnavailable("connection broke while sending", sent=True) from exc
        finally:
            if self._outbox:
                self._writer_wake.set()
            else:
                self._writing = False

    async def _send_unmanaged(self, data: bytes, waiter: _Waiter, deadline: float) -> None:
        """Send and wait without the writer task and the sweeper (run() not running)."""
        try:
            await self._sender.submit(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.closed = True
            raise UpstreamUnavailable("connection broke while sending", sent=True) from exc
        with trio.move_on_at(deadline):
            await waiter.event.wait()
        if not waiter.done:
            self._expire(waiter)

    async def aclose(self) -> None:
        """Close the stream; :meth:`run` then fails every caller still waiting."""
        self.closed = True
        await self._stream.aclose()
