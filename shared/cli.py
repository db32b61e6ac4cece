"""The ``paylab`` command line (typer + rich).

Every command turns expected failures (nothing listening, a port in use, a bad value)
into one clear line and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from billing.demo_data import DEMO_CARD
from shared.errors import PaylabError
from shared.scenario_cli import scenarios_app
from shared.settings import SERVICES, Settings, load_settings

app = typer.Typer(
    name="paylab",
    help="paylab: an ISO-8583 bill-payment network simulator.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")
breaker_app = typer.Typer(
    help="Circuit breakers of every service's upstreams.", no_args_is_help=True
)
app.add_typer(breaker_app, name="breaker")
saf_app = typer.Typer(help="The gateway's store-and-forward queue.", no_args_is_help=True)
app.add_typer(saf_app, name="saf")
bills_app = typer.Typer(help="Bills in billing's database.", no_args_is_help=True)
app.add_typer(bills_app, name="bills")
app.add_typer(scenarios_app, name="scenarios")


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

DEMO_PAN, DEMO_PIN = DEMO_CARD.pan, DEMO_CARD.pin

DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="Where the SQLite files go (default ./var).")
]
Url = Annotated[
    str | None,
    typer.Option("--url", help="Acquirer HTTP API (default http://<host>:<acquirer_http_port>)."),
]


def fail(message: str, code: int = 1) -> None:
    """Print one line to stderr and exit."""
    err.print(f"[bold red]error:[/] {escape(message)}")
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


def _run_network(names: tuple[str, ...], data_dir: Path | None, chaos: bool = False) -> None:
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
        if network.chaos is not None:
            from shared.chaos_cli import show_chaos_start

            show_chaos_start(network, settings.host)
        if "acquirer" in ports:
            err.print("Make a first payment from another terminal, in this folder:")
            err.print(
                f"  [bold]{_self_command()} pay --bill PLN-0001 --amount 150000[/]", soft_wrap=True
            )
        err.print("Ctrl-C stops the network (in-flight requests are answered first).")

    try:
        network = Network(settings, names, chaos=chaos)
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
    _run_network(("hsm", "billing", "gateway", "acquirer"), data_dir, chaos)


def _run_processes(data_dir: Path | None) -> None:
    """``paylab up --processes``: exit 0 after a clean stop, 1 when a service died."""
    import signal
    import time

    from shared.network import ChildDied, ProcessNetwork

    settings = _settings(data_dir)
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
            raise  # unreachable
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


# -- operators: links and breakers ---------------------------------------------------------
AdminUrl = Annotated[
    str | None,
    typer.Option("--url", help="Gateway HTTP port (default http://<host>:<gateway_http_port>)."),
]


AdminToken = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="Admin bearer token (default: the admin_token_operator setting).",
        show_default=False,
    ),
]


def _admin(url: str | None) -> str:
    if url:
        return url.rstrip("/")
    s = _settings()
    return f"http://{s.host}:{s.gateway_http_port}"


def _admin_call(method: str, url: str, path: str, token: str | None = None) -> dict[str, Any]:
    """Call an admin endpoint with the operator token (``--token`` or the
    ``admin_token_operator`` setting); any failure is one clear line and exit code 1."""
    import httpx

    bearer = token or _settings().admin_token_operator
    try:
        r = httpx.request(
            method, url + path, timeout=10, headers={"Authorization": f"Bearer {bearer}"}
        )
    except httpx.HTTPError as exc:
        fail(f"cannot reach {url} ({type(exc).__name__}); is the network running?")
        raise  # unreachable
    try:
        data: dict[str, Any] = r.json()
    except ValueError:
        fail(f"{url}{path} answered HTTP {r.status_code} without JSON")
        raise
    if r.status_code >= 400:
        fail(str(data.get("error", f"HTTP {r.status_code}")))
    return data


@app.command()
def links(url: AdminUrl = None, token: AdminToken = None, as_json: JsonOpt = False) -> None:
    """Show the gateway's upstream links: connections, health, in flight, echo RTT."""
    data = _admin_call("GET", _admin(url), "/links", token)
    if as_json:
        out.print_json(json.dumps(data))
        return
    out.print(f"health score: [bold]{data['score']}[/]/100")
    table = Table()
    for col in ("link", "endpoint", "slot", "state", "in flight", "requests", "errors", "echo ms"):
        table.add_column(col)
    for link in data["links"]:
        out.print(
            f"[bold]{link['name']}[/] breaker {link['breaker']}, "
            f"{link['healthy']}/{link['target']} healthy, in flight {link['in_flight']}, "
            f"error rate {link['error_rate'] if link['error_rate'] is not None else '-'}"
        )
        for c in link["connections"]:
            table.add_row(
                link["name"],
                f"{c['endpoint']} {c['address']}",
                str(c["slot"]),
                c["state"],
                str(c["in_flight"]),
                str(c["requests"]),
                str(c["errors"]),
                "-" if c["last_echo_rtt_ms"] is None else f"{c['last_echo_rtt_ms']:.2f}",
            )
    out.print(table)


