"""The money rule's pieces in one process, over real sockets and real SQLite databases.

* the gateway withholds an approval it cannot journal, and undoes the posting;
* the journal vetoes an approval of a payment the gateway is reversing (another replica's
  re-send), and the queue lists the gateway's reversals for a restarted gateway;
* the acquirer records what it answers terminals, which is what reconciliation reads;
* the migrations that add these facts fill them in for existing rows.

The same rules under real crashes, freezes and full disks: tests/test_outage.py.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import httpx
import trio
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, select, text

from acquirer.models import Transaction
from acquirer.service import AcquirerService
from billing.service import BillingService
from gateway.journal import Journal, journal_row
from gateway.models import JournalEntry
from gateway.saf_rules import NewEntry
from gateway.saf_store import SafStore
from gateway.service import GatewayService
from shared.iso import codec
from shared.iso.messages import idempotency_key
from shared.lab.network import Network
from shared.lab.reconcile.sources import load_client_facts, reconcile_databases
from shared.pan import PanHasher, mask_pan
from shared.store.db import DatabaseError, make_engine, session_factory, transaction, upgrade
from shared.store.vault import Vault
from tests.support import DEMO_PAN, DEMO_PIN, RawIsoClient, terminal_builder

PAN_HASH = PanHasher(b"test pan hashing key")
T0 = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)


def _gateway(net: Network) -> GatewayService:
    svc = net.services["gateway"]
    assert isinstance(svc, GatewayService)
    return svc


def _metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no series {series}")


# --------------------------------------------------------------------------------------------
# The gateway withholds what it cannot record


async def test_gateway_withholds_an_approval_it_cannot_journal(network: Network) -> None:
    """The gateway's database fails after billing posted: the acquirer is answered 96, the
    posting is reversed online at once, and reconciliation finds nothing wrong."""
    gateway = _gateway(network)
    gateway.db_fault.set_down(True)
    try:
        async with httpx.AsyncClient(timeout=20) as http:
            acquirer = f"http://127.0.0.1:{network.ports['acquirer'].http}"
            r = await http.post(
                acquirer + "/payments",
                json={"bill": "PLN-1005", "amount": 330_000, "pan": DEMO_PAN, "pin": DEMO_PIN},
            )
            metrics = (
                await http.get(f"http://127.0.0.1:{network.ports['gateway'].http}/metrics")
            ).text
    finally:
        gateway.db_fault.set_down(False)
    body = r.json()
    assert (body["response_code"], body["approved"]) == ("96", False), body
    assert "approval_code" not in body
    assert _metric(metrics, "paylab_journal_write_failures_total") == 1
    assert _metric(metrics, 'paylab_approvals_withheld_total{outcome="reversed_online"}') == 1
    billing = network.services["billing"]
    assert isinstance(billing, BillingService) and billing.store is not None
    [posting] = [p for p in billing.store.list_postings() if p.bill_number == "PLN-1005"]
    assert posting.status == "reversed"
    settings = network.settings
    report = await trio.to_thread.run_sync(
        lambda: reconcile_databases(
            settings.db_url("gateway"), settings.db_url("billing"), settings.db_url("acquirer")
        )
    )
    assert report.clean, report.mismatches
    assert (report.approved, report.posted, report.reversed) == (0, 0, 1)


# --------------------------------------------------------------------------------------------
# The journal's veto, and the reversals a restarted gateway remembers


def _payment(stan: str) -> dict[str, str]:
    return {
        "t": "0200",
        "2": DEMO_PAN,
        "3": "500000",
        "4": "000000010000",
        "7": "1207100000",
        "11": stan,
        "32": "008",
        "37": f"634110{stan}",
        "41": "TERM0001",
        "48": f"B-{stan}",
        "49": "360",
    }


def _reversal_of(payment: dict[str, str], origin: str) -> NewEntry:
    from gateway.standin import reversal_of

    rev = reversal_of(payment, T0)
    return NewEntry(
        idempotency_key=idempotency_key(rev),
        kind="reversal",
        mti="0420",
        message=codec.encode(rev),
        terminal_id=rev["41"],
        acquirer_id=rev["32"],
        stan=rev["11"],
        rrn=rev.get("37"),
        bill_number=rev.get("48"),
        amount=10_000,
        currency="360",
        pan_masked=mask_pan(DEMO_PAN),
        pan_hash=PAN_HASH(DEMO_PAN),
        max_attempts=3,
        original_key=idempotency_key(payment),
        origin=origin,
    )


def _gateway_db(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path}/gateway.db")
    upgrade(engine, "gateway:migrations")
    return engine


def test_journal_vetoes_an_approval_of_a_payment_the_gateway_reverses(tmp_path: Path) -> None:
    engine = _gateway_db(tmp_path)
    try:
        sessions = session_factory(engine)
        saf = SafStore(sessions, Vault.from_secret("test vault secret"))
        mine, theirs, cancelled, plain = (
            _payment(s) for s in ("000001", "000002", "000003", "000004")
        )
        saf.enqueue(_reversal_of(mine, "gateway"), now=T0)
        saf.enqueue(_reversal_of(theirs, "acquirer"), now=T0)
        saf.cancel(saf.enqueue(_reversal_of(cancelled, "gateway"), now=T0)[0].id, now=T0)
        assert saf.gateway_reversed() == {idempotency_key(mine)}

        rows = [
            journal_row(p, "00", received_at=T0, duration_ms=1.0, pan_hash=PAN_HASH)
            for p in (mine, theirs, cancelled, plain)
        ]
        declined = journal_row(mine, "55", received_at=T0, duration_ms=1.0, pan_hash=PAN_HASH)
        vetoed = Journal(sessions).write([*rows, declined])
        assert vetoed == {idempotency_key(mine)}
        with transaction(sessions, write=False) as s:
            written = s.execute(
                select(JournalEntry.stan, JournalEntry.response_code, JournalEntry.status)
            ).all()
        assert sorted(written) == [
            ("000001", "55", "declined"),
            ("000001", "68", "unknown"),  # answered 68, as the first time
            ("000002", "00", "approved"),
            ("000003", "00", "approved"),
            ("000004", "00", "approved"),
        ]
    finally:
        engine.dispose()


def test_journal_write_failure_raises_and_writes_nothing(tmp_path: Path) -> None:
    engine = _gateway_db(tmp_path)
    try:
        sessions = session_factory(engine)
        from shared.store.db import DatabaseFault

        fault = DatabaseFault()
        fault.attach(engine)
        fault.set_down(True)
        row = journal_row(
            _payment("000001"), "00", received_at=T0, duration_ms=1, pan_hash=PAN_HASH
        )
        try:
            Journal(sessions).write([row])
        except DatabaseError as exc:
            assert "journal write failed" in str(exc)
        else:
            raise AssertionError("the write did not fail")
        fault.set_down(False)
        with transaction(sessions, write=False) as s:
            assert s.execute(select(JournalEntry.id)).all() == []
    finally:
        engine.dispose()


# --------------------------------------------------------------------------------------------
# The acquirer records what terminals are told


async def test_acquirer_records_every_answer_given_to_a_terminal(network: Network) -> None:
    builder = terminal_builder("RECORD01")
    payment = builder.payment("PLN-1006", 47_500, DEMO_PAN, DEMO_PIN)
    inquiry = builder.inquiry("PLN-1007")
    client = await RawIsoClient.connect(network.ports["acquirer"].iso)
    try:
        first = await client.roundtrip(payment)
        repeat = await client.roundtrip(payment)  # a terminal re-sending the same bytes
        asked = await client.roundtrip(inquiry)
    finally:
        await client.aclose()
    assert (first["39"], repeat["39"], asked["39"]) == ("00", "00", "00")
    acquirer = network.services["acquirer"]
    assert isinstance(acquirer, AcquirerService) and acquirer.sessions is not None
    sessions = acquirer.sessions
    with transaction(sessions, write=False) as s:
        rows = s.execute(
            select(
                Transaction.channel,
                Transaction.kind,
                Transaction.idempotency_key,
                Transaction.response_code,
                Transaction.status,
                Transaction.pan_masked,
            ).where(Transaction.terminal_id == "RECORD01")
        ).all()
    key = idempotency_key(payment)
    # Two answers to the payment, none for the inquiry (it changes nothing).
    assert rows == [("terminal", "payment", key, "00", "approved", mask_pan(DEMO_PAN))] * 2
    facts = {f.key: f for f in load_client_facts(sessions) or []}
    assert facts[key].approved and facts[key].codes == ("00", "00")


# --------------------------------------------------------------------------------------------
# The migrations fill in the new facts for rows written before them


def _upgrade_to(engine: Engine, location: str, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", location)
    config.set_main_option("path_separator", "os")
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def test_acquirer_migration_gives_old_rows_their_keys(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/acquirer.db")
    try:
        _upgrade_to(engine, "acquirer:migrations", "a0001")
        # Rows as the first schema stored them: no channel and no keys yet.
        insert = text(
            "INSERT INTO transactions (id, kind, mti, stan, rrn, transmitted, acquirer_id, "
            "terminal_id, bill_number, amount, currency, status, original_id, created_at) "
            "VALUES (:id, :kind, :mti, :stan, :rrn, :sent, '008', 'PAYLAB01', 'PLN-0001', "
            "150000, '360', 'approved', :orig, :t)"
        )
        with engine.begin() as conn:
            conn.execute(
                insert,
                [
                    {
                        "id": "p1",
                        "kind": "payment",
                        "mti": "0200",
                        "stan": "000001",
                        "rrn": "634110000001",
                        "sent": "1207100000",
                        "orig": None,
                        "t": T0,
                    },
                    {
                        "id": "r1",
                        "kind": "reversal",
                        "mti": "0420",
                        "stan": "000002",
                        "rrn": "634110000002",
                        "sent": "1207100100",
                        "orig": "p1",
                        "t": T0,
                    },
                ],
            )
        upgrade(engine, "acquirer:migrations")
        with engine.connect() as conn:
            rows = dict(
                conn.execute(
                    text(
                        "SELECT id, channel || ' ' || idempotency_key || ' ' || "
                        "coalesce(original_key, '-') FROM transactions"
                    )
                ).all()
            )
        assert rows == {
            "p1": "api 008|PAYLAB01|000001|1207100000 -",
            "r1": "api 008|PAYLAB01|000002|1207100100 008|PAYLAB01|000001|1207100000",
        }
    finally:
        engine.dispose()


def test_gateway_migration_tells_who_decided_old_queue_entries(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/gateway.db")
    try:
        _upgrade_to(engine, "gateway:migrations", "g0003")
        sessions = session_factory(engine)
        vault = Vault.from_secret("test vault secret")
        after_68, asked = _payment("000001"), _payment("000002")
        with engine.begin() as conn:
            for p, code in ((after_68, "68"), (asked, "00")):
                conn.execute(
                    JournalEntry.__table__.insert().values(  # type: ignore[attr-defined]
                        **{
                            k: v
                            for k, v in journal_row(
                                p, code, received_at=T0, duration_ms=1, pan_hash=PAN_HASH
                            ).items()
                        }
                    )
                )
        # Entries as the previous schema stored them: no origin column yet.
        for p in (after_68, asked):
            entry = _reversal_of(p, "gateway")
            key_id, blob = vault.seal(entry.message, entry.idempotency_key.encode())
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO saf_entries (idempotency_key, original_key, kind, priority, "
                        "state, mti, terminal_id, acquirer_id, stan, key_id, payload, attempts, "
                        "max_attempts, next_attempt_at, created_at, updated_at) VALUES "
                        "(:k, :o, 'reversal', 100, 'done', '0420', 'TERM0001', '008', :s, :kid, "
                        ":p, 1, 3, :t, :t, :t)"
                    ),
                    {
                        "k": entry.idempotency_key,
                        "o": entry.original_key,
                        "s": entry.stan,
                        "kid": key_id,
                        "p": blob,
                        "t": T0,
                    },
                )
        upgrade(engine, "gateway:migrations")
        saf = SafStore(sessions, vault)
        assert saf.gateway_reversed() == {idempotency_key(after_68)}
    finally:
        engine.dispose()
