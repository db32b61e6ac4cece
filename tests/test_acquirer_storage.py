"""The acquirer under hostile bodies and a failing database: a clean answer every time.

* Bodies are strict: an amount is a JSON integer (not a string, a float or a boolean), a
  PIN is ASCII digits; anything else is a 422 naming the field, and nothing is sent.
* A full disk (SQLite's own "database or disk is full", from a page limit) or an injected
  database outage gives 503 with a JSON message and ``Retry-After``, never a 500, and
  ``/health`` says the database is failing; with the disk back, payments are approved.
* On an ISO listener, a storage failure while dispatching is a 91.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from sqlalchemy import event

from acquirer.service import AcquirerService
from acquirer.store import TransactionStore
from shared.iso.codes import RC
from shared.iso.messages import Message, make_response
from shared.lab.network import Network
from shared.server.service import IsoFrame, IsoService
from tests.support import (
    DEMO_PAN,
    DEMO_PIN,
    RawIsoClient,
    lab_settings,
    start_network,
    terminal_builder,
)


def _api(net: Network) -> str:
    return f"http://127.0.0.1:{net.ports['acquirer'].http}"


async def _post(net: Network, path: str, body: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=15) as client:
        if isinstance(body, bytes):
            return await client.post(
                _api(net) + path, content=body, headers={"content-type": "application/json"}
            )
        return await client.post(_api(net) + path, json=body)


async def _health(net: Network) -> httpx.Response:
    async with httpx.AsyncClient(timeout=15) as client:
        return await client.get(_api(net) + "/health")


async def _until_ready(net: Network, timeout: float = 10.0) -> None:
    """Wait until the acquirer's /health answers 200 (its links up, its database fine)."""
    with trio.fail_after(timeout):
        while (await _health(net)).status_code != 200:
            await trio.sleep(0.05)


def _gateway_requests(net: Network) -> float:
    registry = net.services["gateway"].metrics.registry
    return sum(
        registry.get_sample_value("paylab_iso_requests_total", {"mti": "0200", "code": c}) or 0
        for c in ("00", "05", "13", "14", "25", "30", "55", "63", "65", "88", "91", "96")
    )


def _payment(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"bill": "PLN-0002", "amount": 275050, "pan": DEMO_PAN, "pin": DEMO_PIN}
    body.update(changes)
    return body


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_payment(amount="275050"), "amount"),
        (_payment(amount=True), "amount"),
        (_payment(amount=275050.0), "amount"),
        (_payment(amount=-1), "amount"),
        (_payment(pin="\u0661\u0662\u0663\u0664"), "pin"),  # Arabic-Indic digits
        (_payment(pin="\uff11\uff12\uff13\uff14"), "pin"),  # full-width digits
        (_payment(pin=1234), "pin"),
        (_payment(pan=4761739001010010), "pan"),
        (_payment(bill=["PLN-0002"]), "bill"),
    ],
)
async def test_payment_bodies_are_strict(
    network: Network, body: dict[str, Any], field: str
) -> None:
    sent = _gateway_requests(network)
    r = await _post(network, "/payments", body)
    assert r.status_code == 422, r.text
    answer = r.json()
    assert answer["fields"] == [field]
    assert field in answer["error"]
    assert [d["field"] for d in answer["details"]] == [field]
    assert _gateway_requests(network) == sent  # nothing went out


async def test_a_body_that_is_not_an_object_is_a_422(network: Network) -> None:
    for raw in (b"[1, 2]", b'"pay"', b"12"):
        r = await _post(network, "/payments", raw)
        assert r.status_code == 422, r.text
        assert r.json()["error"] == "request body must be a JSON object"


