"""CPU per framed round trip: paylab's link code against a minimal trio round trip.

Run it from the repository root::

    python -m loadtests.bench_link                    # 20,000 round trips per row, 64 in flight
    python -m loadtests.bench_link -n 5000 -c 16      # fewer round trips, 16 in flight
    python -m loadtests.bench_link --only minimal,inline

Both ends run in **one process** on one trio loop over a real loopback TCP connection, so
the CPU figure is the client's and the server's together (``time.process_time`` over the
measured round trips, after a warm-up). ``concurrency`` tasks each send a 64-byte framed
request (2-byte binary length prefix), wait for its answer, and send the next, over **one**
connection. Rows:

* ``minimal``: a bare trio client and server with the same framing and nothing else: the
  server answers every frame of a read in one send; the client's tasks queue their frames
  for one writer task and wait on an event each, one reader task wakes them. The floor;
* ``inline``: :class:`~shared.net.tcp.MultiplexedConnection` against
  :class:`~shared.net.tcp.FramedServer` with an inline handler (as the HSM serves);
* ``task``: the same client against ``FramedServer`` with a task per frame (as the
  gateway and billing serve);
* ``upstream``: :meth:`shared.net.upstream.Upstream.call` (breaker, pool, one connection,
  metrics) against the inline server: a call as the services make it;
* ``upstream-many``: :meth:`~shared.net.upstream.Upstream.call_many` with two requests
  per call (as the gateway asks the HSM for M8 and CA together); figures per request.

It prints one row per case: µs of CPU per round trip, round trips per second (wall), and
the ratio to ``minimal``. Nothing is asserted: the machine's speed varies, so compare rows
of one run, or alternate runs of two versions and take medians.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import trio

from shared.iso.framing import FrameParser, HeaderKind, encode_frame
from shared.net.pool import PoolConfig, UpstreamPool
from shared.net.tcp import FramedServer, MultiplexedConnection
from shared.net.upstream import Upstream
from shared.ops.metrics import ServiceMetrics
from shared.resilience.breaker import BreakerConfig

CASES = ("minimal", "inline", "task", "upstream", "upstream-many")
_BODY = b"x" * 60  # with the 4-byte key: a 64-byte payload, about an HSM command's size


class _Quiet:
    """A logger that drops everything: log lines would only disturb the figures."""

    def __getattr__(self, _name: str) -> Callable[..., None]:
        return _drop


def _drop(*_args: Any, **_kwargs: Any) -> None:
    pass


def _key(payload: bytes) -> tuple[Hashable, bytes]:
    return payload[:4], payload


def _echo(payload: bytes, _peer: str) -> bytes:
    return payload


async def _echo_task(payload: bytes, _peer: str) -> bytes:
    return payload


class _Dialect:
    """No sign-on; echoes (never due in a short run) use keys apart from the requests'."""

    def echo(self) -> tuple[bytes, Hashable]:
        return b"HHHH" + _BODY, b"HHHH"

    def sign_on(self) -> tuple[bytes, Hashable] | None:
        return None

    def sign_off(self) -> tuple[bytes, Hashable] | None:
        return None

    def accepted(self, response: bytes) -> bool:
        return True

    def failed_answer(self, response: bytes) -> str | None:
        return None


#: One worker's round trip: ``(worker, sequence) -> None``.
RoundTrip = Callable[[int, int], Awaitable[None]]


