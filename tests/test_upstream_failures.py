"""The gateway facing a billing host that misbehaves: silent, late, out of order."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import trio
import trio.testing

from gateway.service import GatewayService
from shared.iso import codec
from shared.iso.codes import RC
from shared.iso.framing import FrameParser, encode_frame
from shared.iso.messages import Message, make_response
from shared.lab.network import Network
from tests.support import (
    DEMO_PAN,
    DEMO_PIN,
    RawIsoClient,
    admin_headers,
    lab_settings,
    terminal_builder,
)

#: Decides what a fake billing host does with the requests it has received so far.
Behaviour = Callable[[list[Message], Callable[[Message], Awaitable[None]]], Awaitable[None]]


async def fake_billing(nursery: trio.Nursery, behaviour: Behaviour) -> int:
    """A TCP listener speaking ISO-8583 frames whose answers ``behaviour`` decides.

    Network management (0800: sign-on, echo) is answered 00 at once, like a live host.
    """

    async def serve(stream: trio.SocketStream) -> None:
        parser = FrameParser()
        seen: list[Message] = []

        async def answer(msg: Message) -> None:
            await stream.send_all(encode_frame(codec.encode(msg)))

        async for data in stream:
            for frame in parser.frames(data):
                msg = codec.decode(frame)
                if msg["t"] == "0800":
                    await answer(make_response(msg, "00"))
                    continue
                seen.append(msg)
                await behaviour(seen, answer)

    listeners = await nursery.start(trio.serve_tcp, serve, 0)
    return int(listeners[0].socket.getsockname()[1])


async def held_billing(nursery: trio.Nursery) -> tuple[int, trio.Event, trio.Event]:
    """A billing that approves each request only once ``release`` is set.

    Returns (port, arrived, release): ``arrived`` is set when the first request is in.
    """
    arrived = trio.Event()
    release = trio.Event()

    async def held(seen: list[Message], answer: Callable[[Message], Awaitable[None]]) -> None:
        request = seen[-1]

        async def later() -> None:
            await release.wait()
            await answer(make_response(request, "00", f4="000000000042", f38="000001"))

        arrived.set()
        nursery.start_soon(later)

    return await fake_billing(nursery, held), arrived, release


async def gateway_with_billing_at(
    nursery: trio.Nursery, tmp_path: Path, billing_port: int
) -> Network:
    net = Network(
        lab_settings(tmp_path, billing_address=f"127.0.0.1:{billing_port}", billing_timeout=0.5),
        names=("hsm", "gateway"),
    )
    await nursery.start(net.run)
    gateway = net.services["gateway"]
    assert isinstance(gateway, GatewayService)
    with trio.fail_after(5):
        while not gateway.billing.connected:
            await trio.sleep(0.01)
    return net


async def test_silent_billing_gives_68_and_is_journaled_unknown(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    async def silent(seen: list[Message], answer: Callable[[Message], Awaitable[None]]) -> None:
        return None

    net = await gateway_with_billing_at(nursery, tmp_path, await fake_billing(nursery, silent))
    builder = terminal_builder()
    client = await RawIsoClient.connect(net.ports["gateway"].iso)
    payment = builder.payment("PLN-0001", 150000, DEMO_PAN, DEMO_PIN)
    answer = await client.roundtrip(payment)
    assert answer["39"] == RC.LATE_RESPONSE
    # An inquiry that times out changed nothing upstream: "inoperative", not "unknown".
    assert (await client.roundtrip(builder.inquiry("PLN-0001")))["39"] == RC.ISSUER_INOPERATIVE
    async with httpx.AsyncClient(headers=admin_headers()) as http:
        r = await http.get(
            f"http://127.0.0.1:{net.ports['gateway'].http}/transactions",
            params={"rrn": payment["37"]},
        )
    assert [row["status"] for row in r.json()["items"]] == ["unknown"]
    await client.aclose()
    await net.stop()


async def test_timed_out_inquiry_is_retried_and_its_late_answer_counted(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """An inquiry is safe to resend: its timeout is retried; the late first answer is
    counted as unmatched and never handed to another request."""
    release = trio.Event()

    async def late(seen: list[Message], answer: Callable[[Message], Awaitable[None]]) -> None:
        if len(seen) == 1:

            async def later() -> None:
                await release.wait()
                await answer(make_response(seen[0], "00"))

            nursery.start_soon(later)
        else:
            await answer(make_response(seen[-1], "00", f4="000000000001", f62="X|Y"))

    net = await gateway_with_billing_at(nursery, tmp_path, await fake_billing(nursery, late))
    builder = terminal_builder()
    client = await RawIsoClient.connect(net.ports["gateway"].iso)
    first = await client.roundtrip(builder.inquiry("PLN-0001"))
    assert (first["39"], first["48"]) == ("00", "PLN-0001")
    registry = net.services["gateway"].metrics.registry
    retries = {"upstream": "billing", "reason": "timeout"}
    assert registry.get_sample_value("paylab_upstream_retries_total", retries) == 1
    release.set()
    second = await client.roundtrip(builder.inquiry("PLN-0002"))
    assert (second["39"], second["48"]) == ("00", "PLN-0002")
    with trio.fail_after(5):
        while not registry.get_sample_value(
            "paylab_upstream_unmatched_responses_total", {"upstream": "billing"}
        ):
            await trio.sleep(0.01)
    await client.aclose()
    await net.stop()


async def test_answers_out_of_order_reach_the_right_requests(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    async def reverse_pairs(
        seen: list[Message], answer: Callable[[Message], Awaitable[None]]
    ) -> None:
        if len(seen) % 2 == 0:  # answer each pair second-first
            for msg in (seen[-1], seen[-2]):
                await answer(make_response(msg, "00", f4="000000000042"))

    net = await gateway_with_billing_at(
        nursery, tmp_path, await fake_billing(nursery, reverse_pairs)
    )
    results: dict[str, str] = {}

    async def one(terminal: str, bill: str) -> None:
        client = await RawIsoClient.connect(net.ports["gateway"].iso)
        answer = await client.roundtrip(terminal_builder(terminal).inquiry(bill))
        results[bill] = answer["48"]
        await client.aclose()

    async with trio.open_nursery() as n:
        n.start_soon(one, "TERMAAAA", "PLN-1001")
        n.start_soon(one, "TERMBBBB", "PLN-1002")
    assert results == {"PLN-1001": "PLN-1001", "PLN-1002": "PLN-1002"}
    await net.stop()


async def test_stop_answers_requests_in_flight_then_closes(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    port, arrived, release = await held_billing(nursery)
    net = await gateway_with_billing_at(nursery, tmp_path, port)
    client = await RawIsoClient.connect(net.ports["gateway"].iso)
    idle = await RawIsoClient.connect(net.ports["gateway"].iso)
    await client.send(terminal_builder().inquiry("PLN-0001"))
    await arrived.wait()
    async with trio.open_nursery() as n:
        n.start_soon(net.stop)  # begins while the inquiry waits for billing
        await trio.testing.wait_all_tasks_blocked()
        release.set()
        _raw, answer = await client.receive()
        assert (answer["39"], answer["48"]) == ("00", "PLN-0001")
    assert await client.is_closed_by_peer()
    assert await idle.is_closed_by_peer()


async def test_stop_answers_http_payments_in_flight(tmp_path: Path, nursery: trio.Nursery) -> None:
    port, arrived, release = await held_billing(nursery)
    net = Network(
        lab_settings(tmp_path, billing_address=f"127.0.0.1:{port}"),
        names=("hsm", "gateway", "acquirer"),
    )
    await nursery.start(net.run)
    api = f"http://127.0.0.1:{net.ports['acquirer'].http}"
    result: dict[str, httpx.Response] = {}

    async def pay() -> None:
        async with httpx.AsyncClient(timeout=15) as client:
            result["r"] = await client.post(
                api + "/payments",
                json={"bill": "PLN-0001", "amount": 150000, "pan": DEMO_PAN, "pin": DEMO_PIN},
            )

    async with trio.open_nursery() as n:
        n.start_soon(pay)
        await arrived.wait()
        n.start_soon(net.stop)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert result["r"].status_code == 200
    assert result["r"].json()["response_code"] == "00"


async def test_pool_close_stops_a_reconnecting_pool_at_once(nursery: trio.Nursery) -> None:
    """A pool retrying a refused peer, with long delays, stops as soon as it is closed."""
    from shared.net.pool import PoolConfig, UpstreamPool
    from shared.ops.log import get_logger
    from shared.ops.metrics import ServiceMetrics
    from shared.resilience.backoff import Backoff
    from shared.server.service import IsoDialect, decode_iso_keyed

    pool = UpstreamPool(
        "billing",
        ("127.0.0.1", 9),  # discard port: refused, so the pool keeps reconnecting
        decode_iso_keyed,
        IsoDialect(),
        metrics=ServiceMetrics("test"),
        log=get_logger("test"),
        config=PoolConfig(connect_timeout=30.0, reconnect=Backoff(30.0, 2.0, 30.0, 1)),
    )
    done = trio.Event()

    async def run() -> None:
        await pool.run()
        done.set()

    nursery.start_soon(run)
    await trio.testing.wait_all_tasks_blocked()
    with trio.fail_after(2):
        await pool.close()
        await done.wait()
    assert not pool.connected
