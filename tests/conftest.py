"""Shared fixtures: a whole network on ephemeral ports in a temporary directory."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from shared.lab.network import Network
from shared.ops.log import configure_logging
from tests.proclab import Lab
from tests.support import start_network


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    configure_logging("warning", "json")


@pytest.fixture
async def network(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Network]:
    """The four services, started in order, stopped (drained) at the end of the test."""
    net = await start_network(nursery, tmp_path)
    yield net
    await net.stop()


@pytest.fixture
def labs() -> Iterator[list[Lab]]:
    """The labs a test makes (see tests.proclab.new_lab): at the end, every process still
    running is killed and every in-process service stopped, whatever the outcome."""
    labs: list[Lab] = []
    yield labs
    for lab in labs:
        lab.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line per skip reason, with its count, instead of one line per skipped test
    (``-ra`` would print one per location: 76 for the PostgreSQL tests alone)."""
    counts: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        counts[reason.removeprefix("Skipped: ")] += 1
    for reason, n in sorted(counts.items()):
        terminalreporter.write_line(f"skipped {n} test{'s' if n != 1 else ''}: {reason}")
