"""Options several ``paylab`` commands share (typer ``Annotated`` types)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="Where the SQLite files go (default ./var).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")]

#: The acquirer's HTTP API (pay, inquire, reverse).
Url = Annotated[
    str | None,
    typer.Option("--url", help="Acquirer HTTP API (default http://<host>:<acquirer_http_port>)."),
]

#: The gateway's admin API (links, breaker, saf).
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


def _url_opt(name: str) -> Any:
    return typer.Option(f"--{name}-url", help=f"{name} HTTP base URL (default from settings).")


# The network's addresses, as options of every command that reads a running network.
GatewayUrl = Annotated[str | None, _url_opt("gateway")]
AcquirerUrl = Annotated[str | None, _url_opt("acquirer")]
BillingUrl = Annotated[str | None, _url_opt("billing")]
HsmUrl = Annotated[str | None, _url_opt("hsm")]
ChaosUrl = Annotated[
    str | None, typer.Option("--chaos-url", help="Chaos controller (default from settings).")
]
ReaderToken = Annotated[
    str | None,
    typer.Option(
        "--token", help="Reader bearer token (default: admin_token_read).", show_default=False
    ),
]
