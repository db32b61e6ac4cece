"""The ``paylab`` command line (typer + rich).

Every command turns expected failures (nothing listening, a port in use, a bad value)
into one clear line and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from shared.errors import PaylabError
from shared.settings import SERVICES, Settings, load_settings

app = typer.Typer(
    name="paylab",
    help="paylab: an ISO-8583 bill-payment network simulator.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")


class _Console(Console):
    """A console that falls silent when its reader goes away (``paylab pay | head -1``).

    rich's default exits with status 1 on a broken pipe, which would hide the outcome a
    script reads from the exit code; here the output is dropped and the command goes on.
    """

    def on_broken_pipe(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, (sys.stderr if self.stderr else sys.stdout).fileno())
        os.close(devnull)
        self.quiet = True


out = _Console()
err = _Console(stderr=True)

DEMO_PAN = "4761739001010010"
DEMO_PIN = "1234"

DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="Where the SQLite files go (default ./var).")
]
Url = Annotated[
    str | None,
    typer.Option("--url", help="Acquirer HTTP API (default http://<host>:<acquirer_http_port>)."),
]


def fail(message: str, code: int = 1) -> None:
    """Print one line to stderr and exit."""
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _settings(data_dir: Path | None = None) -> Settings:
    try:
        overrides: dict[str, Any] = {}
        if data_dir is not None:
            overrides["data_dir"] = data_dir
        return load_settings(**overrides)
    except Exception as exc:  # pydantic's ValidationError: show it as a configuration error
        fail(f"invalid configuration: {exc}")
        raise  # unreachable


def _run_network(names: tuple[str, ...], data_dir: Path | None) -> None:
    import trio

    from shared.log import configure_logging
    from shared.network import Network, run_until_signal

    settings = _settings(data_dir)
    configure_logging(settings.log_level, settings.log_format)

    def started(ports: dict[str, Any]) -> None:
        table = Table(title="paylab is running", show_lines=False)
        table.add_column("service")
        table.add_column("HTTP")
        table.add_column("ISO-8583 / TCP")
        for name, p in ports.items():
            table.add_row(name, f"http://{settings.host}:{p.http}", f"{settings.host}:{p.iso}")
        err.print(table)
        if "acquirer" in ports:
            err.print("Make a first payment from another terminal, in this folder:")
            err.print(
                f"  [bold]{_self_command()} pay --bill PLN-0001 --amount 150000[/]", soft_wrap=True
            )
        err.print("Ctrl-C stops the network (in-flight requests are answered first).")

    try:
        network = Network(settings, names)
        trio.run(run_until_signal, network, started)
    except* (OSError, PaylabError) as group:
        exc: BaseException = group.exceptions[0]
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            fail(f"a port is already in use ({exc.strerror}); is paylab already running?")
        fail(f"cannot start: {exc}")


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


@app.command()
def up(data_dir: DataDir = None) -> None:
    """Start all four services in one process (SQLite under ./var by default)."""
    _run_network(("hsm", "billing", "gateway", "acquirer"), data_dir)


def _single(name: str) -> Any:
    def command(data_dir: DataDir = None) -> None:
        _run_network((name,), data_dir)

    command.__doc__ = f"Run the {name} service alone."
    return command


for _name in SERVICES:
    app.command(name=_name)(_single(_name))


def _api(url: str | None) -> str:
    if url:
        return url.rstrip("/")
    s = _settings()
    return f"http://{s.host}:{s.acquirer_http_port}"


def _post(url: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    import httpx

    settings = _settings()
    try:
        r = httpx.post(url + path, json=body or {}, timeout=settings.gateway_timeout + 5)
    except httpx.ConnectError:
        fail(f"nothing is listening on {url} (start the network with `paylab up`)")
        raise  # unreachable
    except httpx.HTTPError as exc:
        fail(f"request to {url} failed: {exc}")
        raise
    try:
        data: dict[str, Any] = r.json()
    except ValueError:
        fail(f"{url} answered HTTP {r.status_code} without JSON")
        raise
    if r.status_code in (400, 404, 422):
        detail = "; ".join(f"{d['field']}: {d['problem']}" for d in data.get("details", []))
        fail(f"{data.get('error', r.status_code)}" + (f" ({detail})" if detail else ""))
    return data


def _show(data: dict[str, Any], as_json: bool) -> None:
    """Print an outcome; exit 0 only when approved (2 otherwise), even if stdout is closed."""
    if as_json:
        out.print_json(json.dumps(data))
    else:
        code = data.get("response_code") or "--"
        colour = "green" if data.get("approved") else "red"
        out.print(
            f"[bold {colour}]{data.get('status', '?').upper()}[/] "
            f"{data.get('kind', '')} {code} {data.get('message', '')}"
        )
        shown = ["bill", "amount", "amount_due", "biller", "customer", "rrn", "stan", "id"]
        if data.get("kind") == "inquiry":
            shown.remove("amount")  # an inquiry carries no amount; amount_due is the answer
        for key in shown:
            if data.get(key) not in (None, "") and not (key == "amount_due" and not data[key]):
                out.print(f"  {key:<10} {data[key]}")
    if not data.get("approved"):  # a 00 that could not be authenticated is no success
        raise typer.Exit(2)


JsonOpt = Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")]


@app.command()
def pay(
    bill: Annotated[str, typer.Option(help="Bill number, e.g. PLN-0001.")],
    amount: Annotated[int, typer.Option(help="Amount in minor units (must match the bill).")],
    pan: Annotated[str, typer.Option(help="Card number (demo card by default).")] = DEMO_PAN,
    pin: Annotated[str, typer.Option(help="PIN (the demo card's PIN by default).")] = DEMO_PIN,
    url: Url = None,
    as_json: JsonOpt = False,
) -> None:
    """Pay a bill through the running acquirer. Exit code 0 only when approved."""
    _show(
        _post(_api(url), "/payments", {"bill": bill, "amount": amount, "pan": pan, "pin": pin}),
        as_json,
    )


@app.command()
def inquire(
    bill: Annotated[str, typer.Option(help="Bill number, e.g. PLN-0001.")],
    url: Url = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask for a bill's amount due through the running acquirer."""
    _show(_post(_api(url), "/inquiries", {"bill": bill}), as_json)


