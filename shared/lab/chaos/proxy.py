"""A TCP proxy between two services that applies faults to the bytes it forwards.

:class:`ChaosProxy` listens in front of one service's ISO port and forwards every byte to
it, applying the link's :class:`shared.lab.chaos.faults.Faults` chunk by chunk (the
decisions are :func:`shared.lab.chaos.faults.plan` and
:class:`shared.lab.chaos.faults.Pacer`; this module only moves bytes).

What a fault looks like on the wire:

* latency/jitter: each chunk is held, order is kept (a later chunk never overtakes);
* blackhole: chunks are read and discarded, the connection stays open (a silent link); at
  1.0 (:meth:`ChaosProxy.partition`) new connections are accepted but never connected on
  to the target, as a TCP handshake lost in a partition would never complete upstream;
* reset: both sides are closed with SO_LINGER 0 (a TCP RST);
* close_after: the connection is closed (FIN) once that many bytes crossed one direction;
* bandwidth: each direction is paced to that many bytes per second.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Final

import trio
from prometheus_client import Counter, Gauge

from shared.lab.chaos.faults import NONE, Faults, Pacer, plan
from shared.ops.log import get_logger

#: Largest chunk read at a time from one side of a proxied connection.
CHUNK: Final = 64 * 1024
#: Chunks read ahead of the writer per direction (bounds the proxy's memory per connection).
QUEUE_DEPTH: Final = 64
#: Seconds to wait for the target's TCP handshake before giving the client up.
CONNECT_TIMEOUT: Final = 5.0


def host_port(host: str, port: int) -> str:
    return f"{host}:{port}"


def _rst(stream: trio.SocketStream) -> None:
    """Make the coming close a TCP reset: SO_LINGER on with a zero timeout."""
    with contextlib.suppress(OSError):  # already gone: nothing to reset
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class ChaosMetrics:
    """The controller's metrics, one series per link."""

    def __init__(self, registry: Any) -> None:
        self.faults_active = Gauge(
            "paylab_chaos_faults_active",
            "1 while any fault is set on the link, else 0.",
            ["link"],
            registry=registry,
        )
        self.bytes_dropped = Counter(
            "paylab_chaos_bytes_dropped",
            "Bytes read by the chaos proxy and discarded (blackhole, partition).",
            ["link"],
            registry=registry,
        )
        self.resets = Counter(
            "paylab_chaos_resets",
            "Connections reset (RST) by the chaos proxy.",
            ["link"],
            registry=registry,
        )


@dataclass(eq=False)
class _Conn:
    """One proxied connection: its scope (cancel to end it), and what happened on it."""

    client: trio.SocketStream
    upstream: trio.SocketStream | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    dropped: bool = False
    reset: bool = False

    def abort(self, *, rst: bool) -> None:
        """End the connection now; with ``rst`` both sides see a reset."""
        if rst:
            self.reset = True
        self.scope.cancel()


