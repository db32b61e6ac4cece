"""The money rule under real failures: every service its own ``paylab`` process.

At rest, a terminal was answered 00 if and only if a posting for its request is in force at
billing; nothing is posted twice; every reversal the network decided is applied. Each test
drives terminals of its own through the acquirer's terminal port (MAC and PIN block built
as a real terminal does), breaks the network with real signals (SIGSTOP, SIGKILL) or real
files (a full disk, a deleted database), lets every terminal without a final answer
re-send the same bytes (same STAN, same field 7), and ends with a count made from
billing's database compared with ``paylab reconcile``.

Each test prints its figures (payments, approved, posted, reversed, lost, duplicated).
The whole file takes two to three minutes on two cores; ``PAYLAB_OUTAGE_SCALE=5`` makes
every run five times longer (4,000 payments in the first), outside CI:
``PAYLAB_OUTAGE_SCALE=5 pytest -s tests/test_outage.py``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from sqlalchemy import func, select

from gateway.models import SafEntry
from shared.iso import codec
from shared.iso.framing import HeaderKind, encode_frame
from shared.iso.messages import idempotency_key
from shared.store.db import make_engine
from tests.proclab import (
    BILL_AMOUNT,
    SAF_SETTINGS,
    Lab,
    PostingRow,
    bill_numbers,
    billing_postings,
    new_lab,
    prepare_billing_db,
)
from tests.support import DEMO_PAN, DEMO_PIN, RawIsoClient, terminal_builder

#: Answers after which a terminal does not send again: an approval or a business decline.
#: 68 (outcome unknown), 91/96 (network trouble) and no answer at all are re-sent.
RESEND = frozenset({"68", "91", "96", "--"})
#: Settings of these networks: short timeouts so that failures show in a second or two.
OUTAGE_SETTINGS: dict[str, Any] = {
    **SAF_SETTINGS,
    "billing_timeout": 1.0,
    "gateway_timeout": 4.0,
    "hsm_timeout": 1.0,
    "connect_timeout": 0.5,
    "heartbeat_interval": 0.5,
    "saf_retry_interval": 0.5,
    "shutdown_grace": 1.0,
}
#: Seconds a terminal waits for an answer (the acquirer's own deadline is 4 s).
ANSWER_TIMEOUT = 7.0
#: Payments per test are multiplied by this (a longer run outside CI).
SCALE = max(1, int(os.environ.get("PAYLAB_OUTAGE_SCALE", "1")))


# --------------------------------------------------------------------------------------------
# Terminals that re-send


@dataclass
class Payment:
    """One request as sent (its exact bytes) and every answer it got, in order."""

    bill: str
    raw: bytes
    key: str
    answers: list[str] = field(default_factory=list)

    @property
    def final(self) -> str:
        return self.answers[-1] if self.answers else "--"


class Terminal:
    """One terminal on its own connection to the acquirer: pays bills one after the other,
    and re-sends any request without a final answer, byte for byte."""

    def __init__(self, terminal_id: str, port: int) -> None:
        self.builder = terminal_builder(terminal_id)
        self.port = port
        self.payments: list[Payment] = []
        self._client: RawIsoClient | None = None

    async def _roundtrip(self, payment: Payment) -> str:
        try:
            if self._client is None:
                self._client = await RawIsoClient.connect(self.port)
            await self._client.stream.send_all(encode_frame(payment.raw, HeaderKind.BINARY2, 65535))
            _, answer = await self._client.receive(ANSWER_TIMEOUT)
        except (OSError, EOFError, trio.BrokenResourceError, trio.TooSlowError):
            await self._drop()
            return "--"
        return answer.get("39", "--")

    async def _drop(self) -> None:
        if self._client is not None:
            with trio.move_on_after(1):
                await self._client.aclose()
            self._client = None

    async def pay(self, bills: Sequence[str], pace: float, answered: Callable[[], None]) -> None:
        """Pay ``bills`` in order, one every ``pace`` seconds at most."""
        for bill in bills:
            started = trio.current_time()
            msg = self.builder.payment(bill, BILL_AMOUNT, DEMO_PAN, DEMO_PIN)
            payment = Payment(bill, codec.encode(msg), idempotency_key(msg))
            self.payments.append(payment)
            payment.answers.append(await self._roundtrip(payment))
            answered()
            await trio.sleep_until(started + pace)  # load shaping: this terminal's rate

    async def resend_unfinished(self) -> int:
        """Send again every request whose last answer was not final; how many."""
        sent = 0
        for payment in self.payments:
            if payment.final in RESEND:
                payment.answers.append(await self._roundtrip(payment))
                sent += 1
        return sent

    async def close(self) -> None:
        await self._drop()


class Fleet:
    """Terminals paying their share of the bills at once."""

    def __init__(self, port: int, bills: Sequence[str], terminals: int, prefix: str) -> None:
        self.terminals = [Terminal(f"{prefix}{i:05d}", port) for i in range(terminals)]
        self.shares = [list(bills[i::terminals]) for i in range(terminals)]
        self.answered = 0
        self._progress = trio.Condition()

    def _one_more(self) -> None:
        self.answered += 1

    async def pay_all(self, pace: float) -> None:
        async with trio.open_nursery() as nursery:
            for terminal, share in zip(self.terminals, self.shares, strict=True):
                nursery.start_soon(terminal.pay, share, pace, self._one_more)

    @property
    def total(self) -> int:
        return sum(len(share) for share in self.shares)

    async def wait_answered(self, n: int, timeout: float) -> None:
        """Until ``n`` payments (at most all of them) have had their first answer; fails
        after ``timeout``."""
        n = min(n, self.total)
        with trio.fail_after(timeout):
            while self.answered < n:
                await trio.sleep(0.05)

    async def resend_unfinished(self) -> int:
        counts: list[int] = []

        async def one(terminal: Terminal) -> None:
            counts.append(await terminal.resend_unfinished())

        async with trio.open_nursery() as nursery:
            for terminal in self.terminals:
                nursery.start_soon(one, terminal)
        return sum(counts)

    async def close(self) -> None:
        for terminal in self.terminals:
            await terminal.close()

    @property
    def payments(self) -> list[Payment]:
        return [p for t in self.terminals for p in t.payments]


# --------------------------------------------------------------------------------------------
# The count: terminals' answers against billing's database, and against `paylab reconcile`


@dataclass(frozen=True)
class Count:
    payments: int
    approved: int
    posted: int
    reversed: int
    lost: int
    orphaned: int
    duplicated: int
    resent: int

    def line(self, name: str) -> str:
        return (
            f"{name}: payments {self.payments}, approved {self.approved}, posted {self.posted}, "
            f"reversed {self.reversed}, lost {self.lost}, orphaned {self.orphaned}, "
            f"duplicated {self.duplicated}, re-sent {self.resent}"
        )


def count(payments: Sequence[Payment], postings: Sequence[PostingRow], resent: int) -> Count:
    """The test's own verdict, from the terminals' final answers and billing's postings."""
    in_force = [p for p in postings if p.status == "posted"]
    forced_keys = [p.key for p in in_force]
    by_bill: dict[str, int] = {}
    for p in in_force:
        by_bill[p.bill_number] = by_bill.get(p.bill_number, 0) + 1
    approved = {p.key for p in payments if p.final == "00"}
    duplicated = sum(n - 1 for n in by_bill.values()) + len(forced_keys) - len(set(forced_keys))
    return Count(
        payments=len(payments),
        approved=len(approved),
        posted=len(in_force),
        reversed=sum(p.status == "reversed" for p in postings),
        lost=len(approved - set(forced_keys)),
        orphaned=len(set(forced_keys) - approved),
        duplicated=duplicated,
        resent=resent,
    )


