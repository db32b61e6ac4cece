"""The browser console on the gateway's HTTP port: its JSON answers over real sockets, and
the page itself in a real headless Chromium after a payment (the four services, the
transaction, its ladder); a screenshot is kept under the test's temporary directory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from billing.demo_data import DEMO_CARDS
from shared.lab.network import Network
from tests.support import admin_headers

BUDI = next(card for card in DEMO_CARDS if card.name == "Budi Santoso")
PANS = [card.pan for card in DEMO_CARDS]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


async def _pay(net: Network) -> dict[str, Any]:
    url = f"http://127.0.0.1:{net.ports['acquirer'].http}/payments"
    body = {"bill": "PLN-0001", "amount": 150_000, "pan": BUDI.pan, "pin": BUDI.pin}
    async with httpx.AsyncClient(timeout=20) as client:
        r = await client.post(url, json=body)
    data: dict[str, Any] = r.json()
    assert data["response_code"] == "00", data
    return data


async def test_console_answers(network: Network) -> None:
    paid = await _pay(network)
    base = f"http://127.0.0.1:{network.ports['gateway'].http}"
    async with httpx.AsyncClient(base_url=base, timeout=20) as client:
        page = await client.get("/console")
        assert page.status_code == 200 and "paylab console" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        script = await client.get("/console/app.js")
        assert script.status_code == 200 and "showTrace" in script.text
        assert (await client.get("/console/nothing")).status_code == 404
        assert (await client.get("/console/api/view")).status_code == 401
        read = admin_headers(role="read")
        view = (await client.get("/console/api/view", headers=read)).json()
        assert view["services"] == {s: True for s in ("acquirer", "gateway", "billing", "hsm")}
        assert any(t["rrn"] == paid["rrn"] for t in view["transactions"])
        trace = await client.get("/console/api/trace", params={"rrn": paid["rrn"]}, headers=read)
        assert trace.status_code == 200
        arrows = trace.json()["arrows"]
        assert [(a["from"], a["to"]) for a in arrows][:3] == [
            ("terminal", "acquirer"),
            ("acquirer", "gateway"),
            ("gateway", "hsm"),
        ]
        assert not any(pan in trace.text or pan in str(view) for pan in PANS)
        bad = await client.get("/console/api/trace", params={"rrn": "<x>"}, headers=read)
        assert bad.status_code == 400


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
async def test_console_in_a_real_browser(network: Network, tmp_path: Path) -> None:
    paid = await _pay(network)
    assert CHROMIUM is not None
    url = f"http://127.0.0.1:{network.ports['gateway'].http}/console?rrn={paid['rrn']}"
    shot = tmp_path / "console.png"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--virtual-time-budget=8000",
        "--window-size=1280,1400",
    ]
    with tempfile.TemporaryDirectory(prefix="paylab-chromium-") as profile:
        with trio.fail_after(120):
            dom = await trio.run_process(
                [CHROMIUM, *flags, f"--user-data-dir={profile}", "--dump-dom", url],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    html = dom.stdout.decode("utf-8", "replace")
    assert dom.returncode == 0, dom.stderr.decode()[-2000:]
    assert 'data-loaded="yes"' in html, html[:3000]
    for service in ("acquirer", "gateway", "billing", "hsm"):
        assert f'class="box up" data-service="{service}"' in html, service
    assert f'data-rrn="{paid["rrn"]}"' in html
    assert 'data-from="acquirer" data-to="gateway" data-code="0200"' in html
    assert 'data-from="gateway" data-to="hsm" data-code="M8"' in html
    assert 'data-from="billing" data-to="gateway" data-code="0210"' in html
    assert not any(pan in html for pan in PANS)
    with tempfile.TemporaryDirectory(prefix="paylab-chromium-") as profile:
        with trio.fail_after(120):
            done = await trio.run_process(
                [CHROMIUM, *flags, f"--user-data-dir={profile}", f"--screenshot={shot}", url],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert done.returncode == 0 and shot.stat().st_size > 10_000
    print(f"console screenshot: {shot}")
