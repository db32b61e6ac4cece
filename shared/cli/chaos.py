"""``paylab chaos``: the fault-injection commands, over the chaos controller's HTTP API
(``paylab up --chaos`` serves it; see ``docs/chaos.md``).

Every failure (nothing listening, a bad value, an unknown link) is one clear line on
stderr and exit code 1.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from shared.cli.console import fail, load_settings, out

app = typer.Typer(
    help="Inject faults: latency, loss, resets, partitions, database outages, floods "
    "(needs `paylab up --chaos`).",
    no_args_is_help=True,
)

ChaosUrl = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="Chaos controller URL (default http://<host>:<chaos_http_port>).",
        show_default=False,
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="Admin bearer token (default: the admin_token_operator setting).",
        show_default=False,
    ),
]
Link = Annotated[str, typer.Argument(help="Link: gateway, billing or hsm.")]


def _url(url: str | None) -> str:
    if url:
        return url.rstrip("/")
    s = load_settings()
    return f"http://{s.host}:{s.chaos_http_port}"


def _call(
    method: str, url: str, path: str, token: str | None, body: dict[str, Any] | None = None
) -> Any:
    """One call to the controller; any failure is one line and exit code 1."""
    import httpx

    bearer = token or load_settings().admin_token_operator
    try:
        r = httpx.request(
            method,
            url + path,
            json=body,
            timeout=10,
            headers={"Authorization": f"Bearer {bearer}"},
        )
    except httpx.HTTPError as exc:
        fail(f"cannot reach {url} ({type(exc).__name__}); is `paylab up --chaos` running?")
    try:
        data = r.json()
    except ValueError:
        fail(f"{url}{path} answered HTTP {r.status_code} without JSON")
    if r.status_code >= 400:
        fail(str(data.get("error", f"HTTP {r.status_code}")) if isinstance(data, dict) else "")
    return data


def _faults_text(faults: dict[str, Any]) -> str:
    """The faults that are set, briefly ("-" for none)."""
    from shared.lab.chaos.faults import Faults

    f = Faults.from_dict(faults)
    parts = []
    if f.latency or f.jitter:
        parts.append(f"latency {f.latency * 1000:g}±{f.jitter * 1000:g} ms")
        if f.probability < 1:
            parts.append(f"p {f.probability:g}")
    if f.blackhole:
        parts.append("partition" if f.blackhole >= 1 else f"blackhole {f.blackhole:g}")
    if f.reset:
        parts.append(f"reset {f.reset:g}")
    if f.close_after is not None:
        parts.append(f"close after {f.close_after} B")
    if f.bandwidth is not None:
        parts.append(f"{f.bandwidth} B/s")
    return ", ".join(parts) or "-"


def _show_links(links: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table()
    for col in ("link", "listen", "to", "faults", "conns", "up/down B", "dropped B", "rst/close"):
        table.add_column(col)
    for v in links:
        table.add_row(
            v["name"],
            v["listen"],
            ":" + v["target"].rsplit(":", 1)[-1],
            _faults_text(v["faults"]),
            f"{v['connections']} ({v['connections_total']})",
            f"{v['bytes_up']}/{v['bytes_down']}",
            str(v["bytes_dropped"]),
            f"{v['resets']}/{v['closes']}",
        )
    out.print(table)


@app.command("status")
def status(
    url: ChaosUrl = None,
    token: Token = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the proxied links, their faults and counters, database switches, last flood."""
    data = _call("GET", _url(url), "/chaos", token)
    if as_json:
        out.print_json(json.dumps(data))
        return
    _show_links(data["links"])
    for name, db in data.get("database", {}).items():
        out.print(f"database {name}: {'[bold red]DOWN[/]' if db['down'] else 'up'}")
    flood = data.get("flood")
    if flood:
        state = "running" if flood["running"] else "done"
        out.print(
            f"flood {flood['target']} ({flood['address']}), {state}: opened {flood['opened']}"
            f"/{flood['connections']}, refused {flood['refused']}, "
            f"closed by server {flood['closed_by_server']}"
        )