def breaker_id(breaker: Mapping[str, Any]) -> str:
    """``service/upstream`` (``gateway/billing``); an answer without ``service`` is the
    gateway's (older gateways)."""
    return f"{breaker.get('service') or 'gateway'}/{breaker.get('name')}"


def match_breakers(items: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    """The breakers ``name`` stands for: ``service/upstream`` names one; a bare upstream
    name names every breaker to it (``hsm``: the gateway's and billing's)."""
    if "/" in name:
        return [b for b in items if breaker_id(b) == name]
    return [b for b in items if b.get("name") == name]


BreakerUrl = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="HTTP base URL of one service (default: every service, at "
        "http://<host>:<its HTTP port>).",
    ),
]


def _breaker_services(url: str | None) -> dict[str, str]:
    """Where to read breakers: one URL, or every service of the settings."""
    if url:
        return {"": url.rstrip("/")}
    s = _settings()
    return {svc: f"http://{s.host}:{s.http_port(svc)}" for svc in SERVICES}


def _try_admin(method: str, url: str, path: str, token: str | None) -> tuple[Any, str | None]:
    """Like :func:`_admin_call`, but a failure is returned as its reason, not an exit."""
    import httpx

    bearer = token or _settings().admin_token_operator
    try:
        r = httpx.request(
            method, url + path, timeout=5, headers={"Authorization": f"Bearer {bearer}"}
        )
    except httpx.HTTPError as exc:
        return None, f"not answering ({type(exc).__name__})"
    try:
        data = r.json()
    except ValueError:
        return None, f"HTTP {r.status_code} without JSON"
    if r.status_code >= 400:
        return None, str(data.get("error", f"HTTP {r.status_code}"))
    return data, None


def _read_breakers(
    services: Mapping[str, str], token: str | None
) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, str]]:
    """Every breaker of ``services``: (breakers, {service: its URL}, {source: error})."""
    items: list[dict[str, Any]] = []
    urls: dict[str, str] = {}
    errors: dict[str, str] = {}
    for service, base in services.items():
        data, error = _try_admin("GET", base, "/breakers", token)
        if error is not None:
            errors[service or base] = error
            continue
        for b in data.get("breakers", []) if isinstance(data, dict) else []:
            entry = dict(b)
            entry.setdefault("service", service or "gateway")
            urls[entry["service"]] = base
            items.append(entry)
    return items, urls, errors


def _show_breakers(items: Sequence[Mapping[str, Any]]) -> None:
    table = Table()
    columns = ("breaker", "state", "calls", "failures", "failure rate", "open for", "probe in")
    for col in (*columns, "rejected"):
        # The name and state are what the reader (or a script) is after: never cut short.
        table.add_column(col, no_wrap=col in ("breaker", "state"))
    for b in items:
        rate = b.get("failure_rate")
        remaining = b.get("open_remaining")
        probe = b.get("probe_in")
        if b["state"] == "forced_open":
            left = "until reset"
        else:
            left = f"{remaining:.1f} s" if remaining else "-"
        table.add_row(
            breaker_id(b),
            b["state"],
            str(b["calls_in_window"]),
            str(b["failures_in_window"]),
            "-" if rate is None else f"{rate:.0%}",
            left,
            "-" if probe is None else f"{probe:.1f} s",
            str(b["rejected"]),
        )
    out.print(table)


