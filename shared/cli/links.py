"""``paylab links``: the gateway's upstream links, from its admin API."""

from __future__ import annotations

import json

from shared.cli.admin import admin_call, admin_url
from shared.cli.console import out
from shared.cli.options import AdminToken, AdminUrl, JsonOpt


def links(url: AdminUrl = None, token: AdminToken = None, as_json: JsonOpt = False) -> None:
    """Show the gateway's upstream links: connections, health, in flight, echo RTT."""
    from rich.table import Table

    data = admin_call("GET", admin_url(url), "/links", token)
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
            f"error rate {'-' if link['error_rate'] is None else format(link['error_rate'], '.0%')}"
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
