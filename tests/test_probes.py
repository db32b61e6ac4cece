"""The orchestrator's probes on every service: ``/livez`` (the process answers) and
``/readyz`` (the service itself can work: its database), open without a token, and
independent of the upstream links."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import trio

from tests.support import admin_headers, start_network

SERVICES = ("acquirer", "gateway", "billing", "hsm")


async def test_livez_and_readyz(tmp_path: Path, nursery: trio.Nursery) -> None:
    net = await start_network(nursery, tmp_path / "var")
    try:
        async with httpx.AsyncClient(timeout=10) as client:

            def url(name: str, path: str) -> str:
                return f"http://127.0.0.1:{net.ports[name].http}{path}"

            for name in SERVICES:
                live = await client.get(url(name, "/livez"))
                assert (live.status_code, live.json()["live"]) == (200, True), name
                ready = await client.get(url(name, "/readyz"))
                assert ready.status_code == 200, (name, ready.text)
                assert ready.json() == {"service": name, "ready": True, "failing": {}}

            # The gateway's own database down: not ready (503), still alive.
            down = await client.post(
                url("gateway", "/faults/database"), json={"down": True}, headers=admin_headers()
            )
            assert down.status_code == 200, down.text
            ready = await client.get(url("gateway", "/readyz"))
            assert ready.status_code == 503
            assert set(ready.json()["failing"]) == {"database"}
            assert (await client.get(url("gateway", "/livez"))).status_code == 200
            await client.post(
                url("gateway", "/faults/database"), json={"down": False}, headers=admin_headers()
            )
            assert (await client.get(url("gateway", "/readyz"))).status_code == 200

            # An upstream down (the HSM stopped) leaves billing ready: every replica would
            # be in the same state, and taking them all out of the Service helps nobody.
            await net.services["hsm"].stop()

            async def hsm_link_down() -> bool:
                health = await client.get(url("billing", "/health"))
                return health.status_code == 503

            await wait_for_async(hsm_link_down)
            assert (await client.get(url("billing", "/readyz"))).status_code == 200
            assert (await client.get(url("billing", "/livez"))).status_code == 200
    finally:
        await net.stop()


async def wait_for_async(predicate: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.05)
