"""The commands a trainee meets first, as real processes against a network on ephemeral
ports (services in this process, each ``paylab`` command its own process): ``pay``
without ``--amount``, ``reverse`` twice and of a declined payment, ``txn``, ``lab reset``,
and every timestamp of the API records and the queue in UTC with its offset."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from gateway.saf_rules import SafState, SafView
from shared.store.db import utc_iso
from tests.proclab import Lab, new_lab, wait_until
from tests.support import admin_headers

SERVICES = ("hsm", "billing", "gateway", "acquirer")
#: A timestamp in ISO 8601 that ends with its UTC offset.
UTC_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00$")


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One network for the module (the tests use different bills)."""
    labs: list[Lab] = []
    lab = new_lab(labs, tmp_path_factory.mktemp("trainee"))
    lab.run_in_thread(*SERVICES)
    yield lab
    for each in labs:
        each.close()


def _id_of(stdout: str) -> str:
    match = re.search(r"^\s+id\s+(\w+)$", stdout, re.MULTILINE)
    assert match, stdout
    return match.group(1)


def test_pay_without_amount_pays_the_amount_due(net: Lab) -> None:
    done = net.cli("pay", "--bill", "PLN-0001")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "amount due 150000 for PLN-0001 (from an inquiry" in done.stdout
    assert "APPROVED payment 00" in done.stdout
    assert re.search(r"^\s+amount\s+150000$", done.stdout, re.MULTILINE)
    # The bill is paid now: the inquiry says so, and nothing is sent.
    again = net.cli("pay", "--bill", "PLN-0001")
    assert again.returncode == 2
    assert "DECLINED inquiry 88" in again.stdout
    assert "no amount due; nothing was paid" in again.stderr


