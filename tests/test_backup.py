"""Backup and recovery: ``paylab db backup`` / ``paylab db restore`` and the drill.

The disaster-recovery drill runs every service as its own ``paylab`` process: payments,
an online backup, more payments, the data directory destroyed, a restore, and then
``paylab reconcile --receipts`` names exactly the payments approved after the backup as
lost (the RPO) and nothing else, while billing starts on the restored ledger.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from billing.ledger import read_marker
from shared.lab.backup import (
    BackupError,
    BackupInvalid,
    Manifest,
    backup,
    restore,
    verify,
)
from shared.lab.reconcile.receipts import RECEIPT_KEY, receipt_facts
from shared.store.db import make_engine, upgrade
from tests.proclab import (
    BILL_AMOUNT,
    Lab,
    bill_numbers,
    new_lab,
    prepare_billing_db,
)
from tests.support import DEMO_PAN, DEMO_PIN, POSTGRES_URL, lab_settings, postgres_schema

NETWORK = ("hsm", "billing", "gateway", "acquirer")


def pay(lab: Lab, bill: str) -> dict[str, Any]:
    r = httpx.post(
        lab.http("acquirer") + "/payments",
        json={"bill": bill, "amount": BILL_AMOUNT, "pan": DEMO_PAN, "pin": DEMO_PIN},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["response_code"] == "00", body
    return body


def test_disaster_recovery_drill_loses_exactly_the_payments_after_the_backup(
    tmp_path: Path, labs: list[Lab]
) -> None:
    lab = new_lab(labs, tmp_path)
    settings = lab.settings()
    bills = bill_numbers("DR", 10)
    prepare_billing_db(settings.db_url("billing"), bills, settings.pan_hash_key)
    lab.start(*NETWORK)
    receipts = tmp_path / "receipts.jsonl"

    before = [pay(lab, bill) for bill in bills[:6]]
    made = lab.cli("db", "backup", "--to", str(tmp_path / "backup"))
    assert made.returncode == 0, made.stdout + made.stderr
    assert "billing: sqlite billing.db" in made.stdout
    after = [pay(lab, bill) for bill in bills[6:]]
    # The clients' receipts: JSON lines, and pretty-printed as `paylab pay --json` appends.
    receipts.write_text(
        "".join(json.dumps(r) + "\n" for r in before)
        + "".join(json.dumps(r, indent=2) + "\n" for r in after)
    )
    ledger = read_marker(lab.data_dir)
    assert ledger is not None

    for name in reversed(NETWORK):
        lab.stop(name)
    shutil.rmtree(lab.data_dir)  # the disaster: every database and the ledger marker

    started = time.monotonic()
    restored = lab.cli("db", "restore", str(tmp_path / "backup"))
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert read_marker(lab.data_dir) == ledger
    lab.start(*NETWORK)  # billing starts on the restored ledger (the marker agrees)
    rto = time.monotonic() - started
    assert lab.get("billing", "/health")["status"] == "ok"

    checked = lab.cli("reconcile", "--json", "--receipts", str(receipts))
    assert checked.returncode == 1, checked.stdout + checked.stderr  # something is lost
    report = json.loads(checked.stdout)
    lost = {m["key"] for m in report["mismatches"] if m["kind"] == "lost"}
    assert lost == {RECEIPT_KEY + r["rrn"] for r in after}
    assert len(report["mismatches"]) == len(after)  # nothing else
    assert report["posted"] == len(before)

    lab7 = lab.cli(
        "lab", "check", "7", "--backup", str(tmp_path / "backup"), "--receipts", str(receipts)
    )
    assert lab7.returncode == 0, lab7.stdout + lab7.stderr
    assert "Lab 7 done" in lab7.stdout

    # The bills paid after the backup are open again on the restored ledger: paid again
    # once, by hand or by the client, they are posted once.
    again = pay(lab, bills[6])
    assert again["response_code"] == "00"
    print(f"drill: RTO {rto:.2f} s (restore + start to ready), RPO {len(after)} payments")


def backed_up_network(tmp_path: Path, labs: list[Lab]) -> tuple[Lab, Path]:
    lab = new_lab(labs, tmp_path)
    settings = lab.settings()
    prepare_billing_db(settings.db_url("billing"), bill_numbers("BK", 2), settings.pan_hash_key)
    lab.start(*NETWORK)
    pay(lab, "BK-00001")
    target = tmp_path / "backup"
    manifest = backup(settings, target)
    assert set(manifest.databases) == {"acquirer", "gateway", "billing"}
    return lab, target


def test_backup_manifest_holds_revisions_rows_and_checksums(
    tmp_path: Path, labs: list[Lab]
) -> None:
    lab, target = backed_up_network(tmp_path, labs)
    data = json.loads((target / "manifest.json").read_text())
    manifest = Manifest.from_dict(data)
    billing = manifest.databases["billing"]
    assert billing.schema_revision and billing.kind == "sqlite"
    assert billing.rows["postings"] == 1
    assert manifest.databases["acquirer"].rows["transactions"] >= 1
    assert manifest.ledger_id == read_marker(lab.data_dir)
    assert len(billing.sha256) == 64
    assert verify(target) == manifest
    # The copy is one self-contained file: no write-ahead log belongs to it.
    assert not list(target.glob("*-wal"))
    with pytest.raises(BackupError, match="not empty"):
        backup(lab.settings(), target)


def test_restore_refuses_a_running_network(tmp_path: Path, labs: list[Lab]) -> None:
    lab, target = backed_up_network(tmp_path, labs)
    before = (lab.data_dir / "billing.db").stat().st_mtime_ns
    with pytest.raises(BackupError, match="stop the network first"):
        restore(lab.settings(), target)
    assert (lab.data_dir / "billing.db").stat().st_mtime_ns == before


DAMAGES = ("flip", "truncate", "manifest_rows", "no_manifest", "ledger")


def damaged(good: Path, damage: str) -> Path:
    """A copy of the backup ``good`` with one ``damage``."""
    target = good.with_name(f"backup-{damage}")
    shutil.copytree(good, target)
    manifest_path = target / "manifest.json"
    data = json.loads(manifest_path.read_text())
    if damage == "flip":
        raw = bytearray((target / "gateway.db").read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (target / "gateway.db").write_bytes(bytes(raw))
    elif damage == "truncate":
        with open(target / "billing.db", "r+b") as f:
            f.truncate(4096)
    elif damage == "manifest_rows":
        data["databases"]["billing"]["rows"]["postings"] = 7
        manifest_path.write_text(json.dumps(data))
    elif damage == "ledger":
        data["ledger_id"] = "0" * 32
        manifest_path.write_text(json.dumps(data))
    else:
        manifest_path.unlink()
    return target


def test_restore_refuses_a_backup_that_does_not_verify(tmp_path: Path, labs: list[Lab]) -> None:
    lab, good = backed_up_network(tmp_path, labs)
    for name in reversed(NETWORK):
        lab.stop(name)
    files = {p.name: p.read_bytes() for p in lab.data_dir.glob("*.db")}
    marker = read_marker(lab.data_dir)
    for damage in DAMAGES:
        target = damaged(good, damage)
        with pytest.raises(BackupInvalid):
            restore(lab.settings(), target)
        assert {p.name: p.read_bytes() for p in lab.data_dir.glob("*.db")} == files, damage
        assert read_marker(lab.data_dir) == marker
    refused = lab.cli("db", "restore", str(good.with_name("backup-flip")))
    assert refused.returncode == 1
    assert "does not match its SHA-256" in " ".join(refused.stderr.split())
    assert verify(good).ledger_id == marker  # the good one still verifies


def test_restore_removes_a_stale_write_ahead_log(tmp_path: Path) -> None:
    """A ``-wal`` file left beside the target would be replayed into the restored file."""
    settings = lab_settings(tmp_path / "var")
    url = settings.db_url("gateway")
    upgrade(url, "gateway:migrations")
    backup(settings, tmp_path / "b", services=["gateway"])
    wal = tmp_path / "var" / "gateway.db-wal"
    wal.write_bytes(b"stale")
    done = restore(settings, tmp_path / "b")
    assert not wal.exists()
    assert set(done.targets) == {"gateway"}
    conn = sqlite3.connect(tmp_path / "var" / "gateway.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def test_receipts_become_client_facts_only_when_unknown() -> None:
    receipts = [
        {"rrn": "1", "kind": "payment", "response_code": "00", "approved": True, "amount": 5},
        {"rrn": "2", "kind": "payment", "response_code": "51", "approved": False},
        {"rrn": "3", "kind": "reversal", "response_code": "00"},
        {"rrn": "4", "kind": "payment", "response_code": "00"},
    ]
    facts = receipt_facts(receipts, {"4"})
    assert [(f.key, f.approved, f.amount) for f in facts] == [
        (RECEIPT_KEY + "1", True, 5),
        (RECEIPT_KEY + "2", False, None),
    ]


def test_lab7_check_findings() -> None:
    from dataclasses import replace

    from shared.lab.course import LabSnapshot, Recovery, check
    from shared.lab.top import Snapshot

    ledger = "ab" * 16
    health = {"billing": {"status": "ok", "dependencies": {"ledger": f"ledger {ledger}"}}}
    net = Snapshot.build(0.0, {})
    good = Recovery(
        "b", ledger_id=ledger, approved_after=frozenset({"1", "2"}), lost=frozenset({"1", "2"})
    )

    def bad(recovery: Recovery | None, health_: Any = health) -> list[str]:
        return [f.what for f in check(7, LabSnapshot(net, health_, recovery=recovery)) if not f.ok]

    assert bad(good) == []
    assert bad(None) == ["a backup to check"]
    assert bad(replace(good, backup_error="x does not match"))[0].startswith("the backup b")
    assert bad(good, {"billing": {"dependencies": {"ledger": "ledger other"}}}) == [
        f"billing serves the backup's ledger {ledger}"
    ]
    assert bad(replace(good, lost=frozenset({"1"})))[0].startswith("reconciliation reports")
    assert bad(replace(good, other=2)) == ["nothing else mismatched (2)"]
    assert bad(replace(good, approved_after=frozenset(), lost=frozenset())) == [
        "payments approved after the backup: 0"
    ]


@pytest.mark.skipif(not POSTGRES_URL, reason="PAYLAB_TEST_POSTGRES_URL is not set")
def test_postgres_backup_and_restore_with_pg_dump(tmp_path: Path) -> None:
    """PostgreSQL databases (each a schema of its own here) go through pg_dump and
    pg_restore: after changes, a restore brings back exactly the rows of the backup."""
    if shutil.which("pg_dump") is None or shutil.which("pg_restore") is None:
        pytest.skip("pg_dump/pg_restore are not installed (apt-get install postgresql-client)")
    with (
        postgres_schema("bk_acq") as acquirer_url,
        postgres_schema("bk_gw") as gateway_url,
        postgres_schema("bk_bill") as billing_url,
    ):
        settings = lab_settings(
            tmp_path / "var",
            acquirer_db_url=acquirer_url,
            gateway_db_url=gateway_url,
            billing_db_url=billing_url,
        )
        upgrade(acquirer_url, "acquirer:migrations")
        upgrade(gateway_url, "gateway:migrations")
        prepare_billing_db(billing_url, bill_numbers("PG", 3), settings.pan_hash_key)
        engine = make_engine(billing_url)
        try:
            with engine.begin() as conn:
                conn.execute(
                    text("INSERT INTO ledger (id, ledger_id, created_at) VALUES (1, :l, now())"),
                    {"l": "c" * 32},
                )
            manifest = backup(settings, tmp_path / "b")
            assert {c.kind for c in manifest.databases.values()} == {"postgres"}
            assert manifest.ledger_id == "c" * 32
            bills = manifest.databases["billing"].rows["bills"]
            with engine.begin() as conn:
                conn.execute(text("DELETE FROM bills WHERE bill_number = 'PG-00001'"))
            assert verify(tmp_path / "b") == manifest
            done = restore(settings, tmp_path / "b")
            assert set(done.targets) == {"acquirer", "gateway", "billing"}
            assert ":paylab@" not in done.targets["billing"]  # no password shown
            with engine.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM bills")).scalar() == bills
            assert read_marker(settings.data_dir) == "c" * 32
        finally:
            engine.dispose()
