"""The whole network on PostgreSQL: the three databases share one, as in a deployment.

Runs when ``PAYLAB_TEST_POSTGRES_URL`` is set (CI sets it). It proves the per-service
alembic version tables coexist and that a payment posts exactly once on PostgreSQL.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import trio
from sqlalchemy import MetaData

from billing.service import BillingService
from shared.store.db import make_engine
from tests.support import DEMO_PAN, DEMO_PIN, start_network

POSTGRES_URL = os.environ.get("PAYLAB_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="PAYLAB_TEST_POSTGRES_URL is not set")


def drop_everything(url: str) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            existing = MetaData()
            existing.reflect(conn)
            existing.drop_all(conn)
    finally:
        engine.dispose()


async def test_payment_on_postgres(tmp_path: Path, nursery: trio.Nursery) -> None:
    assert POSTGRES_URL is not None
    drop_everything(POSTGRES_URL)
    net = await start_network(
        nursery,
        tmp_path,
        billing_db_url=POSTGRES_URL,
        gateway_db_url=POSTGRES_URL,
        acquirer_db_url=POSTGRES_URL,
    )
    api = f"http://127.0.0.1:{net.ports['acquirer'].http}"
    async with httpx.AsyncClient(timeout=15) as client:
        body = {"bill": "PLN-0001", "amount": 150000, "pan": DEMO_PAN, "pin": DEMO_PIN}
        first = (await client.post(api + "/payments", json=body)).json()
        second = (await client.post(api + "/payments", json=body)).json()
    assert first["response_code"] == "00"
    assert second["response_code"] == "88"
    billing = net.services["billing"]
    assert isinstance(billing, BillingService) and billing.store is not None
    assert await trio.to_thread.run_sync(billing.store.postings_count, "PLN-0001") == 1
    await net.stop()
    engine = make_engine(POSTGRES_URL)
    try:
        meta = MetaData()
        meta.reflect(engine)
        versions = {t for t in meta.tables if t.startswith("alembic_version")}
    finally:
        engine.dispose()
    assert versions == {
        "alembic_version_billing",
        "alembic_version_gateway",
        "alembic_version_acquirer",
    }
