"""The client side of a multiplexed link (:class:`shared.net.tcp.MultiplexedConnection`):
its deadline bookkeeping without sockets, then timeouts, cancellation, grouped requests and
send stalls over real loopback connections."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Hashable

import pytest
import trio

from shared.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from shared.iso.framing import FrameParser, encode_frame
from shared.net import tcp
from shared.net.tcp import Deadlines, FramedServer, MultiplexedConnection
from shared.ops.log import get_logger
from shared.ops.metrics import ServiceMetrics


class _Item:
    def __init__(self, name: str) -> None:
        self.name = name
        self.done = False


def _deadlines() -> Deadlines[_Item]:
    return Deadlines(lambda item: item.done)


# -- Deadlines (sans-IO) -----------------------------------------------------------------------
def test_deadlines_give_out_live_items_in_deadline_order() -> None:
    d = _deadlines()
    a, b, c = _Item("a"), _Item("b"), _Item("c")
    d.add(3.0, c)
    d.add(1.0, a)
    d.add(2.0, b)
    assert d.earliest() == 1.0
    assert d.expired(0.5) == []
    assert [i.name for i in d.expired(2.0)] == ["a", "b"]
    assert d.earliest() == 3.0
    assert [i.name for i in d.expired(10.0)] == ["c"]
    assert d.earliest() is None and len(d) == 0


def test_finished_items_never_expire_and_do_not_hold_the_earliest_deadline() -> None:
    d = _deadlines()
    answered, waiting = _Item("answered"), _Item("waiting")
    d.add(1.0, answered)
    d.add(5.0, waiting)
    answered.done = True
    assert d.earliest() == 5.0  # the answered one in front is dropped
    assert len(d) == 1
    waiting.done = True
    assert d.expired(10.0) == []
    assert d.earliest() is None


def test_equal_deadlines_come_out_in_the_order_added() -> None:
    d = _deadlines()
    items = [_Item(str(i)) for i in range(5)]
    for item in items:
        d.add(1.0, item)
    assert d.expired(1.0) == items


# -- a programmable peer ----------------------------------------------------------------------
#: What the peer does with each frame it receives: (frame, answer) -> None.
Peer = Callable[[bytes, Callable[[bytes], Awaitable[None]]], Awaitable[None]]


def _key(payload: bytes) -> tuple[Hashable, bytes]:
    return payload[:4], payload


async def _peer(nursery: trio.Nursery, on_frame: Peer, received: list[bytes]) -> int:
    async def serve(stream: trio.SocketStream) -> None:
        parser = FrameParser()

        async def answer(payload: bytes) -> None:
            await stream.send_all(encode_frame(payload))

        try:
            async for data in stream:
                for frame in parser.frames(data):
                    received.append(frame)
                    await on_frame(frame, answer)
        except trio.BrokenResourceError:
            pass

    listeners = await nursery.start(trio.serve_tcp, serve, 0)
    return int(listeners[0].socket.getsockname()[1])


async def _echo(frame: bytes, answer: Callable[[bytes], Awaitable[None]]) -> None:
    await answer(frame)


async def _silent(frame: bytes, answer: Callable[[bytes], Awaitable[None]]) -> None:
    pass


async def _connect(
    nursery: trio.Nursery, port: int, *, run: bool = True, unmatched: list[bytes] | None = None
) -> MultiplexedConnection[bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    late = unmatched if unmatched is not None else []
    conn: MultiplexedConnection[bytes] = MultiplexedConnection(
        stream, _key, max_frame=65535, on_unmatched=lambda payload, key: late.append(payload)
    )
    if run:
        await nursery.start(conn.run)
    return conn


async def _wait_until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not predicate():
            await trio.sleep(0.005)


# -- single requests ----------------------------------------------------------------------------
async def test_answers_find_their_callers(nursery: trio.Nursery) -> None:
    port = await _peer(nursery, _echo, [])
    conn = await _connect(nursery, port)
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        results[i] = await conn.request(f"{i:04d}-body".encode(), f"{i:04d}".encode(), 5.0)

    async with trio.open_nursery() as callers:
        for i in range(100):
            callers.start_soon(one, i)
    assert results == {i: f"{i:04d}-body".encode() for i in range(100)}
    assert conn.in_flight == 0


async def test_the_sweeper_fails_a_request_at_its_deadline_and_the_late_answer_is_unmatched(
    nursery: trio.Nursery,
) -> None:
    held: list[tuple[bytes, Callable[[bytes], Awaitable[None]]]] = []

    async def late(frame: bytes, answer: Callable[[bytes], Awaitable[None]]) -> None:
        if frame == b"slow-short":
            held.append((frame, answer))  # answered by the test, after the timeout
        else:
            await answer(frame)

    unmatched: list[bytes] = []
    port = await _peer(nursery, late, [])
    conn = await _connect(nursery, port, unmatched=unmatched)
    # A long deadline first, then a shorter one: the sweeper must wake for the nearer one.
    long_result: list[bytes] = []

    async def long_call() -> None:
        long_result.append(await conn.request(b"fast-long", b"fast", 30.0))

    async with trio.open_nursery() as callers:
        callers.start_soon(long_call)
        with pytest.raises(UpstreamTimeout):
            await conn.request(b"slow-short", b"slow", 0.05)
    assert long_result == [b"fast-long"]
    assert conn.in_flight == 0
    frame, answer = held[0]
    await answer(frame)
    await _wait_until(lambda: unmatched == [b"slow-short"])
    # The connection lives on: the same key may be used again.
    assert await conn.request(b"slow-again", b"slow", 5.0) == b"slow-again"


async def test_a_cancelled_caller_leaves_the_link_usable(nursery: trio.Nursery) -> None:
    received: list[bytes] = []
    port = await _peer(nursery, _silent, received)
    conn = await _connect(nursery, port)
    with trio.move_on_after(0.05):
        await conn.request(b"k001-first", b"k001", 30.0)
    assert conn.in_flight == 0
    assert not conn.closed
    # The key is free again, and the peer saw whole frames only.
    with pytest.raises(UpstreamTimeout):
        await conn.request(b"k001-second", b"k001", 0.05)
    await _wait_until(lambda: len(received) == 2)
    assert received == [b"k001-first", b"k001-second"]


async def test_a_duplicate_key_in_flight_is_refused_without_sending(nursery: trio.Nursery) -> None:
    received: list[bytes] = []
    port = await _peer(nursery, _silent, received)
    conn = await _connect(nursery, port)
    async with trio.open_nursery() as callers:
        callers.start_soon(lambda: _ignore_timeout(conn.request(b"dupl-1", b"dupl", 0.2)))
        await _wait_until(lambda: conn.in_flight == 1)
        with pytest.raises(UpstreamError):
            await conn.request(b"dupl-2", b"dupl", 1.0)
    assert received == [b"dupl-1"]


async def _ignore_timeout(call: Awaitable[bytes]) -> None:
    with pytest.raises(UpstreamTimeout):
        await call


async def test_without_run_a_request_still_ends_at_its_deadline(nursery: trio.Nursery) -> None:
    port = await _peer(nursery, _silent, [])
    conn = await _connect(nursery, port, run=False)
    with pytest.raises(UpstreamTimeout):
        await conn.request(b"solo-1", b"solo", 0.05)
    assert conn.in_flight == 0


async def test_a_peer_that_closes_fails_every_waiter_as_sent(nursery: trio.Nursery) -> None:
    async def hang_up(frame: bytes, answer: Callable[[bytes], Awaitable[None]]) -> None:
        raise trio.BrokenResourceError  # ends serve(): the connection closes

    port = await _peer(nursery, hang_up, [])
    conn = await _connect(nursery, port)
    with pytest.raises(UpstreamUnavailable) as caught:
        await conn.request(b"gone-1", b"gone", 5.0)
    assert caught.value.sent
    await _wait_until(lambda: conn.closed)
    with pytest.raises(UpstreamUnavailable) as again:
        await conn.request(b"gone-2", b"gone", 5.0)
    assert not again.value.sent


# -- grouped requests ---------------------------------------------------------------------------
async def test_request_many_returns_the_answers_in_request_order(nursery: trio.Nursery) -> None:
    held: list[tuple[bytes, Callable[[bytes], Awaitable[None]]]] = []

    async def reverse(frame: bytes, answer: Callable[[bytes], Awaitable[None]]) -> None:
        held.append((frame, answer))
        if len(held) == 3:  # answer the group back to front
            for f, a in reversed(held):
                await a(f + b"!")

    received: list[bytes] = []
    port = await _peer(nursery, reverse, received)
    conn = await _connect(nursery, port)
    answers = await conn.request_many(
        [(b"aaaa-1", b"aaaa"), (b"bbbb-2", b"bbbb"), (b"cccc-3", b"cccc")], 5.0
    )
    assert answers == [b"aaaa-1!", b"bbbb-2!", b"cccc-3!"]
    assert received == [b"aaaa-1", b"bbbb-2", b"cccc-3"]
    assert conn.in_flight == 0
    assert await conn.request_many([], 5.0) == []


async def test_request_many_times_out_as_a_whole_and_later_answers_are_unmatched(
    nursery: trio.Nursery,
) -> None:
    release = trio.Event()

    async def half(frame: bytes, answer: Callable[[bytes], Awaitable[None]]) -> None:
        if frame.startswith(b"late"):
            await release.wait()
        await answer(frame)

    unmatched: list[bytes] = []
    port = await _peer(nursery, half, [])
    conn = await _connect(nursery, port, unmatched=unmatched)
    with pytest.raises(UpstreamTimeout):
        await conn.request_many([(b"fast-1", b"fast"), (b"late-2", b"late")], 0.1)
    assert conn.in_flight == 0
    release.set()
    await _wait_until(lambda: unmatched == [b"late-2"])


async def test_request_many_refuses_repeated_or_busy_keys_without_sending(
    nursery: trio.Nursery,
) -> None:
    received: list[bytes] = []
    port = await _peer(nursery, _echo, received)
    conn = await _connect(nursery, port)
    with pytest.raises(UpstreamError):
        await conn.request_many([(b"same-1", b"same"), (b"same-2", b"same")], 1.0)
    assert received == [] and conn.in_flight == 0
    assert await conn.request_many([(b"same-3", b"same")], 5.0) == [b"same-3"]


async def test_request_many_on_a_broken_link_fails_the_whole_group_as_sent(
    nursery: trio.Nursery,
) -> None:
    async def answer_one_then_hang_up(
        frame: bytes, answer: Callable[[bytes], Awaitable[None]]
    ) -> None:
        if frame.startswith(b"one"):
            await answer(frame)
        else:
            raise trio.BrokenResourceError

    port = await _peer(nursery, answer_one_then_hang_up, [])
    conn = await _connect(nursery, port)
    with pytest.raises(UpstreamUnavailable) as caught:
        await conn.request_many([(b"one-1", b"one-"), (b"two-2", b"two-")], 5.0)
    assert caught.value.sent
    assert conn.in_flight == 0


async def test_a_cancelled_group_frees_all_its_keys(nursery: trio.Nursery) -> None:
    port = await _peer(nursery, _silent, [])
    conn = await _connect(nursery, port)
    with trio.move_on_after(0.05):
        await conn.request_many([(b"gr01-a", b"gr01"), (b"gr02-b", b"gr02")], 30.0)
    assert conn.in_flight == 0


# -- sending --------------------------------------------------------------------------------------
async def _stalled_peer(nursery: trio.Nursery, release: trio.Event, received: list[bytes]) -> int:
    """A peer that reads nothing until ``release``, then records every frame."""

    async def serve(stream: trio.SocketStream) -> None:
        await release.wait()
        parser = FrameParser(max_frame=65535)
        try:
            async for data in stream:
                received.extend(parser.frames(data))
        except trio.BrokenResourceError:
            pass

    listeners = await nursery.start(trio.serve_tcp, serve, 0)
    return int(listeners[0].socket.getsockname()[1])


_BIG = 60000


def _big_group(prefix: str, n: int) -> list[tuple[bytes, Hashable]]:
    return [
        (f"{prefix}{i:03d}".encode() + b"x" * _BIG, f"{prefix}{i:03d}".encode()) for i in range(n)
    ]


async def test_a_frame_whose_caller_gave_up_while_queued_is_never_sent(
    nursery: trio.Nursery,
) -> None:
    release = trio.Event()
    received: list[bytes] = []
    port = await _stalled_peer(nursery, release, received)
    conn = await _connect(nursery, port)

    async def quiet(call: Awaitable[object]) -> None:
        with trio.move_on_after(30):
            with contextlib.suppress(UpstreamError):
                await call

    async with trio.open_nursery() as callers:
        # Enough bytes to fill the socket buffers: this send stays in progress.
        callers.start_soon(quiet, conn.request_many(_big_group("A", 300), 30.0))
        await _wait_until(lambda: conn.in_flight == 300)
        await trio.sleep(0.05)  # let the send block (no assertion depends on the timing)
        with trio.CancelScope() as gave_up:
            gave_up.cancel()  # cancelled before anything could be sent
            await conn.request(b"Bgone", b"Bgone", 30.0)
        callers.start_soon(quiet, conn.request(b"Ckeep", b"Ckeep", 30.0))
        await _wait_until(lambda: conn.in_flight == 301)
        release.set()
        await _wait_until(lambda: len(received) == 301)
        callers.cancel_scope.cancel()
    assert received[-1] == b"Ckeep"
    assert b"Bgone" not in received
    assert [len(f) for f in received[:300]] == [_BIG + 4] * 300  # whole frames, never cut


async def test_a_peer_that_stops_reading_gets_the_connection_closed(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tcp, "SEND_TIMEOUT", 0.2)
    port = await _stalled_peer(nursery, trio.Event(), [])
    conn = await _connect(nursery, port)
    with pytest.raises(UpstreamUnavailable) as caught:
        await conn.request_many(_big_group("S", 300), 30.0)
    assert caught.value.sent
    await _wait_until(lambda: conn.closed)
    assert conn.in_flight == 0


# -- the server's send side ---------------------------------------------------------------------
async def test_a_task_per_frame_server_answers_every_pipelined_frame_within_its_slots(
    nursery: trio.Nursery,
) -> None:
    """Answers handed to a busy sender are sent by it, and only then free their slot: with
    8 slots, 500 pipelined frames are all answered (a lost slot would stall the reader)."""

    async def handler(payload: bytes, _peer: str) -> bytes:
        await trio.lowlevel.checkpoint()
        return payload + b"!"

    server = FramedServer(
        "test",
        handler,
        host="127.0.0.1",
        port=0,
        metrics=ServiceMetrics("test"),
        log=get_logger("test"),
        max_in_flight=8,
    )
    port = await nursery.start(server.run)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    frames = [f"{i:04d}".encode() for i in range(500)]
    await stream.send_all(b"".join(encode_frame(f) for f in frames))
    parser = FrameParser()
    answers: list[bytes] = []
    with trio.fail_after(10):
        while len(answers) < len(frames):
            data = await stream.receive_some(65536)
            assert data, "closed before every answer came"
            answers.extend(parser.frames(data))
    assert sorted(answers) == sorted(f + b"!" for f in frames)
    await stream.aclose()
    server.shutdown(0)
