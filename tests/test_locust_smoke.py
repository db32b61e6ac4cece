"""CI smoke of the load tests: locust, headless, 20 s against an in-process network.

The network runs in this process (trio, ephemeral ports); locust runs as a subprocess (it
monkey-patches the standard library with gevent on import, so it is never imported here).
Any failure locust records (an unexpected response code, a MAC that does not verify, no
answer, an HTTP error) fails the test, through locust's exit code and the CSV totals.
"""

from __future__ import annotations

import csv
import importlib.util
import os
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
    async with trio.open_nursery() as nursery:
        net = await start_network(nursery, tmp_path / "var")
        try:
            prefix = tmp_path / "smoke"
            env = {k: v for k, v in os.environ.items() if not k.startswith("PAYLAB_")}
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
