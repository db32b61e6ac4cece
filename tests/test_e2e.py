"""End to end: the four services on loopback with real sockets, SQLite and cryptography."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from billing.service import BillingService
from gateway.service import GatewayService
from shared import codec
from shared.codes import RC
from shared.log import configure_logging
from shared.messages import MTI_NETWORK, NMI_ECHO, transmission_datetime
from shared.network import Network
from tests.support import (
    DEMO_PAN,
    DEMO_PIN,
    RawIsoClient,
    start_network,
    terminal_builder,
    wait_for,
)


def api(net: Network) -> str:
    return f"http://127.0.0.1:{net.ports['acquirer'].http}"


async def post(net: Network, path: str, body: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=15) as client:
        if isinstance(body, (bytes, str)):
            return await client.post(
                api(net) + path, content=body, headers={"content-type": "application/json"}
            )
        return await client.post(api(net) + path, json=body)


async def get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=15) as client:
        return await client.get(url)


def billing(net: Network) -> BillingService:
    svc = net.services["billing"]
    assert isinstance(svc, BillingService)
    return svc


async def postings(net: Network, bill: str) -> int:
    store = billing(net).store
    assert store is not None
    return await trio.to_thread.run_sync(store.postings_count, bill)


async def pay(
    net: Network, bill: str, amount: int, pan: str = DEMO_PAN, pin: str = DEMO_PIN
) -> dict[str, Any]:
    r = await post(net, "/payments", {"bill": bill, "amount": amount, "pan": pan, "pin": pin})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


# -- the business outcomes, through the acquirer's HTTP API ----------------------------------


async def test_inquiry_returns_amount_due(network: Network) -> None:
    r = await post(network, "/inquiries", {"bill": "PLN-0002"})
    assert r.status_code == 200
    body = r.json()
    assert body["response_code"] == "00"
    assert body["amount_due"] == 275050
    assert body["biller"] == "PLN"
    assert body["customer"] == "Siti Rahayu"
    assert body["mac_verified"] is True


async def test_payment_is_approved_and_posted_exactly_once(network: Network) -> None:
    body = await pay(network, "PLN-0001", 150000)
    assert body["response_code"] == "00"
    assert body["status"] == "approved"
    assert body["pan"] == "476173******0010"
    assert body["approval_code"]
    assert await postings(network, "PLN-0001") == 1

    record = await get(f"{api(network)}/transactions/{body['id']}")
    assert record.status_code == 200
    assert record.json()["status"] == "approved"

    again = await pay(network, "PLN-0001", 150000)
    assert again["response_code"] == RC.BILL_ALREADY_PAID
    assert await postings(network, "PLN-0001") == 1


@pytest.mark.parametrize(
    ("bill", "amount", "pin", "code"),
    [
        ("NOPE-0001", 1000, DEMO_PIN, RC.UNKNOWN_BILL),
        ("TELCO-0002", 350000, DEMO_PIN, RC.BILL_ALREADY_PAID),
        ("PDAM-0001", 89901, DEMO_PIN, RC.INVALID_AMOUNT),
        ("PDAM-0001", 89900, "9999", RC.WRONG_PIN),
    ],
    ids=["unknown-bill", "already-paid", "amount-mismatch", "wrong-pin"],
)
async def test_declines(network: Network, bill: str, amount: int, pin: str, code: str) -> None:
    body = await pay(network, bill, amount, pin=pin)
    assert body["response_code"] == code
    assert body["status"] == "declined"
    assert await postings(network, bill) == 0


async def test_unknown_card_is_declined_14(network: Network) -> None:
    body = await pay(network, "PLN-1001", 125000, pan="4000000000000002")
    assert body["response_code"] == RC.NO_SUCH_CARD


async def test_reversal_undoes_the_posting(network: Network) -> None:
    paid = await pay(network, "PLN-1002", 98500)
    assert paid["response_code"] == "00"
    r = await post(network, f"/payments/{paid['id']}/reversal", {})
    assert r.status_code == 200, r.text
    assert r.json()["response_code"] == "00"
    store = billing(network).store
    assert store is not None
    records = await trio.to_thread.run_sync(store.list_postings)
    mine = [p for p in records if p.bill_number == "PLN-1002"]
    assert [p.status for p in mine] == ["reversed"]
    # The bill is open again: an inquiry answers with the amount due, a new payment posts.
    inquiry = (await post(network, "/inquiries", {"bill": "PLN-1002"})).json()
    assert inquiry["response_code"] == "00"
    assert (await pay(network, "PLN-1002", 98500))["response_code"] == "00"


async def test_online_payments_and_reversal_reconcile_clean(network: Network) -> None:
    from gateway.reconcile import load_client_facts, load_gateway_facts, load_postings, reconcile

    paid = await pay(network, "PLN-1003", 212750)
    assert paid["response_code"] == "00"
    assert (await pay(network, "PLN-1004", 64300))["response_code"] == "00"
    r = await post(network, f"/payments/{paid['id']}/reversal", {})
    assert r.json()["response_code"] == "00"
    # Every answer was journaled before it left: nothing to wait for.
    gateway_sessions = network.services["gateway"].sessions
    billing_engine = billing(network).engine
    acquirer_engine = network.services["acquirer"].engine
    assert gateway_sessions is not None and billing_engine is not None
    assert acquirer_engine is not None
    report = await trio.to_thread.run_sync(
        lambda: reconcile(
            load_gateway_facts(gateway_sessions),
            load_postings(billing_engine),
            load_client_facts(acquirer_engine),
        )
    )
    assert report.clean, report.mismatches
    assert (report.checked, report.pending, report.client_side) == (2, 0, True)
    # One payment in force, one reversed by its client: approved counts the one in force.
    assert (report.approved, report.posted, report.reversed) == (1, 1, 1)
    assert report.journal_gaps == []


async def test_reversal_of_unknown_transaction_is_404(network: Network) -> None:
    r = await post(network, "/payments/0123456789abcdef0123456789abcdef/reversal", {})
    assert r.status_code == 404
    assert "error" in r.json()


# -- the gateway's ISO listener, as a terminal would use it ----------------------------------


async def test_same_request_twice_gives_same_answer_and_one_posting(network: Network) -> None:
    builder = terminal_builder()
    msg = builder.payment("PLN-1003", 212750, DEMO_PAN, DEMO_PIN)
    client = await RawIsoClient.connect(network.ports["gateway"].iso)
    first = await client.roundtrip(msg)
    second = await client.roundtrip(msg)
    assert first["39"] == "00"
    assert second["39"] == first["39"]
    assert second["38"] == first["38"]
    assert await postings(network, "PLN-1003") == 1
    await client.aclose()


async def test_bad_mac_is_declined_63(network: Network) -> None:
    builder = terminal_builder()
    msg = builder.payment("PLN-1004", 64300, DEMO_PAN, DEMO_PIN)
    tampered = dict(msg, **{"4": "000000000001"})  # amount changed after the MAC
    client = await RawIsoClient.connect(network.ports["gateway"].iso)
    answer = await client.roundtrip(tampered)
    assert answer["39"] == RC.SECURITY_VIOLATION
    wrong_mac = dict(msg, **{"64": "0123456789ABCDEF"})
    assert (await client.roundtrip(wrong_mac))["39"] == RC.SECURITY_VIOLATION
    assert await postings(network, "PLN-1004") == 0
    # The connection is still good for an honest request.
    assert (await client.roundtrip(builder.payment("PLN-1004", 64300, DEMO_PAN, DEMO_PIN)))[
        "39"
    ] == "00"
    await client.aclose()


async def test_gateway_answers_echo(network: Network) -> None:
    client = await RawIsoClient.connect(network.ports["gateway"].iso)
    echo = {"t": MTI_NETWORK, "7": transmission_datetime(), "11": "000777", "70": NMI_ECHO}
    answer = await client.roundtrip(echo)
    assert answer["t"] == "0810"
    assert answer["39"] == "00"
    assert answer["70"] == NMI_ECHO
    await client.aclose()


async def test_terminal_listener_passes_through(network: Network) -> None:
    builder = terminal_builder("TERM0002")
    client = await RawIsoClient.connect(network.ports["acquirer"].iso)
    raw_and_msg = await client.roundtrip(builder.inquiry("PDAM-0001"))
    assert raw_and_msg["39"] == "00"
    assert int(raw_and_msg["4"]) == 89900
    await client.send(builder.payment("PDAM-0001", 89900, DEMO_PAN, DEMO_PIN))
    raw, answer = await client.receive()
    assert answer["39"] == "00"
    assert builder.response_mac_ok(raw, answer)
    await client.aclose()


# -- framing and malformed input -------------------------------------------------------------


async def test_split_and_merged_chunks(network: Network) -> None:
    builder = terminal_builder()
    client = await RawIsoClient.connect(network.ports["gateway"].iso)
    from shared.framing import encode_frame

    a = encode_frame(codec.encode(builder.inquiry("PLN-1005")))
    b = encode_frame(codec.encode(builder.inquiry("PLN-1006")))
    await client.send_raw(a + b)  # two frames in one chunk
    answers = {(await client.receive())[1]["48"], (await client.receive())[1]["48"]}
    assert answers == {"PLN-1005", "PLN-1006"}
    c = encode_frame(codec.encode(builder.inquiry("PLN-1007")))
    for i in range(len(c)):  # one frame byte by byte
        await client.send_raw(c[i : i + 1])
    _, answer = await client.receive()
    assert (answer["48"], answer["39"]) == ("PLN-1007", "00")
    await client.aclose()


async def test_oversize_frame_closes_only_that_connection(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    log = io.StringIO()
    configure_logging("info", "json", stream=log)  # before the services bind their loggers
    network = await start_network(nursery, tmp_path)
    try:
        port = network.ports["gateway"].iso
        bad = await RawIsoClient.connect(port)
        good = await RawIsoClient.connect(port)
        await bad.send_raw((60000).to_bytes(2, "big") + b"x" * 100)
        assert await bad.is_closed_by_peer()
        answer = await good.roundtrip(terminal_builder().inquiry("PLN-1008"))
        assert answer["39"] == "00"
        lines = [json.loads(line) for line in log.getvalue().splitlines() if line.strip()]
        assert any(e["event"] == "framing_error" and e["service"] == "gateway" for e in lines)
        await bad.aclose()
        await good.aclose()
    finally:
        await network.stop()
        configure_logging("warning", "json")


async def test_malformed_requests_keep_the_connection(network: Network) -> None:
    builder = terminal_builder()
    client = await RawIsoClient.connect(network.ports["gateway"].iso)
    good = codec.encode(builder.inquiry("PLN-1009"))
    # Bad bitmap: undecodable, no answer possible, connection kept.
    await client.send(good[:4] + b"ZZZZZZZZZZZZZZZZ" + good[20:])
    # Non-numeric amount: decodable, answered 30.
    bad_amount = builder.payment("PLN-1009", 89000, DEMO_PAN, DEMO_PIN)
    bad_amount["4"] = "0000000A9000"
    assert (await client.roundtrip(bad_amount))["39"] == RC.FORMAT_ERROR
    # Missing mandatory field: answered 30.
    missing = builder.inquiry("PLN-1009")
    del missing["37"]
    answer = await client.roundtrip(missing)
    assert answer["39"] == RC.FORMAT_ERROR
    # And the next good request on the same connection is approved.
    assert (await client.roundtrip(builder.payment("PLN-1009", 89000, DEMO_PAN, DEMO_PIN)))[
        "39"
    ] == "00"
    metrics = (await get(f"http://127.0.0.1:{network.ports['gateway'].http}/metrics")).text
    assert 'paylab_iso_frames_rejected_total{reason="undecodable"} 1.0' in metrics
    await client.aclose()


# -- HTTP surface ---------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["acquirer", "gateway", "billing", "hsm"])
async def test_health_and_metrics(network: Network, service: str) -> None:
    base = f"http://127.0.0.1:{network.ports[service].http}"
    health = await get(base + "/health")
    assert health.status_code == 200
    body = health.json()
    assert body["service"] == service
    assert body["ready"] is True
    assert all(dep["ok"] for dep in body["dependencies"].values())
    metrics = await get(base + "/metrics")
    assert metrics.status_code == 200
    assert "paylab_iso_requests_in_progress" in metrics.text


async def test_bad_json_gives_422_with_a_message(network: Network) -> None:
    r = await post(network, "/payments", "{not json")
    assert r.status_code == 422
    assert r.json()["error"] == "request body is not valid JSON"
    r = await post(network, "/payments", {"bill": "PLN-0001", "amount": -5, "pan": "12"})
    assert r.status_code == 422
    fields = {d["field"] for d in r.json()["details"]}
    assert {"amount", "pan", "pin"} <= fields
    r = await post(
        network,
        "/payments",
        {"bill": "PLN-0001", "amount": 5, "pan": "4761739001010011", "pin": "1234"},
    )
    assert r.status_code == 422  # Luhn
    assert (await get(f"{api(network)}/transactions/nope")).status_code == 404


# -- upstream failures ------------------------------------------------------------------------


async def test_no_billing_link_gives_stand_in_for_payments_and_91_for_inquiries(
    network: Network,
) -> None:
    await billing(network).stop()
    gateway = network.services["gateway"]
    assert isinstance(gateway, GatewayService)
    await wait_for(lambda: not gateway.billing.connected)
    body = await post(
        network,
        "/payments",
        {"bill": "PLN-1010", "amount": 412350, "pan": DEMO_PAN, "pin": DEMO_PIN},
    )
    assert body.status_code == 200
    assert body.json()["response_code"] == RC.APPROVED
    assert body.json()["approval_code"].startswith("SI")  # the stand-in marker
    inquiry = await post(network, "/inquiries", {"bill": "PLN-1011"})
    assert inquiry.json()["response_code"] == RC.ISSUER_INOPERATIVE


async def test_no_billing_link_gives_91_when_stand_in_is_off(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    net = await start_network(nursery, tmp_path, standin_policy="decline")
    await billing(net).stop()
    gateway = net.services["gateway"]
    assert isinstance(gateway, GatewayService)
    await wait_for(lambda: not gateway.billing.connected)
    body = await post(
        net,
        "/payments",
        {"bill": "PLN-1010", "amount": 412350, "pan": DEMO_PAN, "pin": DEMO_PIN},
    )
    assert body.json()["response_code"] == RC.ISSUER_INOPERATIVE
    assert body.json()["status"] == "failed"
    await net.stop()


async def test_billing_database_failure_answers_91_then_recovers(network: Network) -> None:
    import sqlite3

    path = network.settings.data_dir / "billing.db"

    def rename(a: str, b: str) -> None:
        db = sqlite3.connect(path)
        try:
            db.execute(f"ALTER TABLE {a} RENAME TO {b}")
            db.commit()
        finally:
            db.close()

    await trio.to_thread.run_sync(rename, "bills", "bills_away")
    body = await pay(network, "PLN-1011", 55250)
    assert body["response_code"] == RC.ISSUER_INOPERATIVE
    await trio.to_thread.run_sync(rename, "bills_away", "bills")
    body = await pay(network, "PLN-1011", 55250)
    assert body["response_code"] == "00"
    assert await postings(network, "PLN-1011") == 1


async def test_blocked_card_is_declined_05(network: Network) -> None:
    import sqlite3

    def block() -> None:
        db = sqlite3.connect(network.settings.data_dir / "billing.db")
        try:
            db.execute("UPDATE cards SET status = 'blocked' WHERE pan_masked = '476173******0010'")
            db.commit()
        finally:
            db.close()

    await trio.to_thread.run_sync(block)
    body = await pay(network, "PLN-1012", 143000)
    assert body["response_code"] == RC.DO_NOT_HONOR
    assert await postings(network, "PLN-1012") == 0


async def test_ascii4_framing_end_to_end(tmp_path: Path, nursery: trio.Nursery) -> None:
    from shared.framing import HeaderKind

    net = await start_network(nursery, tmp_path, framing=HeaderKind.ASCII4)
    try:
        client = await RawIsoClient.connect(net.ports["gateway"].iso, HeaderKind.ASCII4)
        builder = terminal_builder()
        answer = await client.roundtrip(builder.payment("PLN-1013", 199999, DEMO_PAN, DEMO_PIN))
        assert answer["39"] == "00"
        await client.aclose()
        assert (await pay(net, "PLN-1014", 72800))["response_code"] == "00"
    finally:
        await net.stop()


async def test_concurrent_payments_post_each_bill_once(network: Network) -> None:
    """Three terminals race to pay each of ten bills: one approval and one posting per bill."""
    bills = [f"PLN-10{n:02d}" for n in range(1, 11)]
    amounts = {}
    for bill in bills:
        r = (await post(network, "/inquiries", {"bill": bill})).json()
        amounts[bill] = r["amount_due"]
    codes: dict[str, list[str]] = {bill: [] for bill in bills}

    async def terminal(name: str) -> None:
        builder = terminal_builder(name)
        client = await RawIsoClient.connect(network.ports["gateway"].iso)
        for bill in bills:
            answer = await client.roundtrip(
                builder.payment(bill, amounts[bill], DEMO_PAN, DEMO_PIN)
            )
            codes[bill].append(answer["39"])
        await client.aclose()

    async with trio.open_nursery() as n:
        for name in ("RACE0001", "RACE0002", "RACE0003"):
            n.start_soon(terminal, name)
    for bill in bills:
        assert sorted(codes[bill]) == ["00", "88", "88"], (bill, codes[bill])
        assert await postings(network, bill) == 1


async def test_unsupported_mti_gets_30_and_a_stray_response_is_dropped(network: Network) -> None:
    client = await RawIsoClient.connect(network.ports["billing"].iso)
    auth = {"t": "0100", "7": transmission_datetime(), "11": "000123", "41": "TERM0001"}
    answer = await client.roundtrip(auth)
    assert (answer["t"], answer["39"]) == ("0110", RC.FORMAT_ERROR)
    await client.send({"t": "0810", "7": transmission_datetime(), "11": "000124", "39": "00"})
    echo = {"t": MTI_NETWORK, "7": transmission_datetime(), "11": "000125", "70": NMI_ECHO}
    answer = await client.roundtrip(echo)  # the next answer is the echo's: 0810 was dropped
    assert (answer["t"], answer["11"]) == ("0810", "000125")
    await client.aclose()
