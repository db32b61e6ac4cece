"""``paylab pay``, ``inquire`` and ``reverse``: transactions through the running acquirer's
HTTP API. ``pay`` exits 0 only when the payment is approved (2 for any other answer)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from billing.demo_data import DEMO_CARD
from shared.cli.console import fail, load_settings, out
from shared.cli.options import JsonOpt, Url

DEMO_PAN, DEMO_PIN = DEMO_CARD.pan, DEMO_CARD.pin


def _api(url: str | None) -> str:
    if url:
        return url.rstrip("/")
    s = load_settings()
    return f"http://{s.host}:{s.acquirer_http_port}"


def _post(url: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    import httpx

    settings = load_settings()
    try:
        r = httpx.post(url + path, json=body or {}, timeout=settings.gateway_timeout + 5)
    except httpx.ConnectError:
        fail(f"nothing is listening on {url} (start the network with `paylab up`)")
    except httpx.HTTPError as exc:
        fail(f"request to {url} failed: {exc}")
    try:
        data: dict[str, Any] = r.json()
    except ValueError:
        fail(f"{url} answered HTTP {r.status_code} without JSON")
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


def inquire(
    bill: Annotated[str, typer.Option(help="Bill number, e.g. PLN-0001.")],
    url: Url = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask for a bill's amount due through the running acquirer."""
    _show(_post(_api(url), "/inquiries", {"bill": bill}), as_json)


def reverse(
    transaction_id: Annotated[str, typer.Argument(help="Id of the payment to reverse.")],
    url: Url = None,
    as_json: JsonOpt = False,
) -> None:
    """Reverse a payment made through the acquirer (a 0420)."""
    _show(_post(_api(url), f"/payments/{transaction_id}/reversal"), as_json)