@breaker_app.command("status")
def breaker_status(
    url: BreakerUrl = None, token: AdminToken = None, as_json: JsonOpt = False
) -> None:
    """Every breaker of every service: state, window figures, time left open, next probe,
    calls rejected."""
    items, _urls, errors = _read_breakers(_breaker_services(url), token)
    if not items and errors:
        fail("; ".join(f"{k}: {v}" for k, v in errors.items()))
    if as_json:
        out.print_json(json.dumps({"breakers": items, "errors": errors}))
        return
    _show_breakers(items)
    for source, reason in errors.items():
        err.print(f"[yellow]{escape(source)}:[/] {escape(reason)}")


def _breaker_action(action: str, name: str, url: str | None, token: str | None) -> None:
    items, urls, errors = _read_breakers(_breaker_services(url), token)
    matches = match_breakers(items, name)
    if not matches:
        known = ", ".join(breaker_id(b) for b in items) or "none answered"
        extra = f"; {'; '.join(f'{k}: {v}' for k, v in errors.items())}" if errors else ""
        fail(f"no breaker named {name!r} ({known}){extra}")
    done = []
    for b in matches:
        base = urls[str(b["service"])]
        done.append(_admin_call("POST", base, f"/breakers/{b['name']}/{action}", token))
    _show_breakers(done)


BreakerName = Annotated[
    str,
    typer.Argument(
        help="SERVICE/UPSTREAM (acquirer/gateway, gateway/billing, gateway/hsm, billing/hsm), "
        "or an upstream name for every breaker to it (hsm: the gateway's and billing's)."
    ),
]


@breaker_app.command("reset")
def breaker_reset(name: BreakerName, url: BreakerUrl = None, token: AdminToken = None) -> None:
    """Close a breaker now (also ends forced-open and disabled)."""
    _breaker_action("reset", name, url, token)


@breaker_app.command("open")
def breaker_open(name: BreakerName, url: BreakerUrl = None, token: AdminToken = None) -> None:
    """Force a breaker open: calls fail fast until `paylab breaker reset`."""
    _breaker_action("force-open", name, url, token)


@breaker_app.command("disable")
def breaker_disable(name: BreakerName, url: BreakerUrl = None, token: AdminToken = None) -> None:
    """Let everything through (metrics still kept) until `paylab breaker reset`."""
    _breaker_action("disable", name, url, token)


# -- operators: the store-and-forward queue ------------------------------------------------
_SAF_COLUMNS = ("id", "kind", "state", "mti", "rrn", "terminal_id", "amount", "attempts")


def _show_entries(items: list[dict[str, Any]]) -> None:
    table = Table()
    for col in (*_SAF_COLUMNS, "code", "created_at"):
        table.add_column(col)
    for e in items:
        table.add_row(
            *(str(e.get(c) if e.get(c) is not None else "-") for c in _SAF_COLUMNS),
            e.get("response_code") or "-",
            (e.get("created_at") or "")[:19],
        )
    out.print(table)


@saf_app.command("list")
def saf_list(
    state: Annotated[
        str | None, typer.Option(help="queued, in_flight, done, dead or cancelled.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Entries per page.")] = 50,
    before_id: Annotated[
        int | None, typer.Option(help="Page on: entries older than this id.")
    ] = None,
    rrn: Annotated[str | None, typer.Option(help="Only this RRN (field 37).")] = None,
    url: AdminUrl = None,
    token: AdminToken = None,
    as_json: JsonOpt = False,
) -> None:
    """Queue entries, newest first."""
    params = {"state": state, "limit": limit, "before_id": before_id, "rrn": rrn}
    query = "&".join(f"{k}={v}" for k, v in params.items() if v is not None)
    data = _admin_call("GET", _admin(url), f"/saf?{query}", token)
    if as_json:
        out.print_json(json.dumps(data))
        return
    _show_entries(data["items"])
    if data.get("next_before_id"):
        out.print(f"more: --before-id {data['next_before_id']}")


