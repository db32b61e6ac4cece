"""Fault injection end to end: a network with chaos proxies between its services, real
sockets on 127.0.0.1 (ephemeral ports), real SQLite; the CLI as a real subprocess.

Every wait is on a condition with a deadline; timings are only ever lower bounds (an
injected latency must show in the round trip), never speed requirements.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from billing.models import Posting
from gateway.service import GatewayService
from shared.iso.messages import Message, idempotency_key
from shared.lab.chaos.controller import ChaosController
from shared.lab.chaos.faults import Faults
from shared.lab.chaos.flood import flood
from shared.lab.chaos.proxy import ChaosProxy
from shared.lab.network import Network
from shared.resilience.breaker import BreakerState
from shared.store.db import make_engine
from tests.support import (
    DEMO_PAN,
    DEMO_PIN,
    RawIsoClient,
    admin_headers,
    lab_settings,
    terminal_builder,
    wait_for,
)

#: Lab timings: heartbeats every half second, a short open period, quick reconnects.
CHAOS: dict[str, Any] = {
    "heartbeat_interval": 0.5,
    "heartbeat_timeout": 0.5,
    "breaker_open_wait": 1.0,
    "retry_base_delay": 0.05,
    "retry_max_delay": 0.1,
    "reconnect_base_delay": 0.05,
    "reconnect_max_delay": 0.2,
    "connect_timeout": 0.5,
    "billing_timeout": 1.0,
    "pool_min_connections": 2,
    "rate_limit_terminal": 0,
    # /health reports a failed database call for this long after it (default 10 s).
    "db_failure_hold": 0.5,
}
#: Demo bills still open in a fresh database, with their amounts.
BILLS = {
    "PLN-1001": 125_000,
    "PLN-1002": 98_500,
    "PLN-1003": 212_750,
    "PLN-1004": 64_300,
    "PLN-1005": 330_000,
    "PLN-1006": 47_500,
}


async def start(nursery: trio.Nursery, data_dir: Path, **overrides: Any) -> Network:
    net = Network(lab_settings(data_dir, **{**CHAOS, **overrides}), chaos=True)
    await nursery.start(net.run)
    gateway = gateway_of(net)
    await wait_for(
        lambda: gateway.billing.pool.healthy_count == gateway.billing.pool.target_connections()
    )
    return net


@pytest.fixture
async def net(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Network]:
    network = await start(nursery, tmp_path)
    yield network
    with trio.fail_after(20):
        await network.stop()


def gateway_of(net: Network) -> GatewayService:
    gateway = net.services["gateway"]
    assert isinstance(gateway, GatewayService)
    return gateway


def chaos(net: Network) -> ChaosController:
    assert net.chaos is not None
    return net.chaos


def proxy(net: Network, link: str) -> ChaosProxy:
    return chaos(net).proxies[link]


def pay(bill: str, terminal: str = "CHAOS001") -> Message:
    return terminal_builder(terminal).payment(bill, BILLS[bill], DEMO_PAN, DEMO_PIN)


def postings(net: Network) -> list[tuple[str, str, str]]:
    """(idempotency key, source, status) of every posting in billing's database."""
    engine = make_engine(net.settings.db_url("billing"))
    try:
        with engine.connect() as conn:
            rows = conn.execute(Posting.__table__.select().order_by(Posting.id)).mappings()
            return [(r["idempotency_key"], r["source"], r["status"]) for r in rows]
    finally:
        engine.dispose()


async def saf_depth(gateway: GatewayService) -> int:
    saf = gateway.saf
    assert saf is not None
    stats = await gateway.in_db_thread(lambda: saf.stats(now=datetime.now(UTC)))
    return stats.depth