def reconcile_cli(lab: Lab) -> tuple[int, dict[str, Any]]:
    done = lab.cli("reconcile", "--json")
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {}


def assert_money_rule(lab: Lab, fleet: Fleet, resent: int, name: str) -> Count:
    """At rest: the terminals' 00s are exactly billing's postings in force, once each, and
    ``paylab reconcile`` says the same."""
    settings = lab.settings()
    result = count(fleet.payments, billing_postings(settings.db_url("billing")), resent)
    print(result.line(name))
    firsts: dict[str, int] = {}
    for p in fleet.payments:
        firsts[p.answers[0]] = firsts.get(p.answers[0], 0) + 1
    print(f"{name}: first answers {dict(sorted(firsts.items()))}")
    code, report = reconcile_cli(lab)
    print(
        f"{name}: paylab reconcile: exit {code}, lost {report.get('lost')}, duplicated "
        f"{report.get('duplicated')}, orphans {report.get('orphans')}, approved "
        f"{report.get('approved')}, posted {report.get('posted')}, journal gaps "
        f"{report.get('journal_gaps')}"
    )
    assert (result.lost, result.orphaned, result.duplicated) == (0, 0, 0), result
    assert code == 0, report
    assert (report["lost"], report["duplicated"], report["orphans"]) == (0, 0, 0)
    assert report["client_side"] is True
    # Reconcile counts what the clients hold; billing's count is the same money.
    assert report["posted"] == result.posted
    assert report["approved"] == result.approved
    return result


