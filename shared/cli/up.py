"""``paylab up`` (the whole network) and ``paylab acquirer|gateway|billing|hsm`` (one
service alone), in one process or one process per service."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from shared.cli.console import err, fail, load_settings
from shared.cli.options import DataDir

if TYPE_CHECKING:
    from shared.lab.network import Network

#: The services that run alone (``paylab <service>``), in the order of the help: the same
#: as :data:`shared.ops.settings.SERVICES` (a test keeps them equal), spelled out here so
#: that ``paylab --help`` does not load the settings.
SERVICES = ("acquirer", "gateway", "billing", "hsm")


def up(
    data_dir: DataDir = None,
    processes: Annotated[
        bool,
        typer.Option("--processes", help="Run each service in its own process (uses every core)."),
    ] = False,
    chaos: Annotated[
        bool,
        typer.Option("--chaos", help="Put fault-injection proxies between the services."),
    ] = False,
) -> None:
    """Start all four services in one process (SQLite under ./var by default).

    With --processes each service runs as `python -m shared.cli <service>`, started in
    order (each healthy before the next) and stopped in reverse order on Ctrl-C/SIGTERM.
    """
    if processes:
        if chaos:
            fail("--chaos runs in one process only; drop --processes (see docs/chaos.md)")
        _run_processes(data_dir)
        return
    _run_network(None, data_dir, chaos)


def service_command(name: str) -> Any:
    """``paylab <name>``: the service ``name`` alone."""

    def command(data_dir: DataDir = None) -> None:
        _run_network((name,), data_dir)

    command.__doc__ = f"Run the {name} service alone."
    return command


def _run_network(names: tuple[str, ...] | None, data_dir: Path | None, chaos: bool = False) -> None:
    """Run ``names`` (None: all four, in their start order) until Ctrl-C or SIGTERM."""
    import trio
    from rich.table import Table

    from shared.errors import PaylabError
    from shared.lab.network import START_ORDER, Network, run_until_signal
    from shared.ops.log import configure_logging

    settings = load_settings(data_dir)
    configure_logging(settings.log_level, settings.log_format)

    def started(ports: dict[str, Any]) -> None:
        table = Table(title="paylab is running", show_lines=False)
        table.add_column("service")
        table.add_column("HTTP")
        table.add_column("ISO-8583 / TCP")
        for name, p in ports.items():
            table.add_row(name, f"http://{settings.host}:{p.http}", f"{settings.host}:{p.iso}")
        err.print(table)
        if network.chaos is not None:
            _show_chaos_start(network, settings.host)
        if "acquirer" in ports:
            err.print("Make a first payment from another terminal, in this folder:")
            err.print(
                f"  [bold]{_self_command()} pay --bill PLN-0001 --amount 150000[/]", soft_wrap=True
            )
            err.print(
                f"  then [bold]{_self_command()} trace --last --fields[/] to read every message",
                soft_wrap=True,
            )
        if "gateway" in ports:
            err.print(
                f"Console in a browser: http://{settings.host}:{ports['gateway'].http}/console"
            )
        err.print("Ctrl-C stops the network (in-flight requests are answered first).")

    try:
        network = Network(settings, names or START_ORDER, chaos=chaos)
        trio.run(run_until_signal, network, started)
    except* (OSError, PaylabError) as group:
        exc: BaseException = group.exceptions[0]
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            fail(f"a port is already in use ({exc.strerror}); is paylab already running?")
        fail(f"cannot start: {exc}")


def _show_chaos_start(network: Network, host: str) -> None:
    """The chaos part of `paylab up --chaos`'s start table (stderr)."""
    from rich.table import Table

    assert network.chaos is not None
    table = Table(title="chaos proxies")
    for col in ("link", "listen", "forwards to"):
        table.add_column(col)
    for v in network.chaos.status():
        table.add_row(v["name"], v["listen"], v["target"])
    err.print(table)
    err.print(
        f"Chaos control: [bold]http://{host}:{network.chaos_port}/chaos[/] "
        "(`paylab chaos status`, docs/chaos.md)",
        soft_wrap=True,
    )


def _self_command() -> str:
    """How this ``paylab`` was invoked, so the hint works inside a virtual environment."""
    exe = Path(sys.argv[0])
    if (
        exe.name == "paylab"
        and exe.parent != Path()
        and str(exe.parent) not in os.environ.get("PATH", "").split(os.pathsep)
    ):
        return str(exe)
    return "paylab"


def _run_processes(data_dir: Path | None) -> None:
    """``paylab up --processes``: exit 0 after a clean stop, 1 when a service died."""
    import signal
    import time

    from rich.table import Table

    from shared.lab.network import ChildDied, ProcessNetwork

    settings = load_settings(data_dir)
    network = ProcessNetwork(settings)
    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            ports = network.start()
        except (ChildDied, TimeoutError) as exc:
            fail(f"cannot start: {exc} (is a port in use, or paylab already running?)")
        table = Table(title="paylab is running (one process per service)")
        for col in ("service", "pid", "HTTP", "ISO-8583 / TCP"):
            table.add_column(col)
        for name, p in ports.items():
            table.add_row(
                name,
                str(network.procs[name].pid),
                f"http://{settings.host}:{p.http}",
                f"{settings.host}:{p.iso}",
            )
        err.print(table)
        err.print("Ctrl-C stops the network (acquirer first, each drained in turn).")
        while not stopping:
            dead = network.dead()
            if dead:
                name, code = next(iter(dead.items()))
                err.print(f"[bold red]error:[/] the {name} process exited with code {code}")
                network.stop()
                raise typer.Exit(1)
            time.sleep(0.2)
        codes = network.stop()
    finally:
        network.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    bad = {n: c for n, c in codes.items() if c != 0}
    if bad:
        fail("unclean stop: " + ", ".join(f"{n} exited {c}" for n, c in bad.items()))