class ChaosProxy:
    """A TCP proxy in front of ``target`` applying :attr:`faults` to every chunk.

    Contract: :meth:`run` listens on ``host:port`` (0: ephemeral), reports the bound port
    through ``task_status`` and in :attr:`port`, and serves until :meth:`close` or
    cancellation. Each accepted connection opens its own connection to the target (a
    refused target closes the client at once) and pumps both directions in a task of the
    proxy's nursery; a peer's error ends that connection only, never the proxy. Faults may
    be changed at any time (:meth:`set_faults`, :meth:`partition`, :meth:`heal`) and apply
    to the next chunk of every connection.
    """

    def __init__(
        self,
        name: str,
        target: tuple[str, int],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults = NONE,
        rng: random.Random | None = None,
        metrics: ChaosMetrics | None = None,
        log: Any = None,
    ) -> None:
        self.name = name
        self.target = target
        self.host = host
        self.port = port
        self.faults = faults
        self.rng = rng or random.Random()
        self._metrics = metrics
        self._log = log or get_logger("chaos")
        self._conns: set[_Conn] = set()
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self.connections_total = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.bytes_dropped = 0
        self.resets = 0
        self.closes = 0
        self._publish()

    # -- faults -------------------------------------------------------------------------------
    @property
    def partitioned(self) -> bool:
        return self.faults.blackhole >= 1.0

    def set_faults(self, faults: Faults) -> None:
        """Apply ``faults`` from the next chunk on."""
        self.faults = faults
        self._publish()

    def partition(self) -> None:
        """Drop every byte both ways, and connect new clients to nothing."""
        self.set_faults(self.faults.merge({"blackhole": 1.0}))

    def heal(self) -> int:
        """Clear every fault and abort the connections whose byte stream was corrupted by
        dropped chunks (or never reached the target); returns how many were aborted. The
        services' pools notice the closed connections and reconnect through the proxy."""
        self.set_faults(NONE)
        aborted = 0
        for conn in list(self._conns):
            if conn.dropped or conn.upstream is None:
                conn.abort(rst=False)
                aborted += 1
        return aborted

    def _publish(self) -> None:
        if self._metrics is not None:
            self._metrics.faults_active.labels(self.name).set(1 if self.faults.active else 0)

    # -- serving ------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, report the port, serve until :meth:`close` (see the class contract)."""
        try:
            with self._scope:
                listeners = await trio.open_tcp_listeners(self.port, host=self.host)
                self.port = int(listeners[0].socket.getsockname()[1])
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        # Connection tasks live in the same nursery, ended by the scope.
                        lambda: trio.serve_listeners(
                            self._handle, listeners, handler_nursery=nursery
                        )
                    )
                    task_status.started(self.port)
        finally:
            self._done.set()

    async def close(self) -> None:
        """Stop listening and end every connection; returns when all are closed."""
        self._scope.cancel()
        await self._done.wait()

    async def _handle(self, client: trio.SocketStream) -> None:
        conn = _Conn(client)
        self.connections_total += 1
        self._conns.add(conn)
        try:
            with conn.scope:
                if self.partitioned:
                    # A partition: the handshake would never reach the target.
                    await self._swallow(conn, client)
                    return
                try:
                    with trio.fail_after(CONNECT_TIMEOUT):
                        conn.upstream = await trio.open_tcp_stream(*self.target)
                except (OSError, trio.TooSlowError):
                    # Target down: the client sees its connection closed at once.
                    self.closes += 1
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._direction, conn, client, conn.upstream, "up")
                    nursery.start_soon(self._direction, conn, conn.upstream, client, "down")
        finally:
            self._conns.discard(conn)
            for stream in (client, conn.upstream):
                if stream is None:
                    continue
                if conn.reset:
                    _rst(stream)
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def _swallow(self, conn: _Conn, client: trio.SocketStream) -> None:
        """Read and discard until the client goes away or the connection is aborted."""
        try:
            while data := await client.receive_some(CHUNK):
                self._dropped(conn, len(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _dropped(self, conn: _Conn, n: int) -> None:
        conn.dropped = True
        self.bytes_dropped += n
        if self._metrics is not None:
            self._metrics.bytes_dropped.labels(self.name).inc(n)

    async def _direction(
        self, conn: _Conn, src: trio.SocketStream, dst: trio.SocketStream, direction: str
    ) -> None:
        """One direction: a reader that plans each chunk, a writer that delivers in order."""
        send, receive = trio.open_memory_channel[tuple[float, bytes, str]](QUEUE_DEPTH)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._guard, conn, self._writer(conn, receive, dst, direction))
            await self._guard(conn, self._reader(conn, src, send))

    @staticmethod
    async def _guard(conn: _Conn, work: Awaitable[None]) -> None:
        """Run ``work``; a peer's error ends this connection, never the proxy."""
        try:
            await work
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            conn.abort(rst=False)

    async def _reader(
        self,
        conn: _Conn,
        src: trio.SocketStream,
        send: trio.MemorySendChannel[tuple[float, bytes, str]],
    ) -> None:
        """Read chunks and queue (deliver-at, bytes, then) for the writer; ``then`` is
        ``""``, ``"close"`` or ``"eof"``."""
        forwarded = 0
        pacer = Pacer(self.faults.bandwidth, trio.current_time())
        last_at = 0.0
        async with send:
            while True:
                data = await src.receive_some(CHUNK)
                if not data:
                    await send.send((last_at, b"", "eof"))
                    return
                faults = self.faults
                p = plan(faults, self.rng, forwarded, len(data))
                if p.reset:
                    self.resets += 1
                    if self._metrics is not None:
                        self._metrics.resets.labels(self.name).inc()
                    self._log.info("chaos_reset", link=self.name)
                    conn.abort(rst=True)
                    return
                if p.drop:
                    self._dropped(conn, len(data))
                    continue
                if pacer.rate != faults.bandwidth:
                    pacer = Pacer(faults.bandwidth, trio.current_time())
                now = trio.current_time()
                chunk = data[: p.deliver]
                # Order is kept: a chunk never leaves before the one read ahead of it.
                last_at = max(last_at, now + p.delay + pacer.delay(now, len(chunk)))
                forwarded += len(chunk)
                if p.close:
                    await send.send((last_at, chunk, "close"))
                    return
                await send.send((last_at, chunk, ""))

    async def _writer(
        self,
        conn: _Conn,
        receive: trio.MemoryReceiveChannel[tuple[float, bytes, str]],
        dst: trio.SocketStream,
        direction: str,
    ) -> None:
        async with receive:
            async for at, chunk, then in receive:
                await trio.sleep_until(at)
                if chunk:
                    await dst.send_all(chunk)
                    if direction == "up":
                        self.bytes_up += len(chunk)
                    else:
                        self.bytes_down += len(chunk)
                if then == "close":
                    self.closes += 1
                    conn.abort(rst=False)
                    return
                if then == "eof":
                    # A half-close passes on: the other direction may still carry answers.
                    try:
                        await dst.send_eof()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        conn.abort(rst=False)
                    return

    # -- views --------------------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        """The proxy's state as JSON (see ``docs/chaos.md``)."""
        return {
            "name": self.name,
            "listen": host_port(self.host, self.port),
            "target": host_port(*self.target),
            "faults": self.faults.as_dict(),
            "partitioned": self.partitioned,
            "connections": len(self._conns),
            "connections_total": self.connections_total,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "bytes_dropped": self.bytes_dropped,
            "resets": self.resets,
            "closes": self.closes,
        }