def saf_depth(gateway_url: str) -> tuple[int, int]:
    """(entries still to deliver, reversals ever queued), read from the gateway's database."""
    engine = make_engine(gateway_url)
    try:
        with engine.connect() as conn:
            depth = conn.scalar(
                select(func.count()).where(SafEntry.state.in_(("queued", "in_flight")))
            )
            reversals = conn.scalar(select(func.count()).where(SafEntry.kind == "reversal"))
    finally:
        engine.dispose()
    return int(depth or 0), int(reversals or 0)


async def wait_for_condition(
    probe: Callable[[], Any], ok: Callable[[Any], bool], timeout: float
) -> Any:
    """Poll ``probe`` (run in a thread) until ``ok`` of its value, or fail after ``timeout``."""
    last: Any = None
    with trio.move_on_after(timeout):
        while True:
            last = await trio.to_thread.run_sync(probe)
            if ok(last):
                return last
            await trio.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout} s; last {last!r}")


async def drain(lab: Lab) -> None:
    """Until the gateway's queue is empty (every advice and reversal delivered)."""
    gateway_url = lab.settings().db_url("gateway")
    await wait_for_condition(lambda: saf_depth(gateway_url)[0], lambda d: d == 0, 60)


def outage_lab(labs: list[Lab], tmp_path: Path, bills: Sequence[str], **settings: Any) -> Lab:
    lab = new_lab(labs, tmp_path, **{**OUTAGE_SETTINGS, **settings})
    s = lab.settings()
    prepare_billing_db(s.db_url("billing"), bills, s.pan_hash_key)
    return lab


async def start(lab: Lab, *names: str) -> None:
    await trio.to_thread.run_sync(lambda: lab.start(*names))


# --------------------------------------------------------------------------------------------
# 1. Billing frozen, the gateway killed after its reversals were queued, terminals re-send


