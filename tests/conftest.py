"""Shared fixtures: a whole network on ephemeral ports in a temporary directory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from shared.lab.network import Network
from shared.ops.log import configure_logging
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