EntryId = Annotated[int, typer.Argument(help="Queue entry id (see `paylab saf list`).")]


@saf_app.command("show")
def saf_show(entry_id: EntryId, url: AdminUrl = None, token: AdminToken = None) -> None:
    """One entry, every field (the PAN masked; the message itself is never shown)."""
    out.print_json(json.dumps(_admin_call("GET", _admin(url), f"/saf/{entry_id}", token)))


@saf_app.command("retry")
def saf_retry(entry_id: EntryId, url: AdminUrl = None, token: AdminToken = None) -> None:
    """Put a dead entry back in the queue, due now."""
    _show_entries([_admin_call("POST", _admin(url), f"/saf/{entry_id}/retry", token)])


@saf_app.command("cancel")
def saf_cancel(entry_id: EntryId, url: AdminUrl = None, token: AdminToken = None) -> None:
    """Cancel an entry: it is never forwarded afterwards."""
    _show_entries([_admin_call("POST", _admin(url), f"/saf/{entry_id}/cancel", token)])


@saf_app.command("purge")
def saf_purge(
    older_than: Annotated[
        int | None, typer.Option(help="Seconds (default: PAYLAB_SAF_RETENTION).")
    ] = None,
    url: AdminUrl = None,
    token: AdminToken = None,
) -> None:
    """Delete done and cancelled entries older than the retention period."""
    query = "" if older_than is None else f"?older_than={older_than}"
    data = _admin_call("POST", _admin(url), f"/saf/purge{query}", token)
    out.print(f"removed {data['removed']} entries older than {data['older_than']}")


@saf_app.command("stats")
def saf_stats(url: AdminUrl = None, token: AdminToken = None, as_json: JsonOpt = False) -> None:
    """Entries by state, depth and the oldest entry's age."""
    data = _admin_call("GET", _admin(url), "/saf/stats", token)
    if as_json:
        out.print_json(json.dumps(data))
        return
    for state, n in data["counts"].items():
        out.print(f"{state:<10} {n}")
    age = data.get("oldest_queued_age_seconds")
    out.print(f"depth      {data['depth']}  (oldest {'-' if age is None else f'{age:.1f} s'})")


@bills_app.command("add")
def bills_add(
    count: Annotated[int, typer.Argument(min=1, max=1_000_000, help="How many bills.")] = 10_000,
    prefix: Annotated[
        str, typer.Option("--prefix", help="Bill numbers are <prefix>-<7 digits>.")
    ] = "LOAD",
    data_dir: DataDir = None,
) -> None:
    """Add open bills for load tests, each payable once with the demo card (PIN 1234).

    Writes into billing's database (PAYLAB_BILLING_DB_URL or the data directory), also
    while the network runs; numbering continues after the bills of the same prefix.
    Locust picks from them with PAYLAB_LOAD_BILLS=<prefix>:<total> (loadtests/README.md).
    """
    import re

    from billing.demo_data import GENERATED_BILL_AMOUNT
    from shared.bench import seed_bills
    from shared.db import DatabaseError

    if not re.fullmatch(r"[A-Z][A-Z0-9]{0,15}", prefix):
        fail("the prefix must be 1-16 capital letters or digits, starting with a letter")
    try:
        bills = seed_bills(_settings(data_dir), count, prefix, append=True)
    except DatabaseError as exc:
        fail(f"cannot write billing's database: {exc}")
        raise  # unreachable
    total = int(bills[-1][0].rsplit("-", 1)[1]) + 1
    out.print(
        f"added {len(bills)} open bills {bills[0][0]} .. {bills[-1][0]}, "
        f"{GENERATED_BILL_AMOUNT} each (IDR minor units)"
    )
    out.print(f"for locust: PAYLAB_LOAD_BILLS={prefix}:{total}")


