"""billing.ledger: a database that vanished or was swapped is said, never served or re-seeded.

The start-up rules (pure), the guard on a real SQLite file (deleted, replaced, its identity
swapped), billing refusing to start on a lost ledger, and `paylab db seed`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from sqlalchemy import Engine, text

from billing.ledger import (
    MARKER_NAME,
    LedgerGuard,
    LedgerLost,
    Start,
    decide,
    open_ledger,
    read_marker,
)
from billing.service import BillingService
from billing.store import BillingStore
from shared.db import connection_transaction, make_engine, session_factory, upgrade
from tests.support import lab_settings

# --------------------------------------------------------------------------------------------
# The start-up rules


@pytest.mark.parametrize(
    ("db_ledger", "has_data", "marker", "start"),
    [
        (None, False, None, Start.NEW),  # a new network
        (None, True, None, Start.ADOPT),  # a ledger of an older version
        ("L1", True, None, Start.SAME),  # served from another data directory first
        ("L1", True, "L1", Start.SAME),
        ("L1", False, "L1", Start.SAME),  # an empty ledger is still that ledger
    ],
)
def test_decide_serves(
    db_ledger: str | None, has_data: bool, marker: str | None, start: Start
) -> None:
    decision = decide(db_ledger=db_ledger, db_has_data=has_data, marker=marker)
    assert decision.start is start
    assert decision.ledger_id == db_ledger


@pytest.mark.parametrize(
    ("db_ledger", "has_data", "marker", "said"),
    [
        (None, False, "L1", "is empty"),  # deleted: a new empty file in its place
        (None, True, "L1", "another ledger"),  # replaced by data without an id
        ("L2", True, "L1", "replaced"),  # replaced by another network's ledger
    ],
)
def test_decide_refuses_a_lost_ledger(
    db_ledger: str | None, has_data: bool, marker: str, said: str
) -> None:
    with pytest.raises(LedgerLost, match=said) as caught:
        decide(db_ledger=db_ledger, db_has_data=has_data, marker=marker)
    assert "L1" in str(caught.value)


# --------------------------------------------------------------------------------------------
# The guard, on a real file


def _ledger_db(path: Path) -> tuple[Engine, BillingStore, str]:
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine, "billing:migrations")
    store = BillingStore(session_factory(engine))
    _, ledger_id = open_ledger(store, path.parent, lambda: None)
    return engine, store, ledger_id


def _check(engine: Engine, guard: LedgerGuard) -> None:
    with connection_transaction(engine, write=False) as conn:
        guard.check(conn)


def test_guard_passes_while_the_ledger_is_in_place(tmp_path: Path) -> None:
    engine, _, ledger_id = _ledger_db(tmp_path / "billing.db")
    try:
        guard = LedgerGuard(engine, ledger_id)
        guard.check_file()
        _check(engine, guard)
        assert guard.lost is None
        assert read_marker(tmp_path) == ledger_id
        assert (tmp_path / MARKER_NAME).read_text().strip() == ledger_id
    finally:
        engine.dispose()


def test_guard_notices_a_deleted_file_and_stays_lost(tmp_path: Path) -> None:
    db = tmp_path / "billing.db"
    engine, _, ledger_id = _ledger_db(db)
    try:
        guard = LedgerGuard(engine, ledger_id)
        db.unlink()
        with pytest.raises(LedgerLost, match="deleted"):
            guard.check_file()
        # A file at that path again (a new empty database) does not bring it back.
        db.write_bytes(b"")
        with pytest.raises(LedgerLost, match="deleted"):
            guard.check_file()
        assert guard.lost is not None
    finally:
        engine.dispose()


def test_guard_notices_a_file_replaced_under_it(tmp_path: Path) -> None:
    db = tmp_path / "billing.db"
    engine, _, ledger_id = _ledger_db(db)
    try:
        guard = LedgerGuard(engine, ledger_id)
        shutil.copyfile(db, tmp_path / "copy.db")
        os.replace(tmp_path / "copy.db", db)  # same content, another file
        with pytest.raises(LedgerLost, match="replaced"):
            guard.check_file()
    finally:
        engine.dispose()


def test_guard_notices_another_ledger_id(tmp_path: Path) -> None:
    engine, _, ledger_id = _ledger_db(tmp_path / "billing.db")
    try:
        guard = LedgerGuard(engine, ledger_id)
        with connection_transaction(engine, write=True) as conn:
            conn.execute(text("UPDATE ledger SET ledger_id = 'someone-else'"))
        with pytest.raises(LedgerLost, match="someone-else"):
            _check(engine, guard)
    finally:
        engine.dispose()


def test_a_write_of_a_lost_ledger_is_rolled_back(tmp_path: Path) -> None:
    """The guard runs before the commit: a payment into a deleted file is not approved."""
    from tests.test_billing_store import fake_pvv, pan_hash, payment

    db = tmp_path / "billing.db"
    engine, store, ledger_id = _ledger_db(db)
    try:
        assert store.seed_demo_data(pan_hash, fake_pvv)
        guard = LedgerGuard(engine, ledger_id)
        store.set_guard(guard.check)
        assert store.pay(payment()).code == "00"
        db.unlink()
        with pytest.raises(LedgerLost):
            store.pay(payment("acq|term0001|000009|1122060000", bill="PLN-0002"))
    finally:
        engine.dispose()


# --------------------------------------------------------------------------------------------
# Billing's start


async def _prepare(data_dir: Path) -> BillingService:
    service = BillingService(lab_settings(data_dir))
    await service.prepare()
    return service


async def test_billing_seeds_a_new_network_once_and_refuses_a_lost_ledger(tmp_path: Path) -> None:
    service = await _prepare(tmp_path)
    assert service.store is not None and service.guard is not None
    ledger_id = service.guard.ledger_id
    assert await trio.to_thread.run_sync(service.store.postings_count) == 0
    assert service.store.ledger_state() == (ledger_id, True)  # seeded
    await service.close_resources()
    # Started again on the same database: the same ledger, nothing seeded again.
    again = await _prepare(tmp_path)
    assert again.guard is not None and again.guard.ledger_id == ledger_id
    await again.close_resources()
    # The database deleted: billing must not create and seed a new ledger.
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"billing.db{suffix}").unlink(missing_ok=True)
    with pytest.raises(LedgerLost, match="deleted or replaced"):
        await _prepare(tmp_path)


def _paylab(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYLAB_")}
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args, "--data-dir", str(data_dir)],
        env=env,
        cwd=data_dir.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_paylab_db_seed(tmp_path: Path) -> None:
    data = tmp_path / "var"
    first = _paylab("db", "seed", data_dir=data)
    assert first.returncode == 0, first.stderr
    assert "new ledger created and seeded" in first.stdout
    again = _paylab("db", "seed", data_dir=data)
    assert again.returncode == 0 and "already in place" in again.stdout
    (data / "billing.db").unlink()
    refused = _paylab("db", "seed", data_dir=data)
    assert refused.returncode == 1
    assert "deleted or replaced" in refused.stderr and "--new-ledger" in refused.stderr
    fresh = _paylab("db", "seed", "--new-ledger", data_dir=data)
    assert fresh.returncode == 0 and "new ledger created" in fresh.stdout
    assert read_marker(data) not in (None, first.stdout)
