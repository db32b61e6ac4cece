"""``paylab lab reset``: the course starts over (fresh bills, an empty queue, zero counters)
by deleting the labs' data directory, ``var/labs`` by default (docs/labs/lab.env). It
refuses while a network still answers on the configured ports: the services hold the
databases open, and a directory deleted under them would come back half-made."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from shared.cli.console import fail, load_settings, out

#: The labs' data directory (PAYLAB_DATA_DIR of docs/labs/lab.env).
LABS_DATA_DIR = Path("var/labs")


def listening_ports(host: str, ports: list[int], timeout: float = 0.3) -> list[int]:
    """The ports of ``ports`` that accept a TCP connection on ``host``."""
    import socket

    taken = []
    for port in ports:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                taken.append(port)
        except OSError:
            pass
    return taken


def reset(
    data_dir: Annotated[
        Path,
        typer.Option("--data-dir", help="The labs' data directory to delete."),
    ] = LABS_DATA_DIR,
) -> None:
    """Start the course labs over: delete their data directory (default var/labs).

    Exit 1, deleting nothing, while a service answers on the configured ports (stop the
    network first) or when the directory holds something else than paylab's data."""
    s = load_settings()
    ports = [
        s.acquirer_http_port,
        s.gateway_http_port,
        s.billing_http_port,
        s.hsm_http_port,
    ]
    busy = listening_ports(s.host, ports)
    if busy:
        fail(
            f"a network is still running ({'ports' if len(busy) > 1 else 'port'} "
            f"{', '.join(map(str, busy))} of {s.host} answer{'' if len(busy) > 1 else 's'}): "
            "stop it first (Ctrl-C in its terminal), then reset"
        )
    if not data_dir.exists():
        out.print(f"{data_dir} does not exist: nothing to reset; `paylab up --chaos` starts afresh")
        return
    names = {p.name for p in data_dir.iterdir()}
    if names and not any(n.endswith((".db", ".sqlite", ".sqlite3")) for n in names):
        fail(f"{data_dir} holds no paylab database; not deleting it")
    shutil.rmtree(data_dir)
    out.print(
        f"deleted {data_dir}: the next `paylab up --chaos` starts the labs over "
        "(fresh bills, empty queue, zero counters)"
    )