@app.command()
def reconcile(data_dir: DataDir = None, as_json: JsonOpt = False) -> None:
    """Prove the money rule: every client answered 00 has a posting in force, and only they.

    Reads the acquirer's records (what each client, API or terminal, was answered), the
    gateway's journal and queue, and billing's postings (PAYLAB_*_DB_URL, or the SQLite
    files in the data directory). Reports LOST (answered 00, no posting in force),
    DUPLICATED (posted twice) and ORPHAN (posted, never approved, not reversed) with
    examples, journal gaps, and the transactions still pending in the queue. Exit code 1
    when anything is lost, duplicated or otherwise mismatched.
    """
    from gateway.reconcile import reconcile_databases
    from shared.db import DatabaseError

    settings = _settings(data_dir)
    try:
        report = reconcile_databases(
            settings.db_url("gateway"), settings.db_url("billing"), settings.db_url("acquirer")
        )
    except DatabaseError as exc:
        fail(f"cannot read the databases: {exc}")
        raise  # unreachable
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
    else:
        for line in reconcile_lines(report):
            out.print(line)
    if not report.clean:
        raise typer.Exit(1)


def reconcile_lines(report: Any) -> list[str]:
    """The reconciliation report as console lines (rich markup)."""
    colour = "green" if report.clean else "bold red"
    lines = [
        f"checked {report.checked} transactions: approved {report.approved}, posted "
        f"{report.posted}, reversed {report.reversed}; {report.pending} pending",
        f"[{colour}]lost {report.lost}, duplicated {report.duplicated}, orphans "
        f"{report.orphans}, {len(report.mismatches)} mismatches[/]",
    ]
    if not report.client_side:
        lines.append(
            "[yellow]no acquirer records: clients' answers taken from the gateway's journal[/]"
        )
    if report.journal_gaps:
        lines.append(
            f"[yellow]journal gaps: {len(report.journal_gaps)} approvals the journal does not "
            f"hold, e.g. {', '.join(report.journal_gaps[:3])}[/]"
        )
    by_kind: dict[str, list[Any]] = {}
    for m in report.mismatches:
        by_kind.setdefault(m.kind, []).append(m)
    for kind, items in sorted(by_kind.items()):
        lines.append(f"  [red]{kind}[/]: {len(items)}")
        for m in items[:5]:
            lines.append(f"    {m.key}: {escape(m.detail)}")
        if len(items) > 5:
            lines.append(f"    ... and {len(items) - 5} more (--json lists them all)")
    return lines


