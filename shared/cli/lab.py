"""``paylab lab``: the course labs (``docs/labs/``) and their checks (trio + httpx + rich).

``paylab lab check N`` reads the running network once (every service's ``/metrics`` and
``/health``, the gateway's admin API, the chaos controller, optionally a Prometheus server
and a locust CSV report), runs the lab's check (``shared/lab/course.py``) and prints a checklist.
Exit codes: 0 when every finding passes, 1 when one does not or nothing answers, 2 for an
unknown lab.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from shared.cli.console import fail, load_settings, out
from shared.cli.options import AcquirerUrl, BillingUrl, ChaosUrl, GatewayUrl, HsmUrl, ReaderToken

if TYPE_CHECKING:
    import httpx

    from shared.lab.course import Finding, LabSnapshot
    from shared.lab.watch import Targets

app = typer.Typer(
    help="The course labs (docs/labs/) and `paylab lab check N`.", no_args_is_help=True
)

DEFAULT_PROMETHEUS = "http://127.0.0.1:9090"


@app.command("list")
def lab_list() -> None:
    """The labs of the course day, in order, with their pages."""
    from rich.table import Table

    from shared.lab.course import LABS

    table = Table(title="paylab course labs")
    table.add_column("lab", justify="right")
    table.add_column("title")
    table.add_column("page")
    for lab in LABS.values():
        table.add_row(str(lab.number), lab.title, f"docs/labs/{lab.page}")
    out.print(table)
    out.print("Check one with `paylab lab check N` (docs/labs/README.md).")


async def _get_json(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> Any:
    """The JSON body at ``url``; raises ``ValueError`` with a readable reason otherwise."""
    import httpx
    import trio

    from shared.lab.watch import FETCH_TIMEOUT

    try:
        with trio.fail_after(FETCH_TIMEOUT):
            r = await client.get(url, headers=headers)
    except (httpx.HTTPError, trio.TooSlowError, OSError) as exc:
        raise ValueError(f"not answering ({type(exc).__name__})") from None
    if r.status_code != 200:
        raise ValueError(f"HTTP {r.status_code}")
    try:
        return r.json()
    except ValueError:
        raise ValueError("answer is not JSON") from None


async def _read(targets: Targets, prometheus_url: str | None) -> tuple[LabSnapshot, dict[str, str]]:
    """One snapshot of everything a check may need (never raises on a source down)."""
    import httpx
    import trio

    from shared.lab.course import LabSnapshot, Prometheus
    from shared.lab.watch import Targets, fetch_snapshot

    health: dict[str, Any] = {}
    prom: dict[str, Any] = {}
    prom_errors: list[str] = []
    services = dict(targets.services)
    if targets.chaos is not None:
        services["chaos"] = targets.chaos  # its /metrics too
    async with httpx.AsyncClient() as client:

        async def read_health(name: str, base: str) -> None:
            # A service that is not ready answers 503: its metrics say the rest.
            with contextlib.suppress(ValueError):
                health[name] = await _get_json(client, f"{base}/health", {})

        async def read_prom(key: str, path: str) -> None:
            assert prometheus_url is not None
            try:
                prom[key] = await _get_json(client, prometheus_url + path, {})
            except ValueError as exc:
                prom_errors.append(str(exc))

        network = None

        async def read_network() -> None:
            nonlocal network
            network = await fetch_snapshot(client, Targets(services, targets.chaos, targets.token))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_network)
            for name, base in targets.services.items():
                nursery.start_soon(read_health, name, base)
            if prometheus_url is not None:
                nursery.start_soon(read_prom, "targets", "/api/v1/targets")
                nursery.start_soon(read_prom, "rules", "/api/v1/rules")
    assert network is not None
    prometheus = None
    if prometheus_url is not None:
        prometheus = Prometheus(
            prometheus_url,
            prom.get("targets"),
            prom.get("rules"),
            prom_errors[0] if prom_errors else None,
        )
    return LabSnapshot(network, health, prometheus), dict(network.errors)


def _locust(prefix: str | None) -> tuple[list[dict[str, str]] | None, str | None]:
    from shared.lab.course import parse_locust_stats

    if prefix is None:
        return None, None
    path = Path(f"{prefix}_stats.csv")
    try:
        return parse_locust_stats(path.read_text(encoding="utf-8")), None
    except OSError as exc:
        return None, f"{path}: {exc.strerror or exc}"
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"{path}: {exc}"


def _print(number: int, findings: list[Finding]) -> None:
    from shared.lab.course import LABS

    lab = LABS[number]
    out.print(f"[bold]Lab {number}: {escape(lab.title)}[/]  (docs/labs/{lab.page})")
    for f in findings:
        if f.ok:
            out.print(f"  [green]✓[/] {escape(f.what)}")
        else:
            out.print(f"  [red]✗[/] {escape(f.what)}")
            if f.hint:
                out.print(f"      [yellow]→[/] {escape(f.hint)}")
    passed = sum(f.ok for f in findings)
    if passed == len(findings):
        out.print(f"[bold green]Lab {number} done:[/] all {len(findings)} checks pass.")
    else:
        out.print(
            f"[bold red]Lab {number} not done yet:[/] {passed} of {len(findings)} checks pass."
        )


@app.command("check")
def lab_check(
    number: Annotated[int, typer.Argument(help="The lab's number (paylab lab list).")],
    gateway_url: GatewayUrl = None,
    acquirer_url: AcquirerUrl = None,
    billing_url: BillingUrl = None,
    hsm_url: HsmUrl = None,
    chaos_url: ChaosUrl = None,
    prometheus_url: Annotated[
        str, typer.Option("--prometheus-url", help="Prometheus server (lab 4).")
    ] = DEFAULT_PROMETHEUS,
    locust_csv: Annotated[
        str | None,
        typer.Option(
            "--locust-csv",
            help="Lab 5: the --csv prefix of a locust run (reads PREFIX_stats.csv).",
            show_default=False,
        ),
    ] = None,
    backup: Annotated[
        Path | None,
        typer.Option("--backup", help="Lab 7: the backup restored.", show_default=False),
    ] = None,
    receipts: Annotated[
        Path | None,
        typer.Option(
            "--receipts", help="Lab 7: the clients' receipts (JSON lines).", show_default=False
        ),
    ] = None,
    token: ReaderToken = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
) -> None:
    """Has lab N's expected state been reached? A checklist, with what is missing.

    Exit code 0 when every check passes, 1 when one does not (or nothing answers), 2 for
    an unknown lab.
    """
    import trio

    from shared.lab.course import LABS, NETWORK_SERVICES, LabSnapshot, check
    from shared.lab.watch import default_targets

    if number not in LABS:
        fail(f"unknown lab {number}: the labs are {', '.join(map(str, LABS))} (paylab lab list)", 2)
    targets = default_targets(
        load_settings(), gateway_url, acquirer_url, billing_url, hsm_url, chaos_url, token
    )
    urls = {**targets.services, "chaos": targets.chaos, "prometheus": prometheus_url}
    for name, url in urls.items():
        if url is not None and not url.startswith(("http://", "https://")):
            fail(f"--{name}-url must start with http:// or https:// (got {url!r})")
    prom = prometheus_url.rstrip("/") if number == 4 else None
    snap, _ = trio.run(_read, targets, prom)
    if not any(name in snap.network.metrics for name in NETWORK_SERVICES):
        ports = ", ".join(targets.services.values())
        fail(f"no service answers ({ports}); is the network running (paylab up --chaos)?")
    rows, locust_error = _locust(locust_csv)
    recovery = None
    if number == 7 and backup is not None:
        from shared.lab.backup import recovery_facts

        recovery = recovery_facts(load_settings(), backup, receipts)
    snap = LabSnapshot(snap.network, snap.health, snap.prometheus, rows, locust_error, recovery)
    findings = check(number, snap)
    ok = all(f.ok for f in findings)
    if as_json:
        body = {
            "lab": number,
            "title": LABS[number].title,
            "ok": ok,
            "findings": [{"ok": f.ok, "what": f.what, "hint": f.hint} for f in findings],
        }
        out.print_json(json.dumps(body))
    else:
        _print(number, findings)
    if not ok:
        raise typer.Exit(1)