async def test_billing_frozen_then_gateway_killed_resends_never_approve_a_reversal(
    tmp_path: Path, labs: list[Lab]
) -> None:
    """The issue's run, at CI scale: billing frozen (SIGSTOP) for a while, so payments get
    68 and the gateway queues their reversals; billing resumed (it then posts them late);
    the gateway SIGKILLed and restarted; every terminal without a final answer re-sends,
    once before the queue has drained and once after. A re-send of a reversed payment is
    answered 68 again by the restarted gateway, never 00."""
    bills = bill_numbers("FRZ", 800 * SCALE)
    lab = outage_lab(labs, tmp_path, bills)
    await start(lab, "hsm", "billing", "gateway", "acquirer")
    gateway_url = lab.settings().db_url("gateway")
    fleet = Fleet(lab.iso_port("acquirer"), bills, terminals=16, prefix="FRZ")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fleet.pay_all, 0.25)
        await fleet.wait_answered(120, 30)
        lab.freeze("billing")
        # Payments on the wire when billing froze time out (68, reversal queued); once the
        # heartbeats give billing up, new ones are approved in stand-in.
        await wait_for_condition(lambda: saf_depth(gateway_url)[1], lambda n: n >= 5, 30)
        await fleet.wait_answered(fleet.answered + 100, 30)
        lab.thaw("billing")
        await fleet.wait_answered(fleet.answered + 80, 30)
        await trio.to_thread.run_sync(lab.kill, "gateway")
        await fleet.wait_answered(fleet.answered + 20, 30)  # answered 91/68 by the acquirer
        await start(lab, "gateway")
    reversed_keys = {p.key for p in fleet.payments if p.answers[0] == "68"}
    resent = await fleet.resend_unfinished()  # the queue may still hold reversals
    await drain(lab)
    resent += await fleet.resend_unfinished()  # every reversal applied by now
    await drain(lab)
    await fleet.close()

    final_of = {p.key: p.final for p in fleet.payments}
    print(
        f"first answers 68: {len(reversed_keys)}; their final answers: "
        f"{sorted({final_of[k] for k in reversed_keys})}; reversals queued: "
        f"{saf_depth(gateway_url)[1]}"
    )
    assert reversed_keys, "the freeze produced no 68: the test did not test anything"
    result = assert_money_rule(lab, fleet, resent, "frozen billing, killed gateway")
    assert result.resent > 0 and result.reversed > 0


# --------------------------------------------------------------------------------------------
# 2. Plain SIGKILLs: the gateway twice and billing once, under load


async def test_services_killed_under_load_keep_the_money_rule(
    tmp_path: Path, labs: list[Lab]
) -> None:
    bills = bill_numbers("KIL", 600 * SCALE)
    lab = outage_lab(labs, tmp_path, bills)
    await start(lab, "hsm", "billing", "gateway", "acquirer")
    fleet = Fleet(lab.iso_port("acquirer"), bills, terminals=12, prefix="KIL")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fleet.pay_all, 0.3)
        for victim, after in (("gateway", 80), ("billing", 60), ("gateway", 60)):
            await fleet.wait_answered(fleet.answered + after, 40)
            await trio.to_thread.run_sync(lab.kill, victim)
            await fleet.wait_answered(fleet.answered + 10, 40)
            await start(lab, victim)
    resent = await fleet.resend_unfinished()
    await drain(lab)
    resent += await fleet.resend_unfinished()
    await drain(lab)
    await fleet.close()
    result = assert_money_rule(lab, fleet, resent, "SIGKILLs under load")
    assert result.approved > 0


# --------------------------------------------------------------------------------------------
# 3. Disk full on the gateway: no approval without its journal row, no false alarm


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"this machine does not allow mounting a tmpfs: {done.stderr.strip()}")


