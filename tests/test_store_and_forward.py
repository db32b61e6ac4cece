"""Store-and-forward end to end: stand-in while billing is away, then the queue drains.

Real sockets on 127.0.0.1 (ephemeral ports), real services; real processes where a crash
or the command line is the point. Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from billing.demo_data import DEMO_CARDS, DemoCard
from billing.service import BillingService
from gateway.models import SafEntry
from gateway.reconcile import Report, load_gateway_facts, load_postings, reconcile
from gateway.service import GatewayService
from shared import codec
from shared.db import make_engine, session_factory
from shared.framing import FrameParser, encode_frame
from shared.messages import Message, idempotency_key, make_response, original_key
from shared.network import Network
from tests.proclab import (
    BILL_AMOUNT,
    SAF_SETTINGS,
    Lab,
    PostingRow,
    bill_numbers,
    billing_postings,
    free_ports,
    new_lab,
    prepare_billing_db,
    wait_until,
)
from tests.support import (
    DEMO_PAN,
    DEMO_PIN,
    RawIsoClient,
    admin_headers,
    lab_settings,
    postgres_schema,
    terminal_builder,
)

T = TypeVar("T")

PAYLAB = [sys.executable, "-m", "shared.cli"]
POSTGRES_URL = os.environ.get("PAYLAB_TEST_POSTGRES_URL")


# --------------------------------------------------------------------------------------------
# Billing's database: the demo data plus as many bills as a test needs


def reconciliation(gateway_url: str, billing_url: str) -> Report:
    """What ``paylab reconcile`` reports: the gateway's facts against billing's postings."""
    gateway_engine, billing_engine = make_engine(gateway_url), make_engine(billing_url)
    try:
        facts = load_gateway_facts(session_factory(gateway_engine))
        return reconcile(facts, load_postings(billing_engine))
    finally:
        gateway_engine.dispose()
        billing_engine.dispose()


def assert_exactly_once(postings: Sequence[PostingRow], expected_keys: set[str]) -> None:
    """Each expected transaction posted once; nothing else posted."""
    keys = [p.key for p in postings]
    assert len(keys) == len(set(keys)), "a transaction was posted twice"
    assert set(keys) == expected_keys, (
        f"missing {len(expected_keys - set(keys))}, unexpected {len(set(keys) - expected_keys)}"
    )
    assert all(p.status == "posted" and p.source == "advice" for p in postings)


# --------------------------------------------------------------------------------------------
# Terminals paying through the gateway's ISO port


@dataclass
class Sent:
    """A payment as sent and the gateway's answer."""

    request: Message
    answer: Message

    @property
    def key(self) -> str:
        return idempotency_key(self.request)


async def pay_from_terminals(
    port: int, plan: dict[str, list[str]], timeout: float = 60.0
) -> dict[str, list[Sent]]:
    """Each terminal of ``plan`` pays its bills in order over its own connection; all
    terminals at once, with the demo cards in turn. Returns what each sent and got, in
    sending order."""
    results: dict[str, list[Sent]] = {t: [] for t in plan}

    async def terminal(tid: str, bills: list[str], card: DemoCard) -> None:
        builder = terminal_builder(tid, stan_start=0)
        client = await RawIsoClient.connect(port)
        try:
            for bill in bills:
                request = builder.payment(bill, BILL_AMOUNT, card.pan, card.pin)
                results[tid].append(Sent(request, await client.roundtrip(request, timeout=20)))
        finally:
            await client.aclose()

    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            for i, (tid, bills) in enumerate(plan.items()):
                nursery.start_soon(terminal, tid, bills, DEMO_CARDS[i % len(DEMO_CARDS)])
    return results


def spread(bills: Sequence[str], terminals: int, prefix: str) -> dict[str, list[str]]:
    """Deal ``bills`` round-robin to ``terminals`` terminals named ``prefix`` + digits."""
    names = [f"{prefix}{i:0{8 - len(prefix)}d}" for i in range(1, terminals + 1)]
    return {name: list(bills[i :: len(names)]) for i, name in enumerate(names)}


