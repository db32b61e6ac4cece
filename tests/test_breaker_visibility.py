"""Every breaker of every service is visible and operable: ``paylab breaker status`` reads
them all (the acquirer's towards the gateway, the gateway's towards billing and the HSM,
billing's towards the HSM), and ``paylab breaker open|reset|disable`` act on any of them,
by ``service/upstream`` or by upstream name (every breaker towards it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from shared.cli.breaker import match_breakers
from shared.lab.network import Network
from shared.resilience.breaker import BreakerState

FOUR = ["acquirer/gateway", "billing/hsm", "gateway/billing", "gateway/hsm"]


def test_match_breakers_by_id_or_upstream_name() -> None:
    items = [
        {"service": "acquirer", "name": "gateway"},
        {"service": "gateway", "name": "billing"},
        {"service": "gateway", "name": "hsm"},
        {"service": "billing", "name": "hsm"},
        {"name": "legacy"},  # an older gateway's answer, without "service"
    ]
    ids = lambda found: [f"{b.get('service')}/{b['name']}" for b in found]  # noqa: E731
    assert ids(match_breakers(items, "hsm")) == ["gateway/hsm", "billing/hsm"]
    assert ids(match_breakers(items, "billing/hsm")) == ["billing/hsm"]
    assert ids(match_breakers(items, "gateway")) == ["acquirer/gateway"]
    assert match_breakers(items, "gateway/legacy") == [{"name": "legacy"}]
    assert match_breakers(items, "nosuch") == []


async def _cli(net: Network, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``paylab ARGS`` in a process of its own, its settings pointing at ``net``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAYLAB_", "FORCE_COLOR"))}
    env.update({"NO_COLOR": "1", "COLUMNS": "200", "PAYLAB_HOST": "127.0.0.1"})
    for name, ports in net.ports.items():
        env[f"PAYLAB_{name.upper()}_HTTP_PORT"] = str(ports.http)
    with trio.fail_after(30):
        return await trio.run_process(
            [sys.executable, "-m", "shared.cli", *args],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def _states(net: Network) -> dict[str, BreakerState]:
    return {
        f"{svc.name}/{link.name}": link.breaker.state
        for svc in net.services.values()
        for link in svc.links
    }


async def test_breaker_status_and_actions_cover_every_service(
    network: Network, tmp_path: Path
) -> None:
    r = await _cli(network, "breaker", "status", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    ids = sorted(f"{b['service']}/{b['name']}" for b in data["breakers"])
    assert ids == FOUR
    assert data["errors"] == {}
    assert all(b["state"] == "closed" for b in data["breakers"])

    # A bare upstream name acts on every breaker towards it: both HSM breakers.
    r = await _cli(network, "breaker", "open", "hsm")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "gateway/hsm" in out and "billing/hsm" in out and "forced_open" in out
    states = _states(network)
    assert states["gateway/hsm"] is states["billing/hsm"] is BreakerState.FORCED_OPEN
    assert states["gateway/billing"] is BreakerState.CLOSED
    r = await _cli(network, "breaker", "reset", "hsm")
    assert r.returncode == 0, r.stderr
    assert _states(network)["billing/hsm"] is BreakerState.CLOSED

    # The acquirer's own breaker, by its full name: a payment is refused at once (503).
    r = await _cli(network, "breaker", "open", "acquirer/gateway")
    assert r.returncode == 0, r.stderr
    assert _states(network)["acquirer/gateway"] is BreakerState.FORCED_OPEN
    api = f"http://127.0.0.1:{network.ports['acquirer'].http}"
    async with httpx.AsyncClient(timeout=10) as client:
        refused = await client.post(api + "/inquiries", json={"bill": "PLN-0002"})
        assert refused.status_code == 503 and refused.json()["response_code"] == "91"
        r = await _cli(network, "breaker", "status")
        assert r.returncode == 0, r.stderr
        line = next(x for x in r.stdout.decode().splitlines() if "acquirer/gateway" in x)
        assert "forced_open" in line and "until reset" in line
        r = await _cli(network, "breaker", "reset", "gateway")  # the breaker towards it
        assert r.returncode == 0, r.stderr
        assert _states(network)["acquirer/gateway"] is BreakerState.CLOSED
        ok = await client.post(api + "/inquiries", json={"bill": "PLN-0002"})
        assert ok.status_code == 200 and ok.json()["response_code"] == "00"

    r = await _cli(network, "breaker", "disable", "billing/nosuch")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "billing/nosuch" in err and "gateway/billing" in err and "Traceback" not in err
    assert set(_states(network).values()) == {BreakerState.CLOSED}