def _fill(path: Path) -> Path:
    """Fill the file system of ``path`` to the last byte; the filler file."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (65536, 4096, 512, 1):  # unbuffered: every byte the disk takes
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return filler


async def test_gateway_disk_full_withholds_approvals_and_reconciles_clean(
    tmp_path: Path, labs: list[Lab]
) -> None:
    disk = tmp_path / "gateway-disk"
    _mount_tmpfs(disk, "8m")
    try:
        bills = bill_numbers("DSK", 300 * SCALE)
        lab = outage_lab(labs, tmp_path, bills, gateway_db_url=f"sqlite:///{disk}/gateway.db")
        await start(lab, "hsm", "billing", "gateway", "acquirer")
        fleet = Fleet(lab.iso_port("acquirer"), bills, terminals=6, prefix="DSK")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fleet.pay_all, 0.1)
            await fleet.wait_answered(60, 30)
            filler = await trio.to_thread.run_sync(_fill, disk)
            await fleet.wait_answered(fleet.answered + 100, 40)
            filler.unlink()  # space again: the journal is written again
        resent = await fleet.resend_unfinished()
        await drain(lab)
        metrics = httpx.get(lab.http("gateway") + "/metrics", timeout=10).text
        await fleet.close()
        withheld = _metric(metrics, 'paylab_approvals_withheld_total{outcome="reversed_online"}')
        failures = _metric(metrics, "paylab_journal_write_failures_total")
        print(f"disk full: journal write failures {failures:.0f}, withheld {withheld:.0f}")
        assert failures > 0, "the full disk caused no journal failure: nothing was tested"
        assert withheld > 0
        assert _metric(metrics, 'paylab_approvals_withheld_total{outcome="orphaned"}') == 0
        assert_money_rule(lab, fleet, resent, "gateway disk full")
    finally:
        for lab in labs:
            lab.close()
        subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True)


def _metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no series {series}")


# --------------------------------------------------------------------------------------------
# 4. Billing's database deleted while it runs


def _deleted_files(pid: int, names: Sequence[str]) -> dict[str, Path]:
    """The still-open files of process ``pid`` that were deleted, by base name."""
    found: dict[str, Path] = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.endswith(" (deleted)"):
            name = Path(target.removesuffix(" (deleted)")).name
            if name in names:
                found[name] = fd
    return found


async def test_billing_database_deleted_is_said_loudly_and_never_reseeded(
    tmp_path: Path, labs: list[Lab]
) -> None:
    """The database file is deleted under a running billing: billing stops approving (91)
    with a failing /health and a critical log line; restarted, it refuses to serve an
    empty ledger (no demo data seeded again); reconciliation reports the lost payments;
    once the database is restored, everything reconciles."""
    bills = bill_numbers("DEL", 200 * SCALE)
    # Billing then answers 91 to every payment: an answer, so no breaker opens and the
    # gateway retries each one; quick retries keep the run short.
    lab = outage_lab(labs, tmp_path, bills, retry_base_delay=0.1, retry_max_delay=0.2)
    await start(lab, "hsm", "billing", "gateway", "acquirer")
    settings = lab.settings()
    db = Path(settings.db_url("billing").removeprefix("sqlite:///"))
    fleet = Fleet(lab.iso_port("acquirer"), bills, terminals=4, prefix="DEL")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fleet.pay_all, 0.1)
        await fleet.wait_answered(60, 30)
        approved_before = sum(p.final == "00" for p in fleet.payments)
        names = [db.name, db.name + "-wal", db.name + "-shm"]
        for name in names:
            (db.parent / name).unlink(missing_ok=True)
        health = await wait_for_condition(
            lambda: httpx.get(lab.http("billing") + "/health", timeout=5),
            lambda r: r.status_code == 503,
            20,
        )
        await fleet.wait_answered(fleet.answered + 40, 40)
    await fleet.close()
    ledger = health.json()["dependencies"]["ledger"]
    assert not ledger["ok"] and "deleted" in ledger["detail"], ledger
    metrics = httpx.get(lab.http("billing") + "/metrics", timeout=10).text
    assert _metric(metrics, "paylab_billing_ledger_lost") == 1
    assert "ledger_lost" in lab.log_tail("billing")
    # An operator's rescue: the deleted file is still open in billing, copy it out.
    pid = lab.procs["billing"].pid
    rescued = tmp_path / "rescued"
    rescued.mkdir()
    for name, fd in _deleted_files(pid, names).items():
        shutil.copyfile(fd, rescued / name)
    assert (rescued / db.name).exists()
    await trio.to_thread.run_sync(lab.kill, "billing")

    # Restarted on the vanished database: it refuses, it does not seed a new ledger.
    with pytest.raises(AssertionError, match="exited"):
        await start(lab, "billing")
    assert "LedgerLost" in lab.log_tail("billing") or "deleted or replaced" in lab.log_tail(
        "billing"
    )
    code, report = reconcile_cli(lab)
    print(f"database gone: paylab reconcile exit {code}, lost {report.get('lost')}")
    assert code == 1 and report["lost"] >= approved_before > 0

    # Restored: the same ledger serves again, nothing is lost.
    for name in names:
        (db.parent / name).unlink(missing_ok=True)
    for item in rescued.iterdir():
        shutil.copyfile(item, db.parent / item.name)
    await start(lab, "billing")
    await drain(lab)
    assert_money_rule(lab, fleet, 0, "billing database deleted, then restored")
