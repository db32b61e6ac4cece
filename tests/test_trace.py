"""The message record and ``paylab trace``: every hop of a payment, in order, over real
sockets; stand-in advices and reversals in the original payment's trace; no PAN, PIN
block, MAC or key in any record; the ring stays bounded."""

from __future__ import annotations

import json
import sys
from typing import Any

import httpx
import trio

from billing.demo_data import DEMO_CARDS
from billing.service import BillingService
from gateway.service import GatewayService
from shared.lab.network import Network
from shared.lab.trace import build_ladder, render
from shared.lab.trace_collect import collect, last_rrn
from shared.lab.watch import Targets
from shared.ops.log import scrub_processor
from shared.ops.settings import DEFAULT_READ_TOKEN
from shared.server.record import MessageRecord, Query, mask_fields
from tests.proclab import BILL_AMOUNT, free_ports
from tests.support import (
    DEMO_PAN,
    DEMO_PIN,
    RawIsoClient,
    admin_headers,
    start_network,
    terminal_builder,
    wait_for,
)
from tests.test_store_and_forward import FakeBilling, start_gateway_with_fake

CARDS = {card.name: card for card in DEMO_CARDS}
BUDI, SITI = CARDS["Budi Santoso"], CARDS["Siti Rahayu"]
PANS = [card.pan for card in DEMO_CARDS]

#: The hops of an approved online payment, in order.
PAYMENT_HOPS = [
    ("terminal", "acquirer", "POST /payments"),
    ("acquirer", "gateway", "0200"),
    ("gateway", "hsm", "M8"),  # M8 and CA leave together (one round trip)
    ("gateway", "hsm", "CA"),
    ("hsm", "gateway", "M9"),
    ("hsm", "gateway", "CB"),
    ("gateway", "billing", "0200"),
    ("billing", "hsm", "EC"),
    ("hsm", "billing", "ED"),
    ("billing", "gateway", "0210"),
    ("gateway", "hsm", "M6"),
    ("hsm", "gateway", "M7"),
    ("gateway", "acquirer", "0210"),
    ("acquirer", "terminal", "POST /payments"),
]


def _targets(net: Network) -> Targets:
    return Targets(
        {name: f"http://127.0.0.1:{net.ports[name].http}" for name in net.ports},
        None,
        DEFAULT_READ_TOKEN,
    )


