"""Every service's ``/metrics`` carries the process and platform collectors' series, and
``promtool check metrics`` (package ``prometheus``; .ci/run installs it) accepts each live
exposition as it is scraped."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import trio

from tests.support import start_network

SERVICES = ("acquirer", "gateway", "billing", "hsm")
PROCESS_SERIES = (
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_start_time_seconds",
    "python_info",
)


async def test_every_live_metrics_page_has_process_series_and_passes_promtool(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    net = await start_network(nursery, tmp_path / "var")
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            for name in SERVICES:
                r = await client.get(f"http://127.0.0.1:{net.ports[name].http}/metrics")
                assert r.status_code == 200
                names = {line.split("{")[0].split(" ")[0] for line in r.text.splitlines()}
                for series in PROCESS_SERIES:
                    assert series in names, (name, series)
                checked = await trio.to_thread.run_sync(
                    lambda body=r.content: subprocess.run(
                        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60
                    )
                )
                # promtool exits 1 on a lint problem or a malformed page, and prints it.
                assert checked.returncode == 0, (name, checked.stdout, checked.stderr)
    finally:
        await net.stop()
