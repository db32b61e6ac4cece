"""Resilience of the upstream links with real sockets on 127.0.0.1: the circuit breaker,
backup endpoints, retries on a lost connection, heartbeats, rate and connection limits,
and the operator's admin API and CLI.

Services run in the test's nursery and are stopped and restarted on the same port when a
scenario needs it; every wait is on a condition with a deadline.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trio
import trio.testing

from billing.service import BillingService
from gateway.service import GatewayService
from shared.iso import codec
from shared.iso.codes import RC
from shared.iso.framing import FrameParser, encode_frame
from shared.iso.messages import NMI_ECHO, NMI_SIGN_ON, Message, make_response, match_key
from shared.lab.network import make_service
from shared.net.iso_link import IsoDialect, decode_iso_keyed
from shared.net.pool import PoolConfig, UpstreamPool
from shared.ops.log import get_logger
from shared.ops.metrics import ServiceMetrics
from shared.resilience.backoff import Backoff
from shared.resilience.breaker import BreakerState
from shared.server.service import Service
from tests.support import (
    DEMO_PAN,
    DEMO_PIN,
    KEYS,
    RawIsoClient,
    admin_headers,
    lab_settings,
    terminal_builder,
    wait_for,
)

S = TypeVar("S", bound=Service)

#: Lab timings: fast heartbeats, a short open period, quick retries and reconnects.
HEARTBEAT = 1.0
OPEN_WAIT = 2.0
RESILIENT: dict[str, Any] = {
    "heartbeat_interval": HEARTBEAT,
    "heartbeat_timeout": 0.5,
    "breaker_open_wait": OPEN_WAIT,
    "breaker_consecutive_failures": 3,
    "retry_max_attempts": 4,
    "retry_base_delay": 0.1,
    "retry_max_delay": 0.4,
    "reconnect_base_delay": 0.05,
    "reconnect_max_delay": 0.2,
    "connect_timeout": 0.5,
    "pool_min_connections": 2,
    "rate_limit_terminal": 0,
    # A payment billing cannot take is declined 91 (no stand-in approval).
    "standin_policy": "decline",
}


# -- a lab: services started one by one, stopped and restarted at will ------------------------


class Lab:
    """Services in the test's nursery; each knows where the ones started before it are."""

    def __init__(self, nursery: trio.Nursery, data_dir: Path) -> None:
        self.nursery = nursery
        self.data_dir = data_dir
        self.settings = lab_settings(data_dir, **RESILIENT)
        self.running: list[Service] = []

    def configure(self, **overrides: Any) -> None:
        """Change the settings of the services started from now on."""
        self.settings = self.settings.model_copy(update=overrides)

    async def start(self, name: str, kind: type[S], **overrides: Any) -> S:
        settings = self.settings.model_copy(update=overrides)
        svc = make_service(name, settings, KEYS)
        assert isinstance(svc, kind)
        await self.nursery.start(svc.run)
        self.running.append(svc)
        assert svc.ports is not None
        if name == "hsm":
            self.configure(hsm_address=f"127.0.0.1:{svc.ports.iso}")
        return svc

    async def hsm(self) -> Service:
        return await self.start("hsm", Service)

    async def billing(self, **overrides: Any) -> BillingService:
        return await self.start("billing", BillingService, **overrides)

    async def gateway(self, billing_port: int, **overrides: Any) -> GatewayService:
        gw = await self.start(
            "gateway", GatewayService, billing_address=f"127.0.0.1:{billing_port}", **overrides
        )
        self.configure(gateway_address=f"127.0.0.1:{iso(gw)}")
        return gw

    async def stop(self, svc: Service) -> None:
        with trio.fail_after(10):
            await svc.stop()
        self.running.remove(svc)

    async def stop_all(self) -> None:
        for svc in reversed(list(self.running)):
            await self.stop(svc)


@pytest.fixture
async def lab(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Lab]:
    lab = Lab(nursery, tmp_path)
    yield lab
    await lab.stop_all()