def assert_standin(answer: Message) -> None:
    assert answer["39"] == "00", answer
    assert answer.get("38", "").startswith("SI"), answer


async def eventually(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], timeout: float, step: float = 0.05
) -> T:
    """Await ``probe`` until ``ok`` of its result, failing after ``timeout`` s."""
    with trio.fail_after(timeout):
        while True:
            value = await probe()
            if ok(value):
                return value
            await trio.sleep(step)


# --------------------------------------------------------------------------------------------
# In-process networks


def gateway_of(net: Network) -> GatewayService:
    gateway = net.services["gateway"]
    assert isinstance(gateway, GatewayService)
    return gateway


async def saf_counts(gateway: GatewayService) -> dict[str, int]:
    saf = gateway.saf
    assert saf is not None
    stats = await gateway.in_db_thread(lambda: saf.stats(now=datetime.now(UTC)))
    return {**stats.counts, "depth": stats.depth}


async def start_saf_network(
    nursery: trio.Nursery, data_dir: Path, bills: Sequence[str], **overrides: Any
) -> Network:
    """HSM, billing and gateway in this process, billing's database holding ``bills``."""
    settings = lab_settings(data_dir, **{**SAF_SETTINGS, **overrides})
    data_dir.mkdir(parents=True, exist_ok=True)
    await trio.to_thread.run_sync(
        prepare_billing_db, settings.db_url("billing"), bills, settings.pan_hash_key
    )
    net = Network(settings, names=("hsm", "billing", "gateway"))
    await nursery.start(net.run)
    return net


async def stop_billing(net: Network) -> None:
    """Stop billing and wait until the gateway sees it gone (payments go to stand-in)."""
    await net.services["billing"].stop()
    gateway = gateway_of(net)
    with trio.fail_after(10):
        while gateway.billing.available:
            await trio.sleep(0.01)


async def restart_billing(nursery: trio.Nursery, net: Network) -> BillingService:
    """A new BillingService on the stopped one's port and database."""
    old = net.services["billing"]
    port = net.ports["billing"].iso
    billing = BillingService(old.settings.model_copy(update={"billing_iso_port": port}), net.keys)
    await nursery.start(billing.run)
    net.services["billing"] = billing  # net.stop() stops this one
    return billing


# --------------------------------------------------------------------------------------------
# A scripted billing host (the gateway's billing link pointed at it)


@dataclass
class FakeBilling:
    """Billing as a script: ``decide`` gives each request's response code (None: no answer).

    Network management (0800) is answered 00 and not recorded; everything else is recorded
    in ``seen`` in arrival order. It listens only once :meth:`start` is called, on ``port``.
    """

    port: int
    decide: Callable[[Message], str | None]
    seen: list[Message] = field(default_factory=list)

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(partial(trio.serve_tcp, self._serve, self.port, host="127.0.0.1"))

    async def _serve(self, stream: trio.SocketStream) -> None:
        parser = FrameParser()
        try:
            async for data in stream:
                for frame in parser.frames(data):
                    msg = codec.decode(frame)
                    if msg["t"] == "0800":
                        await stream.send_all(encode_frame(codec.encode(make_response(msg, "00"))))
                        continue
                    self.seen.append(msg)
                    code = self.decide(msg)
                    if code is not None:
                        answer = make_response(msg, code, f38="123456" if code == "00" else "")
                        await stream.send_all(encode_frame(codec.encode(answer)))
        except trio.BrokenResourceError:
            pass

    def keys_seen(self) -> list[str]:
        return [idempotency_key(m) for m in self.seen]


async def start_gateway_with_fake(
    nursery: trio.Nursery, data_dir: Path, billing_port: int, **overrides: Any
) -> Network:
    """HSM and gateway in this process; billing is whatever listens on ``billing_port``."""
    settings = lab_settings(
        data_dir, **{**SAF_SETTINGS, "billing_address": f"127.0.0.1:{billing_port}", **overrides}
    )
    net = Network(settings, names=("hsm", "gateway"))
    await nursery.start(net.run)
    return net