@app.command()
def reverse(
    transaction_id: Annotated[str, typer.Argument(help="Id of the payment to reverse.")],
    url: Url = None,
    as_json: JsonOpt = False,
) -> None:
    """Reverse a payment made through the acquirer (a 0420)."""
    _show(_post(_api(url), f"/payments/{transaction_id}/reversal"), as_json)


@db_app.command("upgrade")
def db_upgrade(
    service: Annotated[str, typer.Option(help="billing, gateway, acquirer, or all.")] = "all",
    data_dir: DataDir = None,
) -> None:
    """Bring the databases to the newest schema (also done at every service start)."""
    from shared.db import DatabaseError, upgrade

    settings = _settings(data_dir)
    names = ("acquirer", "gateway", "billing") if service == "all" else (service,)
    for name in names:
        if name not in ("acquirer", "gateway", "billing"):
            fail(f"{name!r} has no database; choose billing, gateway, acquirer or all")
        try:
            upgrade(settings.db_url(name), f"{name}:migrations")
        except DatabaseError as exc:
            fail(str(exc))
        out.print(f"{name}: schema up to date ({settings.db_url(name)})")


@app.command()
def config() -> None:
    """Show every configuration key, its value and what it does."""
    settings = _settings()
    table = Table(title="paylab configuration (PAYLAB_<KEY> or .env)")
    table.add_column("key")
    table.add_column("value")
    table.add_column("meaning")
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        shown = "(secret)" if "key" in name and name != "key_file" else str(value)
        table.add_row(f"PAYLAB_{name.upper()}", shown, field.description or "")
    out.print(table)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