async def gateway_lab(lab: Lab, **gateway_overrides: Any) -> tuple[BillingService, GatewayService]:
    """HSM, billing and a gateway whose billing pool is fully connected."""
    await lab.hsm()
    billing = await lab.billing()
    gw = await lab.gateway(iso(billing), **gateway_overrides)
    await wait_for(lambda: gw.billing.pool.healthy_count == gw.billing.pool.target_connections())
    return billing, gw


def iso(svc: Service) -> int:
    assert svc.ports is not None
    return svc.ports.iso


def http(svc: Service) -> str:
    assert svc.ports is not None
    return f"http://127.0.0.1:{svc.ports.http}"


def sample(svc: Service, name: str, **labels: str) -> float:
    """A metric's value in ``svc``'s registry (0 when the series does not exist yet)."""
    value = svc.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def transitions(gw: GatewayService, to_state: str) -> float:
    return sample(gw, "paylab_breaker_transitions_total", upstream="billing", to_state=to_state)


def rejected(gw: GatewayService) -> float:
    return sample(gw, "paylab_upstream_rejected_total", upstream="billing", reason="breaker_open")


def retries(gw: GatewayService, reason: str) -> float:
    return sample(gw, "paylab_upstream_retries_total", upstream="billing", reason=reason)


def endpoint_requests(gw: GatewayService, role: str) -> int:
    """Requests the gateway sent to billing's ``role`` endpoint so far (every slot)."""
    return sum(
        c["requests"] for c in gw.billing.pool.view()["connections"] if c["endpoint"] == role
    )


# -- scripted TCP peers ----------------------------------------------------------------------


class TcpServer:
    """A TCP listener on 127.0.0.1 running ``handler`` per connection until :meth:`aclose`."""

    def __init__(self, handler: Callable[[trio.SocketStream], Awaitable[None]]) -> None:
        self._handler = handler
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self.port = 0

    async def start(self, nursery: trio.Nursery, port: int = 0) -> int:
        listeners = await nursery.start(self._run, port)
        self.port = int(listeners[0].socket.getsockname()[1])
        return self.port

    async def _run(self, port: int, *, task_status: trio.TaskStatus[Any]) -> None:
        try:
            with self._scope:
                await trio.serve_tcp(self._handler, port, host="127.0.0.1", task_status=task_status)
        finally:
            self._done.set()

    async def aclose(self) -> None:
        """Stop listening (the port is free again when this returns)."""
        self._scope.cancel()
        with trio.fail_after(5):
            await self._done.wait()


class CountingListener(TcpServer):
    """Accepts and closes at once, noting when (trio clock) each connection came."""

    def __init__(self) -> None:
        super().__init__(self._accept)
        self.accepts: list[float] = []

    async def _accept(self, stream: trio.SocketStream) -> None:
        self.accepts.append(trio.current_time())
        await stream.aclose()