async def saf_entry(http: httpx.AsyncClient, entry_id: int) -> dict[str, Any]:
    r = await http.get(f"/saf/{entry_id}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def entry_of(http: httpx.AsyncClient, sent: Sent) -> dict[str, Any]:
    """The queue entry of a payment, found by its RRN through the admin API."""
    r = await http.get("/saf", params={"rrn": sent.request["37"]})
    assert r.status_code == 200, r.text
    items = [e for e in r.json()["items"] if e["idempotency_key"] == sent.key]
    assert len(items) == 1, items
    return items[0]


async def wait_entry(
    http: httpx.AsyncClient, entry_id: int, ok: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    return await eventually(lambda: saf_entry(http, entry_id), ok, timeout)


# --------------------------------------------------------------------------------------------
# 1. A thousand payments in stand-in, then the drain


async def test_thousand_standin_payments_drain_once_in_order(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Billing away during 1,000 payments (20 terminals at once): every one is approved in
    stand-in and queued. Billing back: the queue drains, each terminal's payments post in
    the order it made them, each exactly once, and reconciliation finds nothing."""
    n, terminals = 1000, 20
    bills = bill_numbers("SAF", n)
    net = await start_saf_network(nursery, tmp_path, bills)
    gateway = gateway_of(net)
    await stop_billing(net)

    t0 = trio.current_time()
    sent = await pay_from_terminals(net.ports["gateway"].iso, spread(bills, terminals, "THOU"))
    print(f"\n{n} stand-in payments in {trio.current_time() - t0:.1f} s")
    answers = [s for per_terminal in sent.values() for s in per_terminal]
    assert len(answers) == n
    for s in answers:
        assert_standin(s.answer)
    assert len({s.answer["38"] for s in answers}) == n  # each its own entry
    counts = await saf_counts(gateway)
    assert (counts["queued"], counts["depth"]) == (n, n)

    await restart_billing(nursery, net)
    start = trio.current_time()
    # Polled every 0.2 s: the probe shares the gateway's database thread with the drain.
    counts = await eventually(lambda: saf_counts(gateway), lambda c: c["depth"] == 0, 90, 0.2)
    elapsed = trio.current_time() - start
    print(f"drained {n} entries in {elapsed:.2f} s: {n / elapsed:.0f} entries/s")
    assert counts["done"] == n

    billing_url = net.settings.db_url("billing")
    postings = await trio.to_thread.run_sync(billing_postings, billing_url)
    assert_exactly_once(postings, {s.key for s in answers})
    # First in, first out: each terminal's postings come in the order it paid.
    for tid, per_terminal in sent.items():
        posted = [p.stan for p in postings if p.terminal_id == tid]
        assert posted == [s.request["11"] for s in per_terminal], tid
    report = await trio.to_thread.run_sync(
        reconciliation, net.settings.db_url("gateway"), billing_url
    )
    assert (report.checked, report.pending, report.mismatches) == (n, 0, [])
    await net.stop()


# --------------------------------------------------------------------------------------------
# 3. A repeat while billing is away: one entry, the same answer


async def test_repeated_request_in_standin_gets_one_entry_and_the_same_answer(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A terminal repeats a payment (same key) while billing is away: one queue entry, the
    same approval code twice, one posting later, even with the card's daily stand-in
    limit used up by the first attempt."""
    # The card may pay exactly one bill in stand-in today: the repeat must not count twice.
    net = await start_saf_network(
        nursery, tmp_path, bill_numbers("REP", 1), standin_customer_daily_amount=BILL_AMOUNT
    )
    gateway = gateway_of(net)
    await stop_billing(net)
    request = terminal_builder("REPEAT01", stan_start=0).payment(
        "REP-00001", BILL_AMOUNT, DEMO_PAN, DEMO_PIN
    )
    client = await RawIsoClient.connect(net.ports["gateway"].iso)
    first = await client.roundtrip(request)
    second = await client.roundtrip(request)
    await client.aclose()
    assert_standin(first)
    assert (second["39"], second["38"]) == (first["39"], first["38"])
    counts = await saf_counts(gateway)
    assert (counts["queued"], counts["depth"]) == (1, 1)

    await restart_billing(nursery, net)
    await eventually(lambda: saf_counts(gateway), lambda c: c["depth"] == 0, 20)
    postings = await trio.to_thread.run_sync(billing_postings, net.settings.db_url("billing"))
    assert_exactly_once(postings, {idempotency_key(request)})
    await net.stop()


# --------------------------------------------------------------------------------------------
# 4. A reversal queued after advices goes first


async def test_reversal_queued_after_advices_is_forwarded_before_them(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Terminal A: three payments in stand-in (billing away). Billing comes back but turns
    advices away (96) until it has seen a reversal, and swallows a fourth payment (68: the
    gateway queues its reversal). The reversal, queued after the three advices, is the
    first thing billing accepts; the advices follow, first in first out."""
    (port,) = free_ports(1)
    log: list[tuple[str, str, str | None]] = []  # (MTI, transaction key, code answered)

    def decide(msg: Message) -> str | None:
        code: str | None
        if msg["t"] == "0200":
            code = None  # swallowed: the gateway cannot know whether it posted
        elif msg["t"] in ("0420", "0421"):
            code = "00"
        else:
            code = "00" if any(t == "0420" for t, _, _ in log) else "96"
        key = original_key(msg) if msg["t"] in ("0420", "0421") else idempotency_key(msg)
        log.append((msg["t"], key, code))
        return code

    fake = FakeBilling(port, decide)
    # A refused advice is due again 4 s later: the 68 payment normally comes first (if not,
    # the advice is refused once more; the order of what billing accepts is the same).
    net = await start_gateway_with_fake(
        nursery, tmp_path, port, billing_timeout=0.5, saf_retry_interval=4.0
    )
    gateway = gateway_of(net)
    builder = terminal_builder("TERMREVA", stan_start=0)
    client = await RawIsoClient.connect(net.ports["gateway"].iso)
    advices = []
    for bill in ("PLN-1001", "PLN-1002", "PLN-1003"):
        request = builder.payment(bill, BILL_AMOUNT, DEMO_PAN, DEMO_PIN)
        assert_standin(await client.roundtrip(request))
        advices.append(idempotency_key(request))

    await fake.start(nursery)
    with trio.fail_after(10):
        while not log:  # the first advice went out (and was refused)
            await trio.sleep(0.01)
    unknown = builder.payment("PLN-1004", BILL_AMOUNT, DEMO_PAN, DEMO_PIN)
    assert (await client.roundtrip(unknown))["39"] == "68"
    await client.aclose()

    counts = await eventually(lambda: saf_counts(gateway), lambda c: c["depth"] == 0, 30)
    assert counts["done"] == 4
    assert ("0200", idempotency_key(unknown), None) in log
    assert {key for _, key, code in log if code == "96"} == {advices[0]}  # only the head
    accepted = [(mti, key) for mti, key, code in log if code == "00"]
    assert accepted == [
        ("0420", idempotency_key(unknown)),
        ("0221", advices[0]),
        ("0220", advices[1]),
        ("0220", advices[2]),
    ]
    await net.stop()


# --------------------------------------------------------------------------------------------
# 5. Operators: cancel, and retry a dead entry


async def test_cancelled_entry_never_sent_and_dead_entry_retried_by_hand(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Operators over HTTP: an entry cancelled while billing is away is never sent; an
    entry dead after one attempt (billing answered 96, saf_max_attempts=1) is delivered
    once retried by hand."""
    (port,) = free_ports(1)
    behaving = False

    def decide(msg: Message) -> str | None:
        return "00" if behaving else "96"

    fake = FakeBilling(port, decide)
    net = await start_gateway_with_fake(nursery, tmp_path, port, saf_max_attempts=1)
    sent = await pay_from_terminals(
        net.ports["gateway"].iso, {"TERMKEEP": ["PLN-1005"], "TERMDROP": ["PLN-1006"]}
    )
    kept, dropped = sent["TERMKEEP"][0], sent["TERMDROP"][0]
    assert_standin(kept.answer)
    assert_standin(dropped.answer)

    base = f"http://127.0.0.1:{net.ports['gateway'].http}"
    async with httpx.AsyncClient(base_url=base, timeout=10, headers=admin_headers()) as http:
        keep_id = (await entry_of(http, kept))["id"]
        drop_id = (await entry_of(http, dropped))["id"]
        r = await http.post(f"/saf/{drop_id}/cancel")
        assert (r.status_code, r.json()["state"]) == (200, "cancelled")

        await fake.start(nursery)  # billing is back, but turns the advice away (96)
        dead = await wait_entry(http, keep_id, lambda e: e["state"] == "dead", 15)
        assert (dead["attempts"], dead["response_code"]) == (1, "96")
        assert (await http.post(f"/saf/{drop_id}/retry")).status_code == 409  # cancelled

        behaving = True
        r = await http.post(f"/saf/{keep_id}/retry")
        assert (r.status_code, r.json()["state"]) == (200, "queued")
        done = await wait_entry(http, keep_id, lambda e: e["state"] == "done", 15)
        assert done["response_code"] == "00"
        assert (await saf_entry(http, drop_id))["state"] == "cancelled"
    # The kept advice went out twice (96, then 00 after the retry); the cancelled one never.
    assert fake.keys_seen() == [kept.key, kept.key]
    await net.stop()


# --------------------------------------------------------------------------------------------
# 6. A full queue


def metric(text: str, name: str, labels: dict[str, str]) -> float:
    """The value of one sample of a Prometheus text page (the sample must exist)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels}")


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    return sum(
        float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def test_full_queue_declines_the_next_standin_and_keeps_the_queued(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """saf_max_size=5: the sixth stand-in is declined 91 (no approval code) and counted;
    the five queued stay queued and post once billing is back, the sixth never."""
    bills = bill_numbers("FULL", 6)
    net = await start_saf_network(nursery, tmp_path, bills, saf_max_size=5)
    gateway = gateway_of(net)
    await stop_billing(net)
    sent = (await pay_from_terminals(net.ports["gateway"].iso, {"TERMFULL": bills}))["TERMFULL"]
    for s in sent[:5]:
        assert_standin(s.answer)
    assert sent[5].answer["39"] == "91"
    assert "38" not in sent[5].answer

    base = f"http://127.0.0.1:{net.ports['gateway'].http}"
    async with httpx.AsyncClient(base_url=base, timeout=10, headers=admin_headers()) as http:
        text = (await http.get("/metrics")).text
        stats = (await http.get("/saf/stats")).json()
    assert metric(text, "paylab_saf_rejected_total", {"reason": "full"}) == 1
    assert metric(text, "paylab_standin_total", {"outcome": "queue_full"}) == 1
    assert metric(text, "paylab_standin_total", {"outcome": "approved"}) == 5
    assert (stats["counts"]["queued"], stats["depth"]) == (5, 5)

    await restart_billing(nursery, net)
    counts = await eventually(lambda: saf_counts(gateway), lambda c: c["depth"] == 0, 20)
    assert counts["done"] == 5
    postings = await trio.to_thread.run_sync(billing_postings, net.settings.db_url("billing"))
    assert_exactly_once(postings, {s.key for s in sent[:5]})
    await net.stop()


# --------------------------------------------------------------------------------------------
# Real processes: `paylab <service>` each (tests/proclab.py)


def saf_states(gateway_url: str) -> dict[str, int]:
    """Queue entries by state, read straight from the gateway's database."""
    engine = make_engine(gateway_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(SafEntry.state, func.count()).group_by(SafEntry.state)).all()
    finally:
        engine.dispose()
    counts = {state: int(n) for state, n in rows}
    counts["depth"] = counts.get("queued", 0) + counts.get("in_flight", 0)
    counts.setdefault("done", 0)
    return counts


def sent_keys(sent: dict[str, list[Sent]]) -> set[str]:
    return {s.key for per_terminal in sent.values() for s in per_terminal}


# --------------------------------------------------------------------------------------------
# 2. The gateway killed in the middle of a drain


def test_gateway_killed_mid_drain_delivers_the_rest_exactly_once(
    tmp_path: Path, labs: list[Lab]
) -> None:
    """The gateway (a real process) is SIGKILLed while it drains; started again, it
    delivers the rest: billing holds every payment once, none twice, none missing.

    HSM and billing run in this process (threads): only the gateway needs to die.
    """
    n = 120
    # One entry at a time, so the drain lasts long enough to be interrupted.
    lab = new_lab(labs, tmp_path, saf_concurrency=1)
    settings = lab.settings()
    billing_url, gateway_url = settings.db_url("billing"), settings.db_url("gateway")
    bills = bill_numbers("KILL", n)
    prepare_billing_db(billing_url, bills, settings.pan_hash_key)
    lab.run_in_thread("hsm")
    lab.start("gateway")
    sent = trio.run(pay_from_terminals, lab.iso_port("gateway"), spread(bills, 4, "KILL"))
    for per_terminal in sent.values():
        for s in per_terminal:
            assert_standin(s.answer)
    assert saf_states(gateway_url)["queued"] == n

    lab.run_in_thread("billing")
    wait_until(lambda: saf_states(gateway_url)["done"], lambda done: done >= 10, 30, 0.005)
    lab.kill("gateway")
    at_kill = saf_states(gateway_url)
    print(f"\nkilled the gateway with {at_kill}")
    assert 0 < at_kill["done"] < n, at_kill

    lab.start("gateway")
    final = wait_until(lambda: saf_states(gateway_url), lambda c: c["depth"] == 0, 30)
    assert final["done"] == n, final
    assert_exactly_once(billing_postings(billing_url), sent_keys(sent))
    report = reconciliation(gateway_url, billing_url)
    assert (report.checked, report.pending, report.mismatches) == (n, 0, [])


# --------------------------------------------------------------------------------------------
# 7. Two gateway replicas draining one queue on PostgreSQL


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL schema of this test's own, empty at the start (dropped at the end): the
    test neither sees nor disturbs the tables of other tests using the same database."""
    with postgres_schema("saf_e2e") as url:
        yield url


@pytest.mark.skipif(not POSTGRES_URL, reason="PAYLAB_TEST_POSTGRES_URL is not set")
def test_two_replicas_on_postgres_deliver_each_entry_once(
    tmp_path: Path, pg_url: str, labs: list[Lab]
) -> None:
    """Two gateway processes (replica ids gateway-1 and gateway-2) share one queue on
    PostgreSQL: both deliver, together exactly the 300 entries, each sent once."""
    n, terminals = 300, 30
    # Eight deliveries at a time per replica: neither can hold all 30 terminals' heads, so
    # both take part (one replica with slots to spare would otherwise drain almost alone).
    lab = new_lab(
        labs,
        tmp_path,
        gateway_db_url=pg_url,
        billing_db_url=pg_url,
        saf_concurrency=8,
    )
    settings = lab.settings()
    bills = bill_numbers("REPL", n)
    prepare_billing_db(pg_url, bills, settings.pan_hash_key)
    http2, iso2 = free_ports(2)
    second = {
        "PAYLAB_REPLICA_ID": "gateway-2",
        "PAYLAB_GATEWAY_HTTP_PORT": str(http2),
        "PAYLAB_GATEWAY_ISO_PORT": str(iso2),
    }
    lab.run_in_thread("hsm")
    lab.start("gateway", "gateway#2", overrides={"gateway#2": second})
    # Half the terminals pay through each replica; both queue into one table.
    plan = spread(bills, terminals, "REPL")
    names = sorted(plan)
    half = len(names) // 2

    async def both() -> dict[str, list[Sent]]:
        sent: dict[str, list[Sent]] = {}

        async def through(gateway: str, terminals: list[str]) -> None:
            port = lab.iso_port(gateway)
            sent.update(await pay_from_terminals(port, {t: plan[t] for t in terminals}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(through, "gateway", names[:half])
            nursery.start_soon(through, "gateway#2", names[half:])
        return sent

    t0 = time.monotonic()
    sent = trio.run(both)
    print(f"\n{n} stand-in payments through two replicas in {time.monotonic() - t0:.1f} s")
    for per_terminal in sent.values():
        for s in per_terminal:
            assert_standin(s.answer)
    assert saf_states(pg_url)["queued"] == n

    lab.run_in_thread("billing")
    t0 = time.monotonic()
    final = wait_until(lambda: saf_states(pg_url), lambda c: c["depth"] == 0, 60, 0.1)
    elapsed = time.monotonic() - t0
    print(f"two replicas drained {n} entries in {elapsed:.2f} s: {n / elapsed:.0f} entries/s")
    assert final["done"] == n, final
    postings = billing_postings(pg_url)
    assert_exactly_once(postings, sent_keys(sent))
    # Each entry went out once: billing received one advice per entry, no repeat.
    billing_metrics = lab.metrics("billing")
    advices = {
        mti: metric_sum(billing_metrics, "paylab_iso_requests_total", mti=mti)
        for mti in ("0220", "0221")
    }
    forwarded = [
        metric(lab.metrics(g), "paylab_saf_forwarded_total", {"kind": "advice", "state": "done"})
        for g in ("gateway", "gateway#2")
    ]
    print(f"forwarded by replica: {forwarded}; billing received {advices}")
    assert sum(forwarded) == n
    assert min(forwarded) > 0  # both replicas drained
    assert advices == {"0220": n, "0221": 0}
    report = reconciliation(pg_url, pg_url)
    assert (report.checked, report.pending, report.mismatches) == (n, 0, [])


# --------------------------------------------------------------------------------------------
# 8. The by-hand flow of the issue


def test_by_hand_flow_billing_stopped_ten_payments_then_drained(
    tmp_path: Path, labs: list[Lab]
) -> None:
    """The issue's manual check, every service its own ``paylab`` process: billing stopped,
    ten payments through the acquirer's API, ``paylab saf list`` shows ten, billing
    started, ten postings, ``paylab reconcile`` clean."""
    lab = new_lab(labs, tmp_path)
    settings = lab.settings()
    billing_url = settings.db_url("billing")
    bills = bill_numbers("HAND", 10)
    prepare_billing_db(billing_url, bills, settings.pan_hash_key)
    lab.start("hsm", "billing", "gateway", "acquirer")

    lab.stop("billing")  # paylab billing, Ctrl-C
    wait_until(
        lambda: lab.get("gateway", "/links"),
        lambda links: (
            not any(link["healthy"] for link in links["links"] if link["name"] == "billing")
        ),
        10,
    )
    api = lab.http("acquirer")
    for bill in bills:
        r = httpx.post(
            api + "/payments",
            json={"bill": bill, "amount": BILL_AMOUNT, "pan": DEMO_PAN, "pin": DEMO_PIN},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["response_code"] == "00", body
        assert body["approval_code"].startswith("SI"), body

    listed = lab.cli("saf", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    items = json.loads(listed.stdout)["items"]
    assert len(items) == 10
    assert {(e["kind"], e["state"], e["terminal_id"]) for e in items} == {
        ("advice", "queued", "PAYLAB01")
    }
    table = lab.cli("saf", "list")
    assert table.returncode == 0, table.stderr
    assert table.stdout.count("queued") == 10

    lab.start("billing")
    wait_until(lambda: lab.get("gateway", "/saf/stats"), lambda s: s["depth"] == 0, 30, 0.1)
    postings = billing_postings(billing_url)
    assert_exactly_once(postings, {e["idempotency_key"] for e in items})
    assert sorted(p.bill_number for p in postings) == bills
    reconciled = lab.cli("reconcile", "--json")
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
    report = json.loads(reconciled.stdout)
    assert (report["checked"], report["pending"], report["clean"]) == (10, 0, True)
