"""PAN at rest: after online, declined and stand-in payments (queued, then forwarded once
billing is back), no clear PAN is in any database file or any log line."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import trio

from billing.demo_data import DEMO_CARDS
from billing.service import BillingService
from gateway.service import GatewayService
from shared.lab.network import Network
from shared.ops.log import configure_logging
from shared.pan import mask_pan
from tests.support import start_network, wait_for

CARDS = {card.name: card for card in DEMO_CARDS}
BUDI, SITI, AGUS = CARDS["Budi Santoso"], CARDS["Siti Rahayu"], CARDS["Agus Wijaya"]
PANS = [BUDI.pan, SITI.pan, AGUS.pan]


async def _pay(net: Network, bill: str, amount: int, pan: str, pin: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{net.ports['acquirer'].http}/payments"
    async with httpx.AsyncClient(timeout=15) as client:
        r = await client.post(url, json={"bill": bill, "amount": amount, "pan": pan, "pin": pin})
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def _gateway(net: Network) -> GatewayService:
    gateway = net.services["gateway"]
    assert isinstance(gateway, GatewayService)
    return gateway


async def _saf_depth(gateway: GatewayService) -> int:
    saf = gateway.saf
    assert saf is not None
    stats = await gateway.in_db_thread(lambda: saf.stats(now=datetime.now(UTC)))
    return int(stats.depth)


def _needles(pan: str) -> list[bytes]:
    """The PAN as ASCII digits and as packed BCD."""
    return [pan.encode(), bytes.fromhex(pan)]


def _hits_in_files(data_dir: Path) -> list[str]:
    hits = []
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert any(p.name == "gateway.db" for p in files)
    assert any(p.name == "billing.db" for p in files)
    assert any(p.name == "acquirer.db" for p in files)
    for path in files:
        data = path.read_bytes()
        for pan in PANS:
            if any(needle in data for needle in _needles(pan)):
                hits.append(f"{path.name}: {pan[:6]}...")
    return hits


async def test_no_clear_pan_in_databases_or_logs(tmp_path: Path, nursery: trio.Nursery) -> None:
    log = io.StringIO()
    configure_logging("debug", "json", stream=log)  # before the services bind their loggers
    data_dir = tmp_path / "data"
    net = await start_network(
        nursery,
        data_dir,
        reconnect_base_delay=0.1,
        reconnect_max_delay=0.5,
        breaker_open_wait=1.0,
        saf_retry_interval=0.2,
        rate_limit_terminal=0.0,
    )
    try:
        # Online: three cards approved, one wrong PIN declined.
        online = [
            ("PLN-0001", 150_000, BUDI.pan, BUDI.pin),
            ("PLN-0002", 275_050, SITI.pan, SITI.pin),
            ("PLN-1003", 212_750, AGUS.pan, AGUS.pin),
        ]
        for bill, amount, pan, pin in online:
            body = await _pay(net, bill, amount, pan, pin)
            assert body["response_code"] == "00", body
        wrong_pin = "9999" if SITI.pin != "9999" else "1111"
        declined = await _pay(net, "PLN-1006", 47_500, SITI.pan, wrong_pin)
        assert declined["response_code"] != "00"

        # Stand-in: billing stopped, payments approved and queued ...
        gateway = _gateway(net)
        await net.services["billing"].stop()
        await wait_for(lambda: not gateway.billing.available)
        standin = [
            ("PLN-1005", 330_000, BUDI.pan, BUDI.pin),
            ("PLN-1010", 412_350, SITI.pan, SITI.pin),
            ("PLN-1007", 158_900, AGUS.pan, AGUS.pin),
        ]
        for bill, amount, pan, pin in standin:
            body = await _pay(net, bill, amount, pan, pin)
            assert body["response_code"] == "00", body
            assert body["approval_code"].startswith("SI"), body
        assert await _saf_depth(gateway) == len(standin)

        # ... then billing back: the queue drains.
        old = net.services["billing"]
        port = net.ports["billing"].iso
        billing = BillingService(
            old.settings.model_copy(update={"billing_iso_port": port}), net.keys
        )
        await nursery.start(billing.run)
        net.services["billing"] = billing  # net.stop() stops this one
        with trio.fail_after(30):
            while await _saf_depth(gateway) != 0:
                await trio.sleep(0.2)

        assert _hits_in_files(data_dir) == []  # WAL files still there while running
        # The search does find what is stored: the masked PAN of the journal.
        journal = b"".join(p.read_bytes() for p in data_dir.glob("gateway.db*"))
        assert mask_pan(BUDI.pan).encode() in journal
    finally:
        await net.stop()
        configure_logging("warning", "json")

    assert _hits_in_files(data_dir) == []  # and after the checkpoint at close
    lines = log.getvalue().splitlines()
    assert len(lines) > 20  # the capture worked
    assert sum('"standin_approved"' in line for line in lines) == len(PANS)  # masked PANs here
    for pan in PANS:
        hits = [line for line in lines if pan in line]
        assert hits == [], hits[:3]
