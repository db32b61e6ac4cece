"""Connection floods: many idle TCP connections opened against a listener and held.

:func:`flood` is what ``paylab chaos flood`` and a scenario's ``flood`` step run (through
the chaos controller): it tests a listener's connection caps and idle timeouts. It never
raises for network errors; it counts them in its :class:`FloodResult`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import trio

from shared.lab.chaos.proxy import CHUNK, CONNECT_TIMEOUT, host_port


@dataclass
class FloodResult:
    """What a flood did: connections asked for, opened, refused at connect, closed by the
    server while held (a connection cap or idle timeout at work), and whether it still runs."""

    target: str
    address: str
    connections: int
    hold: float
    opened: int = 0
    refused: int = 0
    closed_by_server: int = 0
    running: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def flood(
    host: str,
    port: int,
    connections: int,
    hold: float,
    *,
    source: str | None = None,
    target: str = "",
    result: FloodResult | None = None,
) -> FloodResult:
    """Open up to ``connections`` idle TCP connections to ``host:port`` (from the local
    address ``source`` when given: another 127.x address keeps a per-source connection cap
    away from other local clients), hold them ``hold`` seconds, then close them all.

    ``result`` (updated as the flood goes) lets a caller watch a flood in progress. Never
    raises for network errors: they are counted.
    """
    res = result or FloodResult(target, host_port(host, port), connections, hold)
    streams: list[trio.SocketStream] = []

    async def watch(stream: trio.SocketStream) -> None:
        # An idle client reads nothing; end of stream or a reset means the server closed it.
        try:
            while await stream.receive_some(CHUNK):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        res.closed_by_server += 1

    try:
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(hold):
                for _ in range(connections):
                    try:
                        with trio.fail_after(CONNECT_TIMEOUT):
                            stream = await trio.open_tcp_stream(host, port, local_address=source)
                    except (OSError, trio.TooSlowError):
                        res.refused += 1
                        continue
                    streams.append(stream)
                    res.opened += 1
                    nursery.start_soon(watch, stream)
                await trio.sleep_forever()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for stream in streams:
                await stream.aclose()
        res.running = False
    return res