def test_pay_without_amount_json_keeps_stdout_json(net: Lab) -> None:
    done = net.cli("pay", "--bill", "PLN-1014", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["amount"] == 72_800
    assert "amount due 72800" in done.stderr


def test_reverse_twice_says_already_reversed(net: Lab) -> None:
    paid = net.cli("pay", "--bill", "PLN-1015", "--amount", "250000")
    assert paid.returncode == 0, paid.stderr
    tx_id = _id_of(paid.stdout)
    first = net.cli("reverse", tx_id)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "APPROVED reversal 00" in first.stdout
    reversal_id = _id_of(first.stdout)
    second = net.cli("reverse", tx_id)
    assert second.returncode == 2
    assert second.stdout.startswith("ALREADY REVERSED")
    assert f"reversal {reversal_id}" in second.stdout
    as_json = json.loads(net.cli("reverse", tx_id, "--json").stdout)
    assert as_json["already_reversed"] is True and as_json["reversal"]["id"] == reversal_id


def test_reversing_a_declined_payment_says_declined(net: Lab) -> None:
    declined = net.cli("pay", "--bill", "PLN-1016", "--amount", "118650", "--pin", "9999")
    assert declined.returncode == 2
    assert "DECLINED payment 55" in declined.stdout
    done = net.cli("reverse", _id_of(declined.stdout))
    assert done.returncode == 2
    assert "NOT SENT" in done.stdout and "was declined (55" in done.stdout
    assert "unknown bill" not in done.stdout


def test_txn_by_id_and_by_rrn(net: Lab) -> None:
    paid = net.cli("pay", "--bill", "PLN-1017", "--amount", "305500")
    assert paid.returncode == 0, paid.stderr
    rrn = re.search(r"^\s+rrn\s+(\w+)$", paid.stdout, re.MULTILINE)
    assert rrn
    for ref in (_id_of(paid.stdout), rrn.group(1)):
        shown = net.cli("txn", ref, "--json")
        assert shown.returncode == 0, shown.stderr
        found = json.loads(shown.stdout)
        assert [r["bill"] for r in found["acquirer"]] == ["PLN-1017"]
        journal = found["gateway_journal"]
        assert [(r["mti"], r["response_code"]) for r in journal] == [("0200", "00")]
        assert all(UTC_STAMP.match(r["received_at"]) for r in journal)
    text = net.cli("txn", rrn.group(1))
    assert "acquirer" in text.stdout and "gateway journal" in text.stdout
    unknown = net.cli("txn", "000000000000")
    assert unknown.returncode == 1
    assert "no transaction 000000000000" in unknown.stdout


def test_acquirer_records_are_in_utc_with_offset(net: Lab) -> None:
    paid = net.cli("pay", "--bill", "PLN-1018", "--amount", "93100")
    assert paid.returncode == 0, paid.stderr
    record = httpx.get(f"{net.http('acquirer')}/transactions/{_id_of(paid.stdout)}").json()
    assert UTC_STAMP.match(record["created_at"]), record
    assert UTC_STAMP.match(record["completed_at"]), record


def test_transactions_by_rrn_needs_the_admin_token(net: Lab) -> None:
    url = f"{net.http('acquirer')}/transactions?rrn=000000000000"
    assert httpx.get(url).status_code == 401
    ok = httpx.get(url, headers=admin_headers(role="read"))
    assert ok.status_code == 200 and ok.json() == {"items": []}


def test_queue_entries_in_utc_with_offset(labs: list[Lab], tmp_path: Path) -> None:
    """Billing away: a stand-in payment waits in the queue; list and show give UTC times."""
    lab = new_lab(labs, tmp_path)
    lab.run_in_thread("hsm", "gateway", "acquirer")
    paid = lab.cli("pay", "--bill", "PLN-1019", "--amount", "167200", "--json")
    assert paid.returncode == 0, paid.stdout + paid.stderr
    assert json.loads(paid.stdout)["approval_code"].startswith("SI")
    listed = wait_until(
        lambda: lab.cli("saf", "list"), lambda done: "advice" in done.stdout, timeout=10
    )
    stamps = re.findall(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", listed.stdout)
    assert stamps, listed.stdout
    entry_id = re.search(r"│\s*(\d+)\s*│\s*advice", listed.stdout)
    assert entry_id, listed.stdout
    shown = json.loads(lab.cli("saf", "show", entry_id.group(1)).stdout)
    for key in ("created_at", "updated_at", "next_attempt_at"):
        assert UTC_STAMP.match(shown[key]), (key, shown[key])


def test_utc_iso_takes_naive_values_as_utc() -> None:
    naive = datetime(2026, 12, 7, 0, 22, 50, 579191)
    assert utc_iso(naive) == "2026-12-07T00:22:50.579191+00:00"
    view = SafView(
        *([1, "k", None, "advice", None, 1, SafState.QUEUED, "0220", "T", "A", "1", None]),
        *([None] * 5),
        *([0, 20, naive, None, None, None, None, None, naive, naive, None]),
    )
    shown = view.as_dict()
    assert shown["created_at"] == shown["next_attempt_at"] == "2026-12-07T00:22:50.579191+00:00"


def test_lab_reset_deletes_the_labs_data(labs: list[Lab], tmp_path: Path) -> None:
    lab = new_lab(labs, tmp_path)  # its ports: nothing listens on them
    data = tmp_path / "labs-data"
    data.mkdir()
    (data / "billing.db").write_bytes(b"")
    done = lab.cli("lab", "reset", "--data-dir", str(data))
    assert done.returncode == 0, done.stderr
    assert "deleted" in done.stdout and not data.exists()
    again = lab.cli("lab", "reset", "--data-dir", str(data))
    assert again.returncode == 0 and "nothing to reset" in again.stdout


def test_lab_reset_refuses_while_a_network_runs(labs: list[Lab], tmp_path: Path) -> None:
    lab = new_lab(labs, tmp_path)
    data = tmp_path / "labs-data"
    data.mkdir()
    (data / "gateway.db").write_bytes(b"")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", int(lab.env["PAYLAB_GATEWAY_HTTP_PORT"])))
        listener.listen()
        done = lab.cli("lab", "reset", "--data-dir", str(data))
    assert done.returncode == 1
    assert "a network is still running" in done.stderr
    assert (data / "gateway.db").exists()


def test_lab_reset_keeps_a_directory_that_is_not_paylab_data(
    labs: list[Lab], tmp_path: Path
) -> None:
    lab = new_lab(labs, tmp_path)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    done = lab.cli("lab", "reset", "--data-dir", str(other))
    assert done.returncode == 1 and "holds no paylab database" in done.stderr
    assert (other / "notes.txt").exists()


def test_locust_reports_leave_no_untracked_files() -> None:
    """The loadtests README writes reports under reports/: git ignores them."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(
        ["git", "check-ignore", "reports/run1_stats.csv", "var/labs/lab5_stats.csv"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["reports/run1_stats.csv", "var/labs/lab5_stats.csv"]


def test_skipped_postgres_tests_are_one_summary_line() -> None:
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "PAYLAB_TEST_POSTGRES_URL"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_postgres_network.py",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout
    lines = [line for line in done.stdout.splitlines() if "PAYLAB_TEST_POSTGRES_URL" in line]
    assert len(lines) == 1 and lines[0].startswith("skipped "), done.stdout