def _full_disk(service: AcquirerService) -> Any:
    """Cap the acquirer's SQLite file at its current size: SQLite's own SQLITE_FULL
    ("database or disk is full") as soon as a write needs one more page."""
    engine = service.engine
    assert engine is not None

    def cap(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        pages = dbapi_connection.execute("PRAGMA page_count").fetchone()[0]
        dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")

    event.listen(engine, "connect", cap)
    engine.dispose()  # every connection from now on is capped
    return cap


async def test_full_disk_is_a_503_with_retry_after_and_health_says_so(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    net = await start_network(nursery, tmp_path, db_failure_hold=1.0)
    try:
        acquirer = net.services["acquirer"]
        assert isinstance(acquirer, AcquirerService)
        await _until_ready(net)
        cap = _full_disk(acquirer)
        # Inquiries until the file has no room left (a few dozen rows at most).
        unavailable = None
        for _ in range(300):
            r = await _post(net, "/inquiries", {"bill": "PLN-0002"})
            assert r.status_code in (200, 503), r.text
            if r.status_code == 503:
                unavailable = r
                break
            if r.json().get("recorded") is False:  # the answer came, its record did not
                assert r.json()["response_code"] == "00"
        assert unavailable is not None, "the capped database never filled up"
        assert unavailable.headers["retry-after"] == "5"
        assert unavailable.headers["content-type"] == "application/json"
        assert "storage unavailable" in unavailable.json()["error"]
        # A payment is refused the same way, before anything is sent.
        sent = _gateway_requests(net)
        paid = await _post(net, "/payments", _payment())
        assert paid.status_code == 503 and paid.headers["retry-after"] == "5"
        assert _gateway_requests(net) == sent
        health = await _health(net)
        assert health.status_code == 503
        database = health.json()["dependencies"]["database"]
        assert database["ok"] is False
        assert "full" in database["detail"], database

        # The disk is back: payments are approved and /health is ready again.
        event.remove(acquirer.engine, "connect", cap)
        assert acquirer.engine is not None
        acquirer.engine.dispose()
        ok = await _post(net, "/payments", _payment())
        assert ok.status_code == 200, ok.text
        assert ok.json()["response_code"] == "00"
        await _until_ready(net)
    finally:
        await net.stop()


async def test_database_outage_fails_the_write_probe_and_answers_503(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    net = await start_network(nursery, tmp_path, db_failure_hold=0.5)
    try:
        acquirer = net.services["acquirer"]
        await _until_ready(net)
        acquirer.db_fault.set_down(True)  # every statement fails, as with a lost database
        health = await _health(net)
        assert health.status_code == 503
        assert "not writable" in health.json()["dependencies"]["database"]["detail"]
        r = await _post(net, "/payments", _payment(bill="PLN-0003", amount=98500))
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        async with httpx.AsyncClient(timeout=15) as client:
            got = await client.get(_api(net) + "/transactions/" + "0" * 32)
        assert got.status_code == 503, got.text
        acquirer.db_fault.set_down(False)
        await _until_ready(net)
        assert (await _post(net, "/inquiries", {"bill": "PLN-0002"})).status_code == 200
    finally:
        await net.stop()


class _RecordingService(IsoService):
    """An ISO listener that records each request before answering it (as a terminal
    pass-through that records would), on the acquirer's real schema."""

    name = "acquirer"
    migrations = "acquirer:migrations"
    request_mtis = ("0200",)

    async def dispatch(self, frame: IsoFrame, peer: str) -> Message:
        assert self.sessions is not None
        store = TransactionStore(self.sessions)
        await self.in_db_thread(store.open, "inquiry", frame.msg, None)
        return make_response(frame.msg, RC.APPROVED)


async def test_a_storage_failure_on_an_iso_listener_is_a_91(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    service = _RecordingService(lab_settings(tmp_path))
    ports = await nursery.start(service.run)
    try:
        client = await RawIsoClient.connect(ports.iso)
        builder = terminal_builder("STORTERM")
        assert (await client.roundtrip(builder.inquiry("PLN-0002")))["39"] == "00"
        service.db_fault.set_down(True)
        assert (await client.roundtrip(builder.inquiry("PLN-0002")))["39"] == "91"
        assert service.metrics.registry.get_sample_value("paylab_iso_handler_errors_total") == 0
        service.db_fault.set_down(False)
        assert (await client.roundtrip(builder.inquiry("PLN-0002")))["39"] == "00"
        await client.aclose()
    finally:
        await service.stop()