@app.command()
def bench(
    duration: Annotated[float, typer.Option(min=0.5, help="Measured seconds per phase.")] = 10.0,
    warmup: Annotated[float, typer.Option(min=0, help="Warm-up seconds per phase.")] = 2.0,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 64,
    connections: Annotated[int, typer.Option(min=1, help="TCP connections per phase.")] = 8,
    rate: Annotated[
        float, typer.Option(min=0, help="Offered requests per second (0: as fast as answered).")
    ] = 0.0,
    bills: Annotated[
        int, typer.Option(min=0, help="Bills seeded per payment phase (0: enough for ~4,000/s).")
    ] = 0,
    phase: Annotated[
        list[str] | None,
        typer.Option(
            help="Run only this phase (repeatable): echo, billing-inquiry, "
            "billing-payment, chain-payment."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Benchmark (not a test): TPS and latency of the chain, of billing, of a raw echo server.

    Starts hsm, billing and gateway each in its own process on free ports (a temporary
    data directory), seeds bills, drives closed-loop load, stops everything. See
    shared/bench.py and docs/performance.md.
    """
    from shared.bench import BenchOptions, render, run_bench

    opts = BenchOptions(duration, warmup, concurrency, connections, rate, bills)
    if phase:
        unknown = set(phase) - set(opts.phases)
        if unknown:
            fail(
                f"unknown phase(s) {', '.join(sorted(unknown))}; choose from "
                + ", ".join(opts.phases)
            )
        opts.phases = tuple(p for p in opts.phases if p in phase)
    try:
        report = run_bench(opts, lambda m: err.print(f"[dim]{escape(m)}[/]"))
    except (OSError, RuntimeError, TimeoutError) as exc:
        fail(f"benchmark failed: {exc}")
        raise  # unreachable
    if as_json:
        out.print_json(json.dumps(report))
    else:
        for item in render(report):
            out.print(item)


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


@db_app.command("seed")
def db_seed(
    data_dir: DataDir = None,
    new_ledger: Annotated[
        bool,
        typer.Option(
            "--new-ledger",
            help="Give up the ledger this data directory served (its database was lost) "
            "and serve the database found, seeded if empty.",
        ),
    ] = False,
) -> None:
    """Create billing's ledger for a new network: schema, ledger id, demo data.

    Billing does this by itself on its first start in an empty data directory; it never
    seeds a database it finds empty after it has served one (see docs/store-and-forward.md,
    "A lost database"). Run this to prepare a network before starting it, or with
    --new-ledger to start over on purpose after a lost database.
    """
    from billing.ledger import LedgerLost, Start, open_ledger
    from billing.service import seed_demo
    from billing.store import BillingStore
    from hsm.keyfile import load_key_file
    from shared.db import DatabaseError, make_engine, session_factory, upgrade

    settings = _settings(data_dir)
    url = settings.db_url("billing")
    engine = None
    try:
        upgrade(url, "billing:migrations")
        engine = make_engine(url)
        store = BillingStore(session_factory(engine))
        keys = load_key_file(settings.key_file)
        start, ledger_id = open_ledger(
            store,
            settings.data_dir,
            lambda: seed_demo(store, settings, keys),
            new_ledger=new_ledger,
        )
    except LedgerLost as exc:
        fail(str(exc))
        raise  # unreachable
    except (DatabaseError, OSError, PaylabError) as exc:
        fail(f"cannot prepare billing's database: {exc}")
        raise  # unreachable
    finally:
        if engine is not None:
            engine.dispose()
    said = {
        Start.NEW: "new ledger created and seeded with the demo data",
        Start.ADOPT: "ledger id given to the existing data",
        Start.SAME: "ledger already in place",
    }
    out.print(f"billing: {said[start]}: {ledger_id} ({url})")


@app.command()
def certs(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Directory of the files (default ./var/tls).")
    ] = Path("var/tls"),
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="Extra DNS name or IP in every certificate (repeatable)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
) -> None:
    """Make a lab CA, a certificate per service and a terminal client certificate for TLS
    links (PAYLAB_TLS_ENABLED=true); each names its identity (service or terminal) in its
    common name, which mutual TLS listeners check (PAYLAB_TLS_CLIENTS_<SERVICE>)."""
    from shared.certs import CertsExist, lab_pki, write_lab_pki

    try:
        written = write_lab_pki(out_dir, lab_pki(host or ()), force=force)
    except CertsExist as exc:
        fail(str(exc))
        raise  # unreachable
    except (OSError, ValueError) as exc:
        fail(f"cannot write certificates: {exc}")
        raise  # unreachable
    for path in written:
        out.print(str(path))
    out.print(f"turn TLS on with PAYLAB_TLS_ENABLED=true PAYLAB_TLS_DIR={out_dir}")


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


from shared.demo import demo  # noqa: E402  (registered last: they use the helpers above)
from shared.top_cli import top  # noqa: E402

app.command("top")(top)
app.command("demo")(demo)

from shared.chaos_cli import chaos_app  # noqa: E402  (uses the helpers above)

app.add_typer(chaos_app, name="chaos")
from shared.lab_cli import lab_app  # noqa: E402

app.add_typer(lab_app, name="lab")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
