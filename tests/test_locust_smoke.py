"""CI smoke of the load tests: locust, headless, 20 s against an in-process network.

The network runs in this process (trio, ephemeral ports); locust runs as a subprocess (it
monkey-patches the standard library with gevent on import, so it is never imported here).
Any failure locust records (an unexpected response code, a MAC that does not verify, no
answer, an HTTP error) fails the test, through locust's exit code and the CSV totals. The
terminals pay generated bills added with ``paylab bills add`` (``PAYLAB_LOAD_BILLS``), so
their payments are approved throughout the run.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.support import start_network

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None,
    reason="locust is not installed (pip install locust: the 'load' extra)",
)


def _stats(csv_prefix: Path) -> dict[str, dict[str, str]]:
    """Rows of locust's ``<prefix>_stats.csv`` by request name."""
    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


@pytest.mark.timeout(90)
async def test_locust_smoke_run_has_no_failures(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYLAB_")}
    added = subprocess.run(
        [sys.executable, "-m", "shared.cli", "bills", "add", "3000", "--data-dir", "var"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    hint = re.search(r"PAYLAB_LOAD_BILLS=(\S+)", added.stdout)
    assert hint is not None and hint.group(1) == "LOAD:3000", added.stdout
    env["PAYLAB_LOAD_BILLS"] = hint.group(1)
    async with trio.open_nursery() as nursery:
        net = await start_network(nursery, tmp_path / "var")
        try:
            prefix = tmp_path / "smoke"
            cmd = [
                sys.executable,
                "-m",
                "locust",
                "-f",
                "loadtests/locustfile.py",
                "--headless",
                "-u",
                "10",
                "-r",
                "5",
                "-t",
                "20s",
                "--stop-timeout",
                "5",
                "--host",
                f"http://127.0.0.1:{net.ports['acquirer'].http}",
                "--iso-target",
                f"127.0.0.1:{net.ports['gateway'].iso}",
                "--csv",
                str(prefix),
                "--only-summary",
                "--loglevel",
                "WARNING",
            ]
            with trio.fail_after(60):
                proc = await trio.run_process(
                    cmd, cwd=ROOT, env=env, check=False, capture_stdout=True, capture_stderr=True
                )
        finally:
            await net.stop()
    output = (proc.stdout + proc.stderr).decode(errors="replace")[-6000:]
    assert proc.returncode == 0, output
    stats = _stats(prefix)
    total = stats["Aggregated"]
    assert int(total["Failure Count"]) == 0, output
    assert int(total["Request Count"]) >= 50, output
    for name in ("0200 inquiry [normal]", "0200 payment [normal]", "POST /payments"):
        assert int(stats[name]["Request Count"]) > 0, f"{name} never ran\n{output}"
    # Generated bills: payments were approved and posted, not just answered 88.
    with sqlite3.connect(tmp_path / "var" / "billing.db") as db:
        (posted,) = db.execute(
            "SELECT count(*) FROM postings WHERE bill_number LIKE 'LOAD-%'"
        ).fetchone()
    assert posted > 0, output