async def wait_saf_drained(gateway: GatewayService, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while await saf_depth(gateway):
            await trio.sleep(0.05)


def is_standin(answer: Message) -> bool:
    return answer["39"] == "00" and answer.get("38", "").startswith("SI")


def sample(registry: Any, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


# -- the proxies in the network ------------------------------------------------------------


async def test_services_are_wired_through_the_proxies(net: Network) -> None:
    views = {v["name"]: v for v in chaos(net).status()}
    assert set(views) == {"gateway", "billing", "hsm"}
    for name, view in views.items():
        assert view["target"] == f"127.0.0.1:{net.ports[name].iso}"
        assert view["connections"] > 0  # the next service's pool connected through it
    assert net.settings.chaos_http_port == 0 and net.chaos_port
    # an approval crosses gateway (client), hsm and billing proxies
    client = await RawIsoClient.connect(proxy(net, "gateway").port)
    assert (await client.roundtrip(pay("PLN-1001")))["39"] == "00"
    await client.aclose()
    for name in ("gateway", "billing", "hsm"):
        assert proxy(net, name).bytes_up > 0 and proxy(net, name).bytes_down > 0


async def test_latency_shows_in_the_round_trip_and_is_gone_after_heal(net: Network) -> None:
    client = await RawIsoClient.connect(proxy(net, "gateway").port)
    builder = terminal_builder("LATENCY1")
    assert (await client.roundtrip(builder.inquiry("PLN-0001")))["39"] == "00"
    chaos(net).set("gateway", {"latency": "200ms"})
    started = trio.current_time()
    assert (await client.roundtrip(builder.inquiry("PLN-0001")))["39"] == "00"
    # the request and the answer are each held 200 ms
    assert trio.current_time() - started >= 0.4
    chaos(net).heal("gateway")
    assert proxy(net, "gateway").faults == Faults()
    assert (await client.roundtrip(builder.inquiry("PLN-0001")))["39"] == "00"
    await client.aclose()


async def test_partition_of_billing_stands_in_and_heal_drains_each_payment_once(
    net: Network,
) -> None:
    gateway = gateway_of(net)
    link = gateway.billing
    client = await RawIsoClient.connect(net.ports["gateway"].iso)
    online = await client.roundtrip(pay("PLN-1001"))
    assert online["39"] == "00" and not is_standin(online)

    chaos(net).partition("billing")
    assert proxy(net, "billing").view()["partitioned"]
    # Heartbeats go unanswered: the pool drops its connections, and reconnects meet a
    # silent link (sign-on unanswered), so billing is unavailable.
    await wait_for(lambda: not link.available, timeout=10)
    # Calls that find no connection are breaker failures: an inquiry opens it.
    answer = await client.roundtrip(terminal_builder("CHAOS001").inquiry("PLN-1002"))
    assert answer["39"] == "91"
    assert link.breaker.state is BreakerState.OPEN

    standins = [pay(bill) for bill in ("PLN-1002", "PLN-1003", "PLN-1004")]
    for request in standins:
        assert is_standin(await client.roundtrip(request))
    assert await saf_depth(gateway) == 3
    assert proxy(net, "billing").bytes_dropped > 0

    chaos(net).heal("billing")
    await wait_for(lambda: link.breaker.state is BreakerState.CLOSED and link.available, 15)
    await wait_saf_drained(gateway)
    posted = postings(net)
    keys = [k for k, _source, _status in posted]
    assert len(keys) == len(set(keys)) == 4  # each payment posted exactly once
    advices = {k for k, source, _ in posted if source == "advice"}
    assert advices == {idempotency_key(r) for r in standins}
    assert (await client.roundtrip(pay("PLN-1005")))["39"] == "00"
    await client.aclose()


async def test_reset_fault_resets_connections_and_the_pool_reconnects(net: Network) -> None:
    gateway = gateway_of(net)
    billing = proxy(net, "billing")
    before = billing.connections_total
    chaos(net).set("billing", {"reset": 1.0})
    # The next heartbeat on each connection is reset.
    await wait_for(lambda: billing.resets >= 2, timeout=10)
    assert sample(chaos(net).metrics.registry, "paylab_chaos_resets_total", link="billing") >= 2
    chaos(net).heal("billing")
    pool = gateway.billing.pool
    # The pool notices a reset when its reader sees it: until then a reset connection can
    # still count as healthy, so wait for the replacements, not only for the count.
    await wait_for(
        lambda: (
            billing.connections_total > before and pool.healthy_count == pool.target_connections()
        ),
        timeout=10,
    )
    client = await RawIsoClient.connect(net.ports["gateway"].iso)
    assert (await client.roundtrip(pay("PLN-1001")))["39"] == "00"
    await client.aclose()


async def test_close_after_closes_the_connection_at_the_mark(net: Network) -> None:
    gw = proxy(net, "gateway")
    chaos(net).set("gateway", {"close_after": 20})
    closes = gw.closes
    client = await RawIsoClient.connect(gw.port)
    await client.send(terminal_builder("CLOSER01").inquiry("PLN-0001"))
    assert await client.is_closed_by_peer(timeout=5)
    assert gw.closes > closes
    chaos(net).heal("gateway")
    client = await RawIsoClient.connect(gw.port)
    assert (await client.roundtrip(terminal_builder("CLOSER01").inquiry("PLN-0001")))["39"] == "00"
    await client.aclose()


async def test_a_target_that_is_down_closes_the_client_at_once(nursery: trio.Nursery) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    down = ChaosProxy("down", ("127.0.0.1", port))
    await nursery.start(down.run)
    client = await RawIsoClient.connect(down.port)
    assert await client.is_closed_by_peer(timeout=5)
    assert down.closes == 1 and down.view()["connections"] == 0
    await down.close()


# -- database faults -----------------------------------------------------------------------


async def test_billing_database_down_gives_91_keeps_the_breaker_closed_and_recovers_at_once(
    net: Network,
) -> None:
    gateway = gateway_of(net)
    link = gateway.billing
    s = net.settings
    assert (s.retry_max_attempts, s.breaker_consecutive_failures) == (3, 5)  # the defaults
    client = await RawIsoClient.connect(net.ports["gateway"].iso)
    chaos(net).database("billing", True)
    assert chaos(net).database_view()["billing"]["down"] is True

    # Billing answers 91 (it cannot post); the gateway retries 91 (3 attempts) and passes the
    # 91 on: billing answered, so nothing is stood in for. Every answer is a success for the
    # link: the breaker stays closed however many 91s come back.
    first_request = pay("PLN-1001")
    first = await client.roundtrip(first_request)
    assert first["39"] == "91" and "38" not in first
    second_request = pay("PLN-1002")
    second = await client.roundtrip(second_request)
    assert second["39"] == "91" and not is_standin(second)
    assert link.breaker.state is BreakerState.CLOSED
    answers = gateway.metrics.registry
    assert sample(answers, "paylab_upstream_retries_total", upstream="billing", reason="rc_91") >= 4
    opened = sample(
        answers, "paylab_breaker_transitions_total", upstream="billing", to_state="open"
    )
    assert opened == 0
    assert await saf_depth(gateway) == 0

    chaos(net).database("billing", False)
    third_request = pay("PLN-1003")
    third = await client.roundtrip(third_request)  # at once: no breaker to wait for
    assert third["39"] == "00" and not is_standin(third)
    await client.aclose()
    posted = postings(net)
    keys = [k for k, _, _ in posted]
    assert keys == [idempotency_key(third_request)]  # the 91s posted nothing


async def test_service_fault_endpoint_switches_its_own_database(net: Network) -> None:
    url = f"http://127.0.0.1:{net.ports['billing'].http}"
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        read, op = admin_headers(role="read"), admin_headers()
        assert (await http.get("/faults", headers=read)).json() == {
            "database": {"down": False, "refused": 0}
        }
        assert (
            await http.post("/faults/database", json={"down": True}, headers=read)
        ).status_code == 403
        bad = await http.post("/faults/database", json={"down": "yes"}, headers=op)
        assert bad.status_code == 400 and "down" in bad.json()["error"]
        r = await http.post("/faults/database", json={"down": True}, headers=op)
        assert r.json()["database"]["down"] is True
        health = await http.get("/health")
        assert health.status_code == 503
        assert health.json()["dependencies"]["database"]["ok"] is False
        await http.post("/faults/database", json={"down": False}, headers=op)
        # Ready again once the failures seen while down are older than db_failure_hold.
        with trio.fail_after(5):
            while (await http.get("/health")).status_code != 200:
                await trio.sleep(0.05)


# -- floods --------------------------------------------------------------------------------


async def test_flood_of_300_connections_is_capped_and_a_payment_still_passes(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    # The flood comes from 127.0.0.2 so the per-source cap holds it and not the payer.
    net = await start(nursery, tmp_path, max_connections_per_source=50, idle_timeout=1.5)
    gateway = gateway_of(net)
    try:
        result = chaos(net).start_flood("gateway", 300, 5.0, source="127.0.0.2")
        await wait_for(lambda: result.opened + result.refused == 300, timeout=20)
        client = await RawIsoClient.connect(net.ports["gateway"].iso)
        assert (await client.roundtrip(pay("PLN-1001")))["39"] == "00"
        await client.aclose()
        await wait_for(lambda: not result.running, timeout=20)
        assert result.opened + result.refused == 300
        refused = gateway.metrics.connections_refused.labels("per_source")._value.get()
        idle = gateway.metrics.connections_timed_out.labels("idle")._value.get()
        # Beyond the cap of 50 at a time, connections were closed at accept; the held ones
        # sent nothing and were closed as idle (which freed room for more of the flood).
        assert refused >= 1 and idle >= 1
        assert refused + idle >= 300 - 50
        assert result.closed_by_server >= refused
        assert chaos(net).view()["flood"]["running"] is False
    finally:
        with trio.fail_after(20):
            await net.stop()


async def test_flood_against_nothing_counts_refusals() -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    result = await flood("127.0.0.1", port, 5, 0.5)
    assert (result.opened, result.refused, result.running) == (0, 5, False)


# -- the HTTP API and the CLI --------------------------------------------------------------


async def test_http_api_auth_validation_and_actions(net: Network) -> None:
    url = f"http://127.0.0.1:{net.chaos_port}"
    read, op = admin_headers(role="read"), admin_headers()
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        assert (await http.get("/chaos")).status_code == 401
        status = (await http.get("/chaos", headers=read)).json()
        assert {v["name"] for v in status["links"]} == {"gateway", "billing", "hsm"}
        assert status["database"]["billing"] == {"down": False, "refused": 0}
        assert (await http.post("/chaos/billing", json={}, headers=read)).status_code == 403

        r = await http.post("/chaos/billing", json={"latency": "10ms", "jitter": "5ms"}, headers=op)
        assert r.status_code == 200
        assert r.json()["faults"]["latency"] == pytest.approx(0.01)
        metrics = (await http.get("/metrics", headers=read)).text
        assert 'paylab_chaos_faults_active{link="billing"} 1.0' in metrics

        bad = await http.post("/chaos/billing", json={"latency": "soon"}, headers=op)
        assert bad.status_code == 400 and "duration" in bad.json()["error"]
        bad = await http.post("/chaos/billing", json={"lag": 1}, headers=op)
        assert bad.status_code == 400 and "unknown fault" in bad.json()["error"]
        bad = await http.post("/chaos/billing", content=b"{not json", headers=op)
        assert bad.status_code == 400
        missing = await http.post("/chaos/nowhere", json={}, headers=op)
        assert missing.status_code == 404 and "billing" in missing.json()["error"]
        assert (
            await http.post("/chaos/database/hsm", json={"down": True}, headers=op)
        ).status_code == 404
        assert (await http.post("/chaos/database/billing", json={}, headers=op)).status_code == 400
        bad_flood = await http.post(
            "/chaos/flood", json={"target": "gateway", "connections": 0}, headers=op
        )
        assert bad_flood.status_code == 400
        assert (
            await http.post("/chaos/flood", json={"target": "x"}, headers=op)
        ).status_code == 404

        parted = (await http.post("/chaos/all/partition", headers=op)).json()
        assert len(parted) == 3 and all(v["partitioned"] for v in parted)
        healed = (await http.post("/chaos/all/heal", headers=op)).json()
        assert all(v["faults"] == Faults().as_dict() for v in healed)
        down = await http.post("/chaos/database/billing", json={"down": True}, headers=op)
        assert down.json()["down"] is True
        up = await http.post("/chaos/database/billing", json={"down": False}, headers=op)
        assert up.json()["down"] is False
        started = await http.post(
            "/chaos/flood",
            json={"target": "hsm", "connections": 3, "hold": "100ms", "source": "127.0.0.2"},
            headers=op,
        )
        assert started.status_code == 202 and started.json()["flood"]["connections"] == 3

        async def flood_done() -> bool:
            flood_view = (await http.get("/chaos", headers=read)).json()["flood"]
            return flood_view is not None and not flood_view["running"]

        with trio.fail_after(10):
            while not await flood_done():
                await trio.sleep(0.05)


async def cli(*args: str) -> tuple[int, str, str]:
    done = await trio.run_process(
        [sys.executable, "-m", "shared.cli", "chaos", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_cli_against_a_running_network(net: Network) -> None:
    url = f"http://127.0.0.1:{net.chaos_port}"
    code, out, _ = await cli(
        "set", "billing", "--latency", "20ms", "--bandwidth", "1MB/s", "--url", url
    )
    assert code == 0 and "billing" in out
    assert proxy(net, "billing").faults == Faults(latency=0.02, bandwidth=1_000_000)
    code, out, _ = await cli("status", "--json", "--url", url)
    assert code == 0
    links = {v["name"]: v for v in json.loads(out)["links"]}
    assert links["billing"]["faults"]["bandwidth"] == 1_000_000
    code, out, _ = await cli("status", "--url", url)
    assert code == 0 and "latency 20" in out
    code, _, _ = await cli("partition", "hsm", "--url", url)
    assert code == 0 and proxy(net, "hsm").partitioned
    code, _, _ = await cli("heal", "all", "--url", url)
    assert code == 0 and not any(p.faults.active for p in chaos(net).proxies.values())
    code, out, _ = await cli("database", "billing", "--down", "--url", url)
    assert code == 0 and "DOWN" in out and net.services["billing"].db_fault.down
    code, _, _ = await cli("database", "billing", "--up", "--url", url)
    assert code == 0 and not net.services["billing"].db_fault.down

    code, _, err = await cli("set", "nowhere", "--latency", "1s", "--url", url)
    assert code == 1 and "no link named 'nowhere'" in err and "Traceback" not in err
    code, _, err = await cli("set", "billing", "--blackhole", "2", "--url", url)
    assert code == 1 and "probability" in err
    code, _, err = await cli("status", "--url", url, "--token", "wrong-token-123")
    assert code == 1 and "token" in err
    code, _, err = await cli("status", "--url", "http://127.0.0.1:1")
    assert code == 1 and "cannot reach" in err and len(err.strip().splitlines()) <= 2