@app.command("set")
def set_faults(
    link: Link,
    latency: Annotated[str | None, typer.Option(help="Added per chunk: 300ms, 1.5s.")] = None,
    jitter: Annotated[str | None, typer.Option(help="Uniform ± on the latency: 50ms.")] = None,
    blackhole: Annotated[
        str | None, typer.Option(help="Chance a chunk is silently dropped: 0.3 or 30%.")
    ] = None,
    reset: Annotated[str | None, typer.Option(help="Chance per chunk of a TCP reset.")] = None,
    close_after: Annotated[
        int | None, typer.Option("--close-after", help="Close after this many bytes.")
    ] = None,
    bandwidth: Annotated[str | None, typer.Option(help="Cap per direction: 10kB/s.")] = None,
    probability: Annotated[
        str | None, typer.Option(help="Chance the latency applies to a chunk.")
    ] = None,
    url: ChaosUrl = None,
    token: Token = None,
) -> None:
    """Set faults on a link (merged with those already set; `heal` clears them)."""
    spec: dict[str, Any] = {
        k: v
        for k, v in {
            "latency": latency,
            "jitter": jitter,
            "blackhole": blackhole,
            "reset": reset,
            "close_after": close_after,
            "bandwidth": bandwidth,
            "probability": probability,
        }.items()
        if v is not None
    }
    if not spec:
        fail(
            "nothing to set: give at least one of --latency, --jitter, --blackhole, --reset, "
            "--close-after, --bandwidth, --probability"
        )
    from shared.lab.chaos.faults import Faults, FaultSpecError

    try:
        Faults.from_dict(spec)  # a bad value is reported here, before any call
    except FaultSpecError as exc:
        fail(str(exc))
    _show_links([_call("POST", _url(url), f"/chaos/{link}", token, spec)])


@app.command("partition")
def partition(link: Link, url: ChaosUrl = None, token: Token = None) -> None:
    """Cut a link (or `all`): every byte dropped both ways, new connections go nowhere."""
    _show_links(_call("POST", _url(url), f"/chaos/{link}/partition", token))


@app.command("heal")
def heal(
    link: Annotated[str, typer.Argument(help="Link: gateway, billing, hsm or all.")],
    url: ChaosUrl = None,
    token: Token = None,
) -> None:
    """Clear every fault of a link (or `all`); connections that lost bytes are closed."""
    _show_links(_call("POST", _url(url), f"/chaos/{link}/heal", token))


@app.command("database")
def database(
    service: Annotated[str, typer.Argument(help="Service: billing, gateway or acquirer.")],
    down: Annotated[
        bool | None, typer.Option("--down/--up", help="Make the database unavailable or back.")
    ] = None,
    url: ChaosUrl = None,
    token: Token = None,
) -> None:
    """Make a service's database unavailable (--down) or available again (--up)."""
    if down is None:
        fail("say --down or --up")
    data = _call("POST", _url(url), f"/chaos/database/{service}", token, {"down": down})
    out.print(f"database {service}: {'[bold red]DOWN[/]' if data['down'] else 'up'}")


@app.command("flood")
def flood(
    target: Annotated[str, typer.Argument(help="Service whose ISO port to flood: gateway...")],
    connections: Annotated[int, typer.Option(help="Idle connections to open.")] = 300,
    hold: Annotated[str, typer.Option(help="How long to hold them: 10s.")] = "10s",
    source: Annotated[
        str | None,
        typer.Option(help="Local address to connect from, e.g. 127.0.0.2 (default: any)."),
    ] = None,
    url: ChaosUrl = None,
    token: Token = None,
) -> None:
    """Open many idle TCP connections to a service and hold them (in the background)."""
    body: dict[str, Any] = {"target": target, "connections": connections, "hold": hold}
    if source is not None:
        body["source"] = source
    data = _call("POST", _url(url), "/chaos/flood", token, body)["flood"]
    out.print(
        f"flood started: {data['connections']} connections to {data['target']} "
        f"({data['address']}) for {data['hold']:g} s; `paylab chaos status` shows the result"
    )