async def _pay(net: Network, bill: str, amount: int, pan: str, pin: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{net.ports['acquirer'].http}/payments"
    async with httpx.AsyncClient(timeout=20) as client:
        r = await client.post(url, json={"bill": bill, "amount": amount, "pan": pan, "pin": pin})
    data: dict[str, Any] = r.json()
    return data


async def _all_messages(net: Network) -> list[str]:
    """Every service's whole /messages answer, as text."""
    texts = []
    async with httpx.AsyncClient(timeout=10) as client:
        for name in net.ports:
            r = await client.get(
                f"http://127.0.0.1:{net.ports[name].http}/messages",
                params={"limit": 2000},
                headers=admin_headers(role="read"),
            )
            assert r.status_code == 200, r.text
            texts.append(r.text)
    return texts


def _hops(arrows: list[Any]) -> list[tuple[str, str, str]]:
    return [(a.src, a.dst, a.code) for a in arrows]


def test_ring_is_bounded_and_pages() -> None:
    record = MessageRecord("gateway", 100)
    for i in range(1000):
        msg = {"t": "0200", "2": BUDI.pan, "11": f"{i:06d}", "37": f"{i:012d}", "52": "AB" * 8}
        record.iso("in", "peer", msg, i / 1000, 1.0)
    assert len(record) == 100
    assert record.last_seq == 1000
    page, cursor = record.query(Query(limit=30))
    assert [e.seq for e in page] == list(range(901, 931))
    page2, _ = record.query(Query(since=cursor, limit=30))
    assert page2[0].seq == 931
    newest, _ = record.query(Query(limit=5, newest=True))
    assert [e.seq for e in newest] == [996, 997, 998, 999, 1000]
    assert all(e.fields["52"] == "[redacted]" and BUDI.pan not in str(e) for e in record)
    off = MessageRecord("gateway", 0)
    off.iso("in", "peer", {"t": "0200"}, 0.0, 0.0)
    assert len(off) == 0 and off.query(Query())[0] == []


def test_masking_matches_the_logs() -> None:
    masked = mask_fields(
        {
            "2": BUDI.pan,
            "35": BUDI.pan + "=2512",
            "52": "0123456789ABCDEF",
            "64": "F" * 16,
            "48": f"note {SITI.pan}",
            "4": "000000150000",
        }
    )
    assert masked["2"] == BUDI.pan[:6] + "*" * (len(BUDI.pan) - 10) + BUDI.pan[-4:]
    assert masked["35"] == masked["52"] == masked["64"] == "[redacted]"
    assert SITI.pan not in masked["48"] and masked["4"] == "000000150000"


def test_masking_is_the_log_scrubbers() -> None:
    values = [f"x{BUDI.pan}y", f"{SITI.pan} and {BUDI.pan}", "1234567890123", "12345", "abc"]
    scrubbed = scrub_processor(None, "", {str(i): v for i, v in enumerate(values, start=3)})
    assert mask_fields({str(i): v for i, v in enumerate(values, start=3)}) == scrubbed


def test_ladder_of_an_unjoined_message_is_labelled() -> None:
    arrows = build_ladder(
        [
            {
                "seq": 1,
                "service": "gateway",
                "direction": "in",
                "link": "billing",
                "kind": "iso",
                "code": "0210",
                "mono_us": 5_000_000,
                "wall_us": 1,
                "stan": "000001",
            },
        ]
    )
    assert len(arrows) == 1 and arrows[0].note == "seen by the receiver only"
    assert "0210" in render(arrows)


async def test_a_payment_trace_has_every_hop_in_order(network: Network) -> None:
    body = await _pay(network, "PLN-0001", 150_000, BUDI.pan, BUDI.pin)
    assert body["response_code"] == "00", body
    targets = _targets(network)
    async with httpx.AsyncClient(timeout=10) as client:
        rrn = await last_rrn(client, targets)
    assert rrn == body["rrn"]
    arrows = build_ladder(await collect(targets, rrn))
    assert _hops(arrows) == PAYMENT_HOPS, render(arrows)
    # Plausible times: in order, each arrow seen by both ends, the whole under 15 s.
    times = [a.at_us for a in arrows]
    assert times == sorted(times)
    assert all(a.sent_us is not None and a.received_us is not None for a in arrows[1:-1])
    assert all(a.transit_us is not None and a.transit_us >= 0 for a in arrows[1:-1])
    assert 0 < times[-1] - times[0] < 15_000_000
    assert arrows[-2].result == "00"
    text = render(arrows, fields=True)
    assert "Processing Code" in text and "bill payment" in text
    # Nothing sensitive in any record.
    for answer in await _all_messages(network):
        for pan in PANS:
            assert pan not in answer
    # The record needs the reader token.
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(f"http://127.0.0.1:{network.ports['gateway'].http}/messages")
        assert r.status_code == 401


async def test_standin_advice_and_reversal_join_the_payment(
    tmp_path: Any, nursery: trio.Nursery
) -> None:
    net = await start_network(
        nursery,
        tmp_path / "data",
        reconnect_base_delay=0.1,
        reconnect_max_delay=0.5,
        breaker_open_wait=1.0,
        saf_retry_interval=0.2,
        rate_limit_terminal=0.0,
    )
    try:
        gateway = net.services["gateway"]
        assert isinstance(gateway, GatewayService)
        await net.services["billing"].stop()
        await wait_for(lambda: not gateway.billing.available)
        body = await _pay(net, "PLN-1005", 330_000, BUDI.pan, BUDI.pin)
        assert body["response_code"] == "00", body
        rrn = body["rrn"]
        # Billing back (a new instance on the same ISO port): the queued advice goes out.
        old = net.services["billing"]
        billing = BillingService(
            old.settings.model_copy(update={"billing_iso_port": net.ports["billing"].iso}),
            net.keys,
        )
        await nursery.start(billing.run)
        net.services["billing"] = billing  # net.stop() stops this one
        assert billing.ports is not None
        net.ports["billing"] = billing.ports
        targets = _targets(net)

        async def advice_delivered() -> list[Any]:
            arrows = build_ladder(await collect(targets, rrn))
            return [a for a in arrows if a.code == "0230" and a.dst == "gateway"]

        with trio.fail_after(30):
            while not await advice_delivered():
                await trio.sleep(0.2)
        arrows = build_ladder(await collect(targets, rrn))
        hops = _hops(arrows)
        assert ("gateway", "acquirer", "0210") in hops
        assert hops.index(("gateway", "billing", "0220")) > hops.index(
            ("gateway", "acquirer", "0210")
        )
        for answer in await _all_messages(net):
            for pan in PANS:
                assert pan not in answer
    finally:
        await net.stop()


async def test_reversal_after_68_appears_in_the_payments_trace(
    tmp_path: Any, nursery: trio.Nursery
) -> None:
    """Billing swallows the payment (the gateway answers 68 and queues a 0420): the
    reversal and billing's answer to it are arrows of the payment's own trace."""
    (port,) = free_ports(1)
    fake = FakeBilling(port, lambda msg: None if msg["t"] == "0200" else "00")
    await fake.start(nursery)
    net = await start_gateway_with_fake(nursery, tmp_path, port, billing_timeout=0.5)
    try:
        builder = terminal_builder("TERMTRCE", stan_start=0)
        client = await RawIsoClient.connect(net.ports["gateway"].iso)
        payment = builder.payment("PLN-1004", BILL_AMOUNT, DEMO_PAN, DEMO_PIN)
        assert (await client.roundtrip(payment))["39"] == "68"
        await client.aclose()
        targets = _targets(net)

        async def reversal_answered() -> list[Any]:
            arrows = build_ladder(await collect(targets, payment["37"]))
            return [a for a in arrows if a.code == "0430" and a.src == "billing"]

        with trio.fail_after(30):
            while not await reversal_answered():
                await trio.sleep(0.2)
        arrows = build_ladder(await collect(targets, payment["37"]))
        hops = _hops(arrows)
        sent = hops.index(("gateway", "billing", "0200"))
        answered = hops.index(("gateway", "acquirer", "0210"))
        reversal = hops.index(("gateway", "billing", "0420"))
        assert sent < answered < reversal, render(arrows)
        assert arrows[sent].note == "no answer in time"
        assert arrows[answered].result == "68"
    finally:
        await net.stop()


async def test_ring_stays_bounded_under_load(tmp_path: Any, nursery: trio.Nursery) -> None:
    net = await start_network(
        nursery, tmp_path / "data", message_record_size=40, rate_limit_terminal=0.0
    )
    try:
        url = f"http://127.0.0.1:{net.ports['acquirer'].http}/inquiries"
        async with httpx.AsyncClient(timeout=20) as client:

            async def inquire(bill: str) -> None:
                r = await client.post(url, json={"bill": bill})
                assert r.status_code == 200, r.text

            async with trio.open_nursery() as load:
                for i in range(30):
                    load.start_soon(inquire, f"PLN-{1 + i % 9:04d}")
        for name, svc in net.services.items():
            assert len(svc.record) <= 40, name
        assert net.services["gateway"].record.last_seq > 40
        assert len(net.services["gateway"].record) == 40
    finally:
        await net.stop()


async def test_trace_command_prints_the_ladder(network: Network) -> None:
    body = await _pay(network, "PLN-0002", 275_050, SITI.pan, SITI.pin)
    assert body["response_code"] == "00", body
    urls = []
    for name in ("acquirer", "gateway", "billing", "hsm"):
        urls += [f"--{name}-url", f"http://127.0.0.1:{network.ports[name].http}"]
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-m", "shared.cli", "trace", "--last", "--fields", *urls],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    text = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert f"RRN {body['rrn']}: 14 messages" in text
    assert "EC verify PIN" in text and "Response Code" in text and "approved" in text
    assert SITI.pan not in text
    with trio.fail_after(60):
        none = await trio.run_process(
            [sys.executable, "-m", "shared.cli", "trace", "999999999999", *urls],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert none.returncode == 1 and b"no message with RRN" in none.stderr
    assert b"Traceback" not in none.stderr


async def test_record_file_has_the_payment_and_no_pan(tmp_path: Any, nursery: trio.Nursery) -> None:
    data = tmp_path / "data"
    net = await start_network(nursery, data, message_record_file=True)
    try:
        body = await _pay(net, "PLN-0001", 150_000, BUDI.pan, BUDI.pin)
        assert body["response_code"] == "00", body
        gateway_file = data / "messages-gateway.jsonl"

        def written() -> bool:
            return gateway_file.exists() and body["rrn"] in gateway_file.read_text()

        await wait_for(written, timeout=15)
    finally:
        await net.stop()
    files = sorted(data.glob("messages-*.jsonl"))
    assert [f.name for f in files] == [
        f"messages-{s}.jsonl" for s in ("acquirer", "billing", "gateway", "hsm")
    ]
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert {e["code"] for e in lines} >= {"0200", "0210", "CA", "M8", "EC", "M6"}
    raw = b"".join(f.read_bytes() for f in files)
    for pan in PANS:
        assert pan.encode() not in raw