async def _drive(n: int, concurrency: int, round_trip: RoundTrip, per_call: int = 1) -> float:
    """Run ``n`` round trips on ``concurrency`` workers; returns the wall seconds."""
    calls = max(1, n // per_call)
    share = [
        calls // concurrency + (1 if w < calls % concurrency else 0) for w in range(concurrency)
    ]

    async def worker(w: int) -> None:
        for i in range(share[w]):
            await round_trip(w, i)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for w in range(concurrency):
            nursery.start_soon(worker, w)
    return time.perf_counter() - start


def _payload(w: int, i: int) -> bytes:
    # 4-character key: worker (2 base-36 digits... up to 1,296 workers) and a cycling sequence.
    return _key36(w * 1296 + i % 1296).encode() + _BODY


def _key36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    for _ in range(4):
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out


async def _measure(
    n: int, warmup: int, concurrency: int, round_trip: RoundTrip, per_call: int = 1
) -> tuple[float, float]:
    """(µs CPU per round trip, round trips per second) of ``n`` after ``warmup``."""
    await _drive(warmup, concurrency, round_trip, per_call)
    cpu = time.process_time()
    wall = await _drive(n, concurrency, round_trip, per_call)
    cpu = time.process_time() - cpu
    done = max(1, n // per_call) * per_call
    return cpu / done * 1e6, done / wall


# -- minimal ------------------------------------------------------------------------------------
async def _minimal_server(listener: trio.SocketListener) -> None:
    stream = await listener.accept()
    parser = FrameParser(HeaderKind.BINARY2, 65535)
    async with stream:
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            out = [encode_frame(f, HeaderKind.BINARY2) for f in parser.frames(data)]
            if out:
                await stream.send_all(b"".join(out))


async def _run_minimal(n: int, warmup: int, concurrency: int) -> tuple[float, float]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_minimal_server, listeners[0])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        waiters: dict[bytes, list[Any]] = {}
        outbox: list[bytes] = []
        wake = trio.Event()

        async def writer() -> None:
            nonlocal wake
            while True:
                await wake.wait()
                wake = trio.Event()
                data, outbox[:] = b"".join(outbox), []
                await stream.send_all(data)

        async def reader() -> None:
            parser = FrameParser(HeaderKind.BINARY2, 65535)
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                for frame in parser.frames(data):
                    slot = waiters.pop(frame[:4])
                    slot[1] = frame
                    slot[0].set()

        async def round_trip(w: int, i: int) -> None:
            payload = _payload(w, i)
            slot: list[Any] = [trio.Event(), None]
            waiters[payload[:4]] = slot
            outbox.append(encode_frame(payload, HeaderKind.BINARY2))
            wake.set()
            await slot[0].wait()

        nursery.start_soon(writer)
        nursery.start_soon(reader)
        result = await _measure(n, warmup, concurrency, round_trip)
        nursery.cancel_scope.cancel()
    await stream.aclose()
    await listeners[0].aclose()
    return result


# -- paylab's link code -------------------------------------------------------------------------
def _server(inline: bool) -> FramedServer:
    return FramedServer(
        "bench",
        _echo_task,
        host="127.0.0.1",
        port=0,
        metrics=ServiceMetrics("bench_server"),
        log=_Quiet(),
        inline=_echo if inline else None,
    )


async def _run_connection(
    n: int, warmup: int, concurrency: int, inline: bool
) -> tuple[float, float]:
    server = _server(inline)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn: MultiplexedConnection[bytes] = MultiplexedConnection(stream, _key)
        await nursery.start(conn.run)

        async def round_trip(w: int, i: int) -> None:
            payload = _payload(w, i)
            await conn.request(payload, payload[:4], 5.0)

        result = await _measure(n, warmup, concurrency, round_trip)
        await conn.aclose()
        server.shutdown(0)
        nursery.cancel_scope.cancel()
    return result


async def _run_upstream(
    n: int, warmup: int, concurrency: int, per_call: int
) -> tuple[float, float]:
    server = _server(inline=True)
    metrics = ServiceMetrics("bench_client")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        dialect = _Dialect()
        pool: UpstreamPool[bytes] = UpstreamPool(
            "bench",
            ("127.0.0.1", port),
            _key,
            dialect,
            metrics=metrics,
            log=_Quiet(),
            config=PoolConfig(min_connections=1, max_connections=1, heartbeat_interval=3600),
        )
        upstream: Upstream[bytes] = Upstream(
            pool, dialect, metrics=metrics, log=_Quiet(), breaker=BreakerConfig()
        )
        await nursery.start(upstream.run)
        with trio.fail_after(5):
            while not upstream.available:
                await trio.sleep(0.001)

        async def one(w: int, i: int) -> None:
            payload = _payload(w, i)
            await upstream.call(payload, payload[:4], timeout=5.0, resend_safe=True)

        async def many(w: int, i: int) -> None:
            first = _payload(w, 2 * i)
            second = _payload(w, 2 * i + 1)
            await upstream.call_many(
                [(first, first[:4]), (second, second[:4])], timeout=5.0, resend_safe=True
            )

        result = await _measure(n, warmup, concurrency, one if per_call == 1 else many, per_call)
        await upstream.close()
        server.shutdown(0)
        nursery.cancel_scope.cancel()
    return result


async def run_case(case: str, n: int, warmup: int, concurrency: int) -> tuple[float, float]:
    """(µs CPU per round trip, round trips per second) of one case."""
    if case == "minimal":
        return await _run_minimal(n, warmup, concurrency)
    if case in ("inline", "task"):
        return await _run_connection(n, warmup, concurrency, inline=case == "inline")
    if case == "upstream":
        return await _run_upstream(n, warmup, concurrency, 1)
    if case == "upstream-many":
        return await _run_upstream(n, warmup, concurrency, 2)
    raise ValueError(f"unknown case {case!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-n", type=int, default=20000, help="round trips per case")
    parser.add_argument("-c", "--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--warmup", type=int, default=None, help="round trips before measuring")
    parser.add_argument("--only", default=",".join(CASES), help="comma-separated cases")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)}; known: {', '.join(CASES)}")
    if not 1 <= args.concurrency <= 1296:
        parser.error("concurrency must be 1..1296")
    warmup = args.warmup if args.warmup is not None else max(args.n // 10, args.concurrency)
    print(f"# {args.n} round trips per case, {args.concurrency} in flight on one connection,")
    print("# client and server in this one process (CPU is both ends together)")
    print(f"{'case':<14} {'us_cpu/rt':>10} {'rt/s':>10} {'x_minimal':>10}")
    floor: float | None = None
    for case in cases:
        if case == "upstream-many" and not hasattr(Upstream, "call_many"):
            print(f"{case:<14} {'n/a':>10}")  # an older version without call_many
            continue
        # (the line above lets the script run against older versions for A/B figures)
        cpu_us, rate = trio.run(run_case, case, args.n, warmup, args.concurrency)
        if case == "minimal":
            floor = cpu_us
        ratio = f"{cpu_us / floor:.2f}" if floor else "-"
        print(f"{case:<14} {cpu_us:>10.1f} {rate:>10.0f} {ratio:>10}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