def reset(stream: trio.SocketStream) -> None:
    """Make the coming close a TCP reset (RST), not an orderly FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def approve(request: Message) -> Message:
    return make_response(request, RC.APPROVED, f4="000000150000", f62="PLN|Budi Santoso")


@dataclass
class ScriptedBilling:
    """A billing host speaking ISO-8583 frames: signs on, answers echoes unless told not
    to, and approves every request, except that it can reset the connection carrying the
    first request it sees, or close each connection as soon as it has signed on."""

    answer_echo: bool = True
    reset_first_request: bool = False
    close_after_sign_on: bool = False
    accepts: list[float] = field(default_factory=list)
    closed_by_peer: set[int] = field(default_factory=set)
    requests: list[tuple[int, Message]] = field(default_factory=list)  # (connection, msg)
    echoes_ignored: int = 0

    async def start(self, nursery: trio.Nursery) -> int:
        return await TcpServer(self.serve).start(nursery)

    async def serve(self, stream: trio.SocketStream) -> None:
        number = len(self.accepts)
        self.accepts.append(trio.current_time())
        parser = FrameParser()

        async def send(msg: Message) -> None:
            await stream.send_all(encode_frame(codec.encode(msg)))

        try:
            async for data in stream:
                for frame in parser.frames(data):
                    msg = codec.decode(frame)
                    if msg["t"] == "0800":
                        if msg.get("70") == NMI_ECHO and not self.answer_echo:
                            self.echoes_ignored += 1
                            continue
                        await send(make_response(msg, RC.APPROVED))
                        if msg.get("70") == NMI_SIGN_ON and self.close_after_sign_on:
                            await stream.aclose()
                            return
                        continue
                    self.requests.append((number, msg))
                    if self.reset_first_request and len(self.requests) == 1:
                        reset(stream)
                        await stream.aclose()
                        return
                    await send(approve(msg))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        self.closed_by_peer.add(number)  # an orderly end of stream from the gateway


# -- 1, 2: billing stopped, then back --------------------------------------------------------


async def stop_billing_until_the_breaker_opens(
    lab: Lab, billing: BillingService, gw: GatewayService, client: RawIsoClient
) -> None:
    """Stop billing and send an inquiry: its attempts find no connection, the third
    failure in a row opens the breaker, and the last attempt is refused by it."""
    link = gw.billing
    await lab.stop(billing)
    await wait_for(lambda: not link.connected)
    answer = await client.roundtrip(terminal_builder().inquiry("PLN-0001"))
    assert answer["39"] == RC.ISSUER_INOPERATIVE
    assert link.breaker.state is BreakerState.OPEN
    assert transitions(gw, "open") == 1
    assert retries(gw, "no_connection") == 3  # three attempts found no connection...
    assert rejected(gw) == 1  # ...and the fourth was refused by the open breaker


async def test_stopped_billing_opens_the_breaker_which_fails_fast_and_probes_the_link(
    lab: Lab,
) -> None:
    billing, gw = await gateway_lab(lab)
    link, port = gw.billing, iso(billing)
    client = await RawIsoClient.connect(iso(gw))
    assert (await client.roundtrip(terminal_builder().inquiry("PLN-0001")))["39"] == "00"

    await stop_billing_until_the_breaker_opens(lab, billing, gw, client)
    opened_at = link.breaker.snapshot().opened_at
    assert opened_at is not None
    open_until = opened_at + OPEN_WAIT
    before = rejected(gw)
    start = trio.current_time()
    answer = await client.roundtrip(terminal_builder().inquiry("PLN-0002"))
    elapsed = trio.current_time() - start
    assert answer["39"] == RC.ISSUER_INOPERATIVE
    assert elapsed < RESILIENT["connect_timeout"]  # no waiting for a connection, no retry
    assert rejected(gw) == before + 1
    assert retries(gw, "no_connection") == 3  # unchanged: a refused call is not retried

    # While open, the pool's connection attempts probe billing's port at the reconnect
    # pace, one at a time: a host that hangs up fails each probe, the breaker stays open.
    counting = CountingListener()
    await counting.start(lab.nursery, port)
    await wait_for(lambda: len(counting.accepts) >= 5, timeout=OPEN_WAIT)
    accepts = counting.accepts[:5]
    assert max(accepts) < open_until  # probes came before the open wait was over
    assert link.breaker.state is BreakerState.OPEN
    assert transitions(gw, "half_open") == 0
    # Paced by the reconnect backoff (at most 0.2 s here, jittered, two slots): not a storm.
    assert accepts[-1] - accepts[0] >= 4 * 0.005, accepts
    assert link.breaker.snapshot().probes_failed >= 4
    await counting.aclose()


async def test_billing_back_closes_the_breaker_within_the_reconnect_backoff(
    lab: Lab,
) -> None:
    billing, gw = await gateway_lab(lab)
    link, port = gw.billing, iso(billing)
    client = await RawIsoClient.connect(iso(gw))
    await stop_billing_until_the_breaker_opens(lab, billing, gw, client)
    assert link.breaker.state is BreakerState.OPEN

    await lab.billing(billing_iso_port=port)  # the same port and database as before
    back = trio.current_time()
    await wait_for(
        lambda: link.breaker.state is BreakerState.CLOSED and link.connected,
        timeout=OPEN_WAIT + 2,
    )
    recovered = trio.current_time() - back
    payment = terminal_builder().payment("PLN-0001", 150000, DEMO_PAN, DEMO_PIN)
    answer = await client.roundtrip(payment)
    assert answer["39"] == RC.APPROVED
    # A probe (connect and sign-on) found billing: not the open wait, the reconnect pace.
    assert recovered < OPEN_WAIT / 2, recovered
    assert (transitions(gw, "half_open"), transitions(gw, "closed")) == (1, 1)
    assert transitions(gw, "open") == 1  # the probe succeeded at the first try


# -- 3: primary down, backup up --------------------------------------------------------------


async def test_backup_carries_the_traffic_while_the_primary_is_down_and_gives_it_back(
    lab: Lab, tmp_path: Path
) -> None:
    await lab.hsm()
    primary = await lab.billing(data_dir=tmp_path / "primary")
    backup = await lab.billing(data_dir=tmp_path / "backup")
    primary_port = iso(primary)
    gw = await lab.gateway(
        primary_port,
        billing_backup_address=f"127.0.0.1:{iso(backup)}",
        breaker_consecutive_failures=5,
    )
    pool = gw.billing.pool
    await wait_for(lambda: pool.healthy_count == 4)  # two to each endpoint

    def active() -> str | None:
        return pool.view()["active_endpoint"]

    assert active() == "primary"
    codes: list[str] = []
    stop_sending = trio.Event()

    async def send_inquiries() -> None:
        client = await RawIsoClient.connect(iso(gw))
        builder = terminal_builder("SWITCHTM")
        bills = itertools.cycle(("PLN-0001", "PLN-0002", "PDAM-0001"))
        while not stop_sending.is_set():
            answer = await client.roundtrip(builder.inquiry(next(bills)), timeout=5)
            codes.append(answer["39"])
        await client.aclose()

    async with trio.open_nursery() as senders:
        senders.start_soon(send_inquiries)
        await wait_for(lambda: len(codes) >= 10)
        assert endpoint_requests(gw, "backup") == 0

        await lab.stop(primary)
        await wait_for(lambda: active() == "backup")
        served = len(codes)
        await wait_for(lambda: len(codes) >= served + 20)
        assert endpoint_requests(gw, "backup") >= 20

        primary = await lab.billing(data_dir=tmp_path / "primary", billing_iso_port=primary_port)
        await wait_for(lambda: active() == "primary")
        on_primary = endpoint_requests(gw, "primary")
        on_backup = endpoint_requests(gw, "backup")
        await wait_for(lambda: endpoint_requests(gw, "primary") >= on_primary + 20)
        stop_sending.set()

    assert set(codes) == {"00"}, f"declines during the switch: {codes}"
    assert endpoint_requests(gw, "backup") <= on_backup + 1  # at most one already on its way
    answered = "paylab_iso_requests_total"
    assert sample(backup, answered, mti="0200", code="00") >= 20
    assert sample(primary, answered, mti="0200", code="00") >= 20  # the restarted primary


# -- 4: a connection reset in the middle of an inquiry ---------------------------------------


async def test_connection_reset_mid_inquiry_is_retried_on_another_connection(lab: Lab) -> None:
    fake = ScriptedBilling(reset_first_request=True)
    port = await fake.start(lab.nursery)
    await lab.hsm()
    gw = await lab.gateway(port)
    await wait_for(lambda: gw.billing.pool.healthy_count == 2)

    client = await RawIsoClient.connect(iso(gw))
    answer = await client.roundtrip(terminal_builder().inquiry("PLN-0001"))
    assert (answer["39"], answer["48"]) == ("00", "PLN-0001")
    assert retries(gw, "connection_lost") == 1
    assert sum(retries(gw, r) for r in ("no_connection", "timeout", "rc_91", "rc_96")) == 0
    (first_conn, first), (second_conn, second) = fake.requests
    assert second_conn != first_conn  # resent on the other connection...
    assert match_key(second) == match_key(first)  # ...the very same request
    # The reset connection is replaced.
    await wait_for(lambda: len(fake.accepts) == 3 and gw.billing.pool.healthy_count == 2)


# -- 5: an upstream that stops answering echoes ----------------------------------------------


async def test_unanswered_echo_gets_the_connection_replaced(lab: Lab) -> None:
    fake = ScriptedBilling(answer_echo=False)
    port = await fake.start(lab.nursery)
    await lab.hsm()
    gw = await lab.gateway(
        port, pool_min_connections=1, heartbeat_interval=0.5, heartbeat_timeout=0.5
    )
    pool = gw.billing.pool
    await wait_for(lambda: pool.healthy_count == 1)
    assert len(fake.accepts) == 1

    failures = "paylab_upstream_heartbeat_failures_total"
    await wait_for(lambda: len(fake.accepts) >= 2, timeout=5)
    assert fake.echoes_ignored >= 1
    assert sample(gw, failures, upstream="billing") >= 1
    await wait_for(lambda: 0 in fake.closed_by_peer)  # the gateway hung up the silent one
    await wait_for(lambda: pool.healthy_count == 1)  # and signed on anew


# -- the reconnect delay -----------------------------------------------------------------------


@pytest.mark.parametrize("close_after_sign_on", [False, True], ids=["at-once", "after-sign-on"])
async def test_a_host_that_hangs_up_is_reconnected_after_the_delay_not_at_once(
    nursery: trio.Nursery, close_after_sign_on: bool
) -> None:
    """A peer that accepts and closes (a full listener, one shutting down) must not be
    hammered: every reconnect waits for the reconnect delay."""
    if close_after_sign_on:
        scripted = ScriptedBilling(close_after_sign_on=True)
        port = await scripted.start(nursery)
        accepts = scripted.accepts
    else:
        counting = CountingListener()
        port = await counting.start(nursery)
        accepts = counting.accepts
    delay = 0.3
    pool = UpstreamPool(
        "billing",
        ("127.0.0.1", port),
        decode_iso_keyed,
        IsoDialect(),
        metrics=ServiceMetrics("test"),
        log=get_logger("test"),
        config=PoolConfig(
            min_connections=1,
            max_connections=1,
            connect_timeout=0.5,
            reconnect=Backoff(delay, 2.0, delay, 1, jitter=True),
        ),
        rand=lambda: 0.999,  # the jitter draws (almost) the full delay
    )
    await nursery.start(pool.run)
    try:
        await wait_for(lambda: len(accepts) >= 3, timeout=5)
    finally:
        await pool.close()
    gaps = [b - a for a, b in itertools.pairwise(accepts[:3])]
    assert min(gaps) >= delay * 0.9, gaps


# -- 6: rate limits --------------------------------------------------------------------------

RATE_LIMITS: dict[str, Any] = {
    "rate_limit_terminal": 2,
    "rate_limit_burst": 1,
    "rate_limit_customer_payments": 1,
}


def limited(gw: GatewayService, limit: str) -> float:
    return sample(gw, "paylab_rate_limited_total", limit=limit)


async def test_terminal_burst_gets_65_and_the_same_connection_passes_after_refill(
    lab: Lab,
) -> None:
    _billing, gw = await gateway_lab(lab, **RATE_LIMITS)
    client = await RawIsoClient.connect(iso(gw))
    builder = terminal_builder("BURSTTRM")
    burst = 6
    start = trio.current_time()
    for _ in range(burst):  # all on the wire before the first answer
        await client.send(builder.inquiry("PLN-0001"))
    codes = [(await client.receive())[1]["39"] for _ in range(burst)]
    elapsed = trio.current_time() - start
    ok, refused = codes.count("00"), codes.count("65")
    assert ok + refused == burst, codes
    # The bucket holds 2 requests and refills at 2 a second.
    assert 2 <= ok <= 2 + math.ceil(2 * elapsed), (codes, elapsed)
    assert refused >= 1
    assert limited(gw, "terminal") == refused

    # The connection stays open; once the bucket has refilled the terminal passes again.
    with trio.fail_after(3):
        while True:
            answer = await client.roundtrip(builder.inquiry("PLN-0001"))
            if answer["39"] != RC.ACTIVITY_LIMIT:
                break
            refused += 1
            await trio.sleep(0.1)
    assert answer["39"] == RC.APPROVED
    assert limited(gw, "terminal") == refused
    assert limited(gw, "customer") == limited(gw, "institution") == 0


async def test_second_payment_with_the_same_card_in_the_window_gets_65(lab: Lab) -> None:
    billing, gw = await gateway_lab(lab, **RATE_LIMITS)
    client = await RawIsoClient.connect(iso(gw))
    builder = terminal_builder("CUSTTERM")
    first = await client.roundtrip(builder.payment("PLN-0001", 150000, DEMO_PAN, DEMO_PIN))
    assert first["39"] == RC.APPROVED
    second = await client.roundtrip(builder.payment("PLN-0002", 275050, DEMO_PAN, DEMO_PIN))
    assert second["39"] == RC.ACTIVITY_LIMIT
    assert limited(gw, "customer") == 1
    assert limited(gw, "terminal") == 0
    store = billing.store
    assert store is not None
    assert await trio.to_thread.run_sync(store.postings_count, "PLN-0002") == 0


async def test_acquirer_api_answers_429_with_retry_after_when_the_gateway_says_65(
    lab: Lab,
) -> None:
    _billing, gw = await gateway_lab(lab, **RATE_LIMITS)
    acquirer = await lab.start("acquirer", Service)
    await wait_for(lambda: acquirer.links[0].connected)
    burst = 6
    answers: list[httpx.Response] = []
    async with httpx.AsyncClient(base_url=http(acquirer), timeout=10) as api:
        start = trio.current_time()
        async with trio.open_nursery() as n:
            for _ in range(burst):

                async def inquire() -> None:
                    answers.append(await api.post("/inquiries", json={"bill": "PLN-0001"}))

                n.start_soon(inquire)
        elapsed = trio.current_time() - start
    ok = [r for r in answers if r.status_code == 200]
    too_many = [r for r in answers if r.status_code == 429]
    assert len(ok) + len(too_many) == burst
    assert 2 <= len(ok) <= 2 + math.ceil(2 * elapsed)
    assert too_many
    for r in too_many:
        assert r.headers["Retry-After"] == "1"
        assert r.headers["content-type"] == "application/json"
        body = r.json()
        assert (body["response_code"], body["approved"]) == ("65", False)
    assert all(r.json()["response_code"] == "00" for r in ok)
    assert limited(gw, "terminal") == len(too_many)


# -- 7: connections per source ---------------------------------------------------------------


async def test_connection_beyond_the_per_source_limit_is_closed_at_once(lab: Lab) -> None:
    _billing, gw = await gateway_lab(lab, max_connections_per_source=3)
    builders = [terminal_builder(f"SOURCE0{i}") for i in range(5)]
    clients = [await RawIsoClient.connect(iso(gw)) for _ in range(3)]
    for client, builder in zip(clients, builders, strict=False):
        assert (await client.roundtrip(builder.inquiry("PLN-0001")))["39"] == "00"

    fourth = await RawIsoClient.connect(iso(gw))
    assert await fourth.is_closed_by_peer(timeout=3)
    refused = "paylab_tcp_connections_refused_total"
    assert sample(gw, refused, reason="per_source") == 1
    assert sample(gw, refused, reason="total") == 0
    for client, builder in zip(clients, builders, strict=False):
        assert (await client.roundtrip(builder.inquiry("PLN-0002")))["39"] == "00"

    # A connection that ends frees its place.
    await clients[0].aclose()
    await wait_for(lambda: sample(gw, "paylab_tcp_connections") == 2)
    await trio.testing.wait_all_tasks_blocked(0.01)
    fifth = await RawIsoClient.connect(iso(gw))
    assert (await fifth.roundtrip(builders[4].inquiry("PLN-0001")))["39"] == "00"
    assert sample(gw, refused, reason="per_source") == 1


# -- 8: the admin API ------------------------------------------------------------------------


async def test_admin_api_links_breakers_reconnect_and_health(lab: Lab) -> None:
    # No heartbeats during the test: every 0800 billing answers is a sign-on.
    billing, gw = await gateway_lab(lab, heartbeat_interval=60)
    client = await RawIsoClient.connect(iso(gw))
    builder = terminal_builder("ADMINTRM")
    async with httpx.AsyncClient(base_url=http(gw), timeout=10, headers=admin_headers()) as api:
        r = await api.get("/links")
        assert r.status_code == 200
        body = r.json()
        assert body["score"] == 100
        links = {link["name"]: link for link in body["links"]}
        assert set(links) == {"billing", "hsm"}
        view = links["billing"]
        assert (view["healthy"], view["target"], view["breaker"]) == (2, 2, "closed")
        assert view["active_endpoint"] == "primary"
        assert view["primary"] == f"127.0.0.1:{iso(billing)}"
        assert [c["state"] for c in view["connections"]] == ["healthy", "healthy"]
        r = await api.get("/health")
        assert (r.status_code, r.json()["score"]) == (200, 100)

        # Forced open: payments fail fast; the score and /health say so.
        r = await api.post("/breakers/billing/force-open")
        assert r.status_code == 200
        assert (r.json()["state"], r.json()["open_remaining"]) == ("forced_open", None)
        states = {b["name"]: b["state"] for b in (await api.get("/breakers")).json()["breakers"]}
        assert states == {"billing": "forced_open", "hsm": "closed"}
        start = trio.current_time()
        payment = builder.payment("PLN-0001", 150000, DEMO_PAN, DEMO_PIN)
        assert (await client.roundtrip(payment))["39"] == RC.ISSUER_INOPERATIVE
        assert trio.current_time() - start < RESILIENT["connect_timeout"]
        before = rejected(gw)
        assert (await client.roundtrip(builder.inquiry("PLN-0001")))["39"] == "91"
        assert rejected(gw) == before + 1
        assert (await api.get("/links")).json()["score"] == 50
        r = await api.get("/health")
        assert (r.status_code, r.json()["score"]) == (503, 50)

        r = await api.post("/breakers/billing/reset")
        assert (r.status_code, r.json()["state"]) == (200, "closed")
        payment = builder.payment("PLN-0001", 150000, DEMO_PAN, DEMO_PIN)
        assert (await client.roundtrip(payment))["39"] == RC.APPROVED

        # Unknown names and actions: 404 with a JSON message.
        for path in ("/breakers/nosuch/reset", "/links/nosuch/reconnect"):
            r = await api.post(path)
            assert r.status_code == 404
            assert "nosuch" in r.json()["error"]
            assert "billing" in r.json()["error"]  # it names the known ones
        r = await api.post("/breakers/billing/explode")
        assert r.status_code == 404
        assert "explode" in r.json()["error"]

        # Reconnect: both connections dropped and signed on anew; traffic goes on.
        sign_ons = sample(billing, "paylab_iso_requests_total", mti="0800", code="00")
        r = await api.post("/links/billing/reconnect")
        assert r.status_code == 200
        assert (r.json()["name"], r.json()["dropped"]) == ("billing", 2)
        assert (await client.roundtrip(builder.inquiry("PLN-0002")))["39"] == RC.APPROVED
        await wait_for(
            lambda: (
                sample(billing, "paylab_iso_requests_total", mti="0800", code="00") == sign_ons + 2
                and gw.billing.pool.healthy_count == 2
            )
        )
        assert (await client.roundtrip(builder.inquiry("PLN-0002")))["39"] == RC.APPROVED
        assert (await api.get("/links")).json()["score"] == 100


async def test_requests_right_after_a_reconnect_never_use_a_dropped_connection(
    lab: Lab,
) -> None:
    """The connections reconnect() drops are out of use at once: a payment sent in the
    same instant waits for a new connection instead of going down with an old one."""
    _billing, gw = await gateway_lab(lab)
    pool = gw.billing.pool
    msg = terminal_builder("RECONTRM").inquiry("PLN-0001")
    msg.pop("64", None)
    msg.pop("128", None)
    assert pool.reconnect() == 2
    answer = await pool.call(codec.encode(msg), match_key(msg), 2.0)
    assert answer.msg["39"] == RC.APPROVED


# -- 9: the CLI against a running network ----------------------------------------------------


async def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAYLAB_", "FORCE_COLOR"))}
    env["NO_COLOR"] = "1"
    with trio.fail_after(30):
        return await trio.run_process(
            [sys.executable, "-m", "shared.cli", *args],
            env=env,
            cwd=cwd,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def test_cli_links_and_breaker_commands(lab: Lab, tmp_path: Path) -> None:
    _billing, gw = await gateway_lab(lab)
    url = http(gw)
    client = await RawIsoClient.connect(iso(gw))
    builder = terminal_builder("CLITERM1")
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def run(name: str, *args: str) -> None:
        results[name] = await cli(*args, cwd=tmp_path)

    # Commands that do not depend on each other run side by side (each is a new process).
    async with trio.open_nursery() as n:
        n.start_soon(run, "open", "breaker", "open", "billing", "--url", url)
        n.start_soon(run, "unknown", "breaker", "reset", "nosuch", "--url", url)
    r = results["open"]
    assert r.returncode == 0, r.stderr
    assert b"billing" in r.stdout and b"forced_open" in r.stdout
    assert gw.billing.breaker.state is BreakerState.FORCED_OPEN
    assert (await client.roundtrip(builder.inquiry("PLN-0001")))["39"] == RC.ISSUER_INOPERATIVE

    r = results["unknown"]
    assert r.returncode == 1
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "nosuch" in lines[0]
    assert b"Traceback" not in r.stderr
    assert r.stdout == b""

    async with trio.open_nursery() as n:
        n.start_soon(run, "links", "links", "--url", url, "--json")
        n.start_soon(run, "status", "breaker", "status", "--url", url, "--json")
    r = results["links"]
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["score"] == 50  # billing's breaker refuses calls: it counts 0
    links = {link["name"]: link for link in data["links"]}
    assert (links["billing"]["breaker"], links["billing"]["healthy"]) == ("forced_open", 2)
    assert (links["hsm"]["breaker"], links["hsm"]["healthy"]) == ("closed", 2)
    r = results["status"]
    assert r.returncode == 0, r.stderr
    breakers = {b["name"]: b for b in json.loads(r.stdout)["breakers"]}
    assert (breakers["billing"]["state"], breakers["billing"]["open_remaining"]) == (
        "forced_open",
        None,
    )
    assert breakers["hsm"]["state"] == "closed"

    await run("reset", "breaker", "reset", "billing", "--url", url)
    r = results["reset"]
    assert r.returncode == 0, r.stderr
    assert b"billing" in r.stdout and b"closed" in r.stdout
    assert gw.billing.breaker.state is BreakerState.CLOSED
    assert (await client.roundtrip(builder.inquiry("PLN-0001")))["39"] == RC.APPROVED
